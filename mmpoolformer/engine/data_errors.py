"""Bad data, reported by the file and without losing the training done.

A missing or corrupt image surfaces in the middle of training, inside a data loader worker, as the
worker's whole traceback; a corrupt annotation file surfaces while the data set is built, as a JSON
error that does not say which file. :func:`run` turns both into one line that names the file and, when
training had made progress, saves it first (as on SIGTERM), so that after the fix ``--resume`` continues
from the last iteration instead of the last regular checkpoint. In a multi-process run all the
processes stop and save together (:class:`DataErrorSyncHook`).
"""
import json
import os.path as osp
from typing import Iterator, Optional

from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.runner import Runner

from .faults import TrainingStopped, describe_ranks, ranks_where
from .resume import ResumableCheckpointHook

_DATALOADER = osp.join('torch', 'utils', 'data', 'dataloader.py')


class DataError(TrainingStopped):
    """Reading the data set failed; the message names the file and what was wrong with it."""


class _OtherProcessFailed(Exception):
    """Raised in the processes whose batch loaded when another's did not."""


class DataErrorSyncHook(Hook):
    """Stop every process of a multi-process run before the iteration whose batch one of them could
    not load (the others would wait for it in the gradient all-reduce), so that they save the
    iterations done together.

    Before each iteration every process whose batch loaded says so (:func:`ranks_where`); the process
    whose batch did not load says so from :func:`run`, where its error arrives. In a single process
    nothing is exchanged. :func:`~mmpoolformer.engine.build_runner` adds it.
    """

    priority = 'VERY_HIGH'

    def __init__(self):
        self.loading_train_batches = False
        self._before_val = False

    def before_train_epoch(self, runner) -> None:
        self.loading_train_batches = True

    def before_val(self, runner) -> None:
        self._before_val, self.loading_train_batches = self.loading_train_batches, False

    def after_val(self, runner) -> None:
        self.loading_train_batches = self._before_val

    def after_train(self, runner) -> None:
        self.loading_train_batches = False

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        failed = ranks_where(False)
        if failed:
            raise _OtherProcessFailed(f'stopped with {describe_ranks(failed)}, which could not load '
                                      f'its training batch (its error names the file)')

    def report_failure(self) -> bool:
        """Tell the other processes, waiting in :meth:`before_train_iter`, that this one's training
        batch did not load; False if the failure was not in loading a training batch."""
        if not self.loading_train_batches:
            return False
        ranks_where(True)
        return True


def run(runner: Runner, mode: str = 'train') -> None:
    """``runner.train()`` or ``runner.test()``, with data errors raised as :class:`DataError` in every
    process, after saving the iterations done."""
    try:
        getattr(runner, mode)()
    except _OtherProcessFailed as e:
        raise DataError(f'{e}{_save_progress(runner, mode, together=True)}') from None
    except Exception as e:
        if _raised_while_loading_a_batch(e):
            together = _tell_other_processes(runner)
            raise DataError(f'loading the data failed: {_last_line(e)}'
                            f'{_save_progress(runner, mode, together)}') from e
        if _is_json_error(e):
            bad = next(_unreadable_annotation_files(runner.cfg), None)
            if bad is not None:
                raise DataError(f'cannot read annotation file {bad}') from e
        raise


def _tell_other_processes(runner: Runner) -> bool:
    """Whether every process now knows of the failure (see :class:`DataErrorSyncHook`)."""
    hook = next((h for h in runner.hooks if isinstance(h, DataErrorSyncHook)), None)
    return hook.report_failure() if hook is not None else get_world_size() == 1


def _save_progress(runner: Runner, mode: str, together: bool) -> str:
    """Save the iterations completed, if there are any and the processes can save them together."""
    if mode != 'train' or runner.iter == 0 or not (together or get_world_size() == 1):
        return ''
    hook = next((h for h in runner.hooks if isinstance(h, ResumableCheckpointHook)), None)
    if hook is None:
        return ''
    path = hook.save_progress(runner, before_batch=True)
    return (f'; the {runner.iter} iterations done are saved in {path}: fix the data and continue '
            f'with --resume')


def _raised_while_loading_a_batch(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == '__next__' and code.co_filename.endswith(_DATALOADER):
            return True
        tb = tb.tb_next
    return False


def _last_line(error: BaseException) -> str:
    """The error itself, without the traceback a data loader worker wraps it in."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[-1] if lines else ''
    name = type(error).__name__
    return line if line.startswith(f'{name}:') else f'{name}: {line}'


def _is_json_error(error: Optional[BaseException]) -> bool:
    while error is not None:
        if isinstance(error, json.JSONDecodeError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _unreadable_annotation_files(cfg) -> Iterator[str]:
    """``<path> (<reason>)`` of each JSON annotation file the config's data sets name that does not
    parse; read only after a JSON error, to find its file."""
    for split in ('train', 'val', 'test'):
        for path in _annotation_files((cfg.get(f'{split}_dataloader') or {}).get('dataset')):
            try:
                with open(path) as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                yield f'{path} ({e})'


def _annotation_files(dataset) -> Iterator[str]:
    """The JSON annotation files of a data set config, through wrappers (``dataset``, ``datasets``)."""
    if not isinstance(dataset, dict):
        return
    for inner in [dataset.get('dataset')] + list(dataset.get('datasets') or []):
        yield from _annotation_files(inner)
    ann_file = dataset.get('ann_file')
    if isinstance(ann_file, str) and ann_file.endswith('.json'):
        yield osp.join(dataset.get('data_root') or '', ann_file)
