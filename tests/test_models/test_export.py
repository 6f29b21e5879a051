"""The backbone exports to ONNX with both of PyTorch's exporters, with free batch and image sizes, and
onnxruntime computes what PyTorch does. Exporters trace the model, so they see the plain formulation
(standard operators), never the fused kernels."""
import pytest
import torch

from mmpoolformer.models import PoolFormer
from mmpoolformer.testing import max_rel_err, randomize_weights

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')



@pytest.fixture(scope='module')
def model():
    """Every kind of layer of PoolFormer-S12, fewer and narrower (exporting is slow)."""
    arch = dict(depths=[1, 1, 2, 1], embed_dims=[16, 32, 40, 64])
    return randomize_weights(PoolFormer(arch, out_indices=(0, 1, 2, 3))).eval()


@pytest.mark.parametrize('dynamo', [False, True], ids=['torchscript', 'dynamo'])
def test_exports_with_dynamic_sizes_and_matches_onnxruntime(model, dynamo, tmp_path):
    path = str(tmp_path / 'poolformer.onnx')
    outputs = [f'stage{i}' for i in range(4)]
    x = torch.randn(2, 3, 96, 64)  # torch.export specialises sizes of 1
    if dynamo:
        dim = torch.export.Dim
        torch.onnx.export(model, (x, ), path, dynamo=True, input_names=['image'],
                          output_names=outputs, dynamic_shapes={
                              'x': {0: dim('n', max=64), 2: dim('h', min=64, max=4096),
                                    3: dim('w', min=64, max=4096)}})
    else:
        axes = {0: 'n', 2: 'h', 3: 'w'}
        torch.onnx.export(model, (x, ), path, dynamo=False, input_names=['image'],
                          output_names=outputs, opset_version=17,
                          dynamic_axes={'image': axes, **{o: axes for o in outputs}})
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for shape in [(2, 3, 96, 64), (1, 3, 67, 75), (3, 3, 130, 200)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        got = session.run(None, {'image': x.numpy()})
        with torch.no_grad():
            expected = model(x)
        for a, b in zip(got, expected):
            assert a.shape == tuple(b.shape)
            assert max_rel_err(a, b.numpy()) <= 1e-5, shape
