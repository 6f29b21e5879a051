import os

import pytest
import torch


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    """A checkpoint whose pickle calls os.system, and the file that appears if it ever runs."""
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save({'state_dict': {'patch_embed.proj.weight': torch.zeros(1)}, 'meta': _Payload(marker)},
               path)
    return path, marker
