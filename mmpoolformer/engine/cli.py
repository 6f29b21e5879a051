"""The command-line conventions that tools/train.py and tools/test.py share with mmdet's and mmseg's."""
import argparse
import gc
import os
import signal
import sys
from typing import Callable

from mmengine.config import DictAction

from ..models.weights import CheckpointError
from .faults import TrainingStopped


class ConfigOptions(DictAction):
    """mmengine's ``--cfg-options`` parsing, refusing by name an item that is not ``KEY=VALUE`` (mmengine
    fails on it with "not enough values to unpack") or whose value it cannot read (a ``dict(...)``
    sends its parser into endless recursion)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values or []:
            if '=' not in item or item.startswith('='):
                raise ValueError(f'{option_string}: expected KEY=VALUE items (e.g. '
                                 f'train_dataloader.batch_size=4), got {item!r}')
            try:
                self._parse_iterable(item.split('=', 1)[1])
            except (RecursionError, AssertionError) as e:
                raise ValueError(
                    f'{option_string}: cannot read the value of {item!r}: a value is a number, a '
                    f'string, None, a list [a,b] or a tuple (a,b), not a dict; set a dict\'s keys '
                    f'one by one (KEY.SUB=VALUE), or in a config that inherits this one') from e
        super().__call__(parser, namespace, values, option_string)


def tool_parser(description: str, runner: bool = True) -> argparse.ArgumentParser:
    """A parser with the options every tool takes (``--cfg-options``), and those of the tools that run
    an mmengine Runner (``--work-dir``, ``--launcher``) unless ``runner=False``; the tool adds its own."""
    parser = argparse.ArgumentParser(description=description)
    if runner:
        parser.add_argument('--work-dir', help='the dir to save logs, checkpoints and metrics')
    parser.add_argument(
        '--cfg-options', nargs='+', action=ConfigOptions,
        help='override settings of the config, e.g. model.backbone.init_cfg=None '
        'train_dataloader.batch_size=4')
    if runner:
        parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                            default='none')
        parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def parse_tool_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def run_tool(main: Callable[[], None]) -> None:
    """Run a tool's main; a user's mistake (no such file, a bad value, an unreadable checkpoint) or a
    fault that stopped training (bad data, a non-finite loss, a failed save) ends it with one line
    and a non-zero status instead of a traceback.

    The launch scripts start torchrun with SIGTERM ignored (see ``tools/_common.sh``), which its
    processes inherit; a tool gets SIGTERM's default back here (training then installs its own).

    When the tool is done, the objects left are frozen (``gc.freeze``): the interpreter's last
    collections would otherwise walk everything torch, mmengine and mmdet made, 1-3 s per process on a
    small machine, only to free memory the process is about to give back. Nothing is lost by it: the
    tools close their files as they write them, and ``atexit`` handlers (logging's flush among them)
    still run."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError, TrainingStopped) as e:
        sys.exit(f'{os.path.basename(sys.argv[0])}: error: {e}')
    finally:
        gc.freeze()
