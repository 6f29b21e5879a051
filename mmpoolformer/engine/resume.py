"""Training that survives being killed: atomic checkpoints, exact resumption, a checkpoint on SIGTERM.

mmengine 0.10.7's ``CheckpointHook`` and ``Runner.resume`` restore the model, the optimizer, the
schedulers and the counters, but

* write a checkpoint and ``last_checkpoint`` in place, so a job killed while writing leaves a truncated
  file that ``--resume`` then picks, and remove the oldest checkpoint before the new one exists;
* keep no state of the random number generators (Python, NumPy, torch), so a resumed run flips other
  images and samples other proposals than the run it continues;
* start an unfinished epoch again from its first batch;
* die on SIGTERM, which slurm sends some time before it kills a job, without saving.

:class:`ResumableCheckpointHook` is mmengine's ``CheckpointHook`` without these four gaps. ``build_runner``
puts it in place of the checkpoint hook of any config; a run started with mmdet's or mmseg's own
``train.py`` gets it from the config with
``default_hooks = dict(checkpoint=dict(type='mmpoolformer.ResumableCheckpointHook'))``.
"""
import os
import os.path as osp
import random
import re
import signal
from collections import deque
from itertools import islice
from typing import List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop

from ..registry import HOOKS
from .faults import TrainingStopped, describe_ranks, ranks_where

ATOMIC_BACKEND = 'mmpoolformer_atomic_local'
RANDOM_STATE_KEY = 'random_state'
_TEMPORARY = re.compile(r'^\..+\.\d+\.tmp$')


def atomic_write(data: bytes, path: str) -> None:
    """Write ``path`` so that it is, at every moment, either as it was or complete.

    The bytes go to a hidden temporary file next to ``path`` (the same file system, so that the rename
    is atomic), reach the disk, and only then are renamed over ``path``. A kill at any point leaves at
    most a stray ``.<name>.<pid>.tmp``, which :class:`ResumableCheckpointHook` removes when training
    starts again.
    """
    directory = osp.dirname(path) or '.'
    os.makedirs(directory, exist_ok=True)
    temporary = osp.join(directory, f'.{osp.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(temporary, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if osp.exists(temporary):
            os.remove(temporary)
        raise


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing through :func:`atomic_write`; the checkpoint hook names it
    in ``backend_args`` so that ``Runner.save_checkpoint`` writes with it."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(obj, str(filepath))

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(obj.encode(encoding), str(filepath))


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


class CheckpointSaveError(TrainingStopped):
    """A checkpoint could not be written, or would have held non-finite weights."""


def capture_random_state() -> dict:
    """The state of every generator that augmentation and models draw from in this process, as tensors
    and plain numbers, which a weights-only checkpoint read accepts."""
    version, python_state, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = dict(
        python=dict(version=version, state=torch.tensor(python_state, dtype=torch.int64),
                    gauss_next=gauss_next),
        numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict) -> None:
    """Put the generators back as :func:`capture_random_state` found them."""
    python = state['python']
    random.setstate((python['version'], tuple(python['state'].tolist()), python['gauss_next']))
    numpy = state['numpy']
    np.random.set_state(('MT19937', numpy['keys'].cpu().numpy().astype(np.uint32), numpy['pos'],
                         numpy['has_gauss'], numpy['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


class _ResumeWithinEpoch:
    """The batch sampler of the epoch that a run resumes in the middle of.

    Its first pass skips the batches the interrupted run had trained on (indices only: no image is
    loaded) and restores ``random_state`` (if any) just before the first batch left is drawn, which is
    where the interrupted run's generators were when it saved. Later passes are the wrapped sampler's
    own.
    """

    def __init__(self, batch_sampler, skip: int, random_state: Optional[dict]):
        self.batch_sampler = batch_sampler
        self._skip = skip
        self._random_state = random_state
        self._first_pass = True

    def __iter__(self):
        batches = iter(self.batch_sampler)
        if self._first_pass:
            self._first_pass = False
            deque(islice(batches, self._skip), maxlen=0)
            if self._random_state is not None:
                restore_random_state(self._random_state)
        yield from batches

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name):
        # mmengine reaches the sampler through the batch sampler (``batch_sampler.sampler.set_epoch``)
        if name == 'batch_sampler':
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


@HOOKS.register_module()
class ResumableCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook``, for jobs that are pre-empted and killed.

    * Checkpoints on the local disk and ``last_checkpoint`` are written atomically
      (:func:`atomic_write`), and an outdated checkpoint is removed only once the new one is complete,
      so ``--resume`` always finds a whole checkpoint.
    * Each checkpoint holds the random generator states of every process (``random_state``); resuming
      restores them where the interrupted run was, and validation leaves them as it found them (an
      uninterrupted run validates between epochs where a resumed one does not). With
      ``randomness=dict(seed=..., deterministic=True)`` a resumed run then ends with the weights of an
      uninterrupted one, exactly, on CPU.
    * A run resumed from the middle of an epoch skips the batches the interrupted run trained on
      instead of starting the epoch again.
    * On SIGTERM the run finishes the iteration, saves ``iter_<n>.pth`` (removed again once a later
      checkpoint is complete) and exits with status 0; ``--resume`` continues from it. In a
      multi-process run every process stops after the same iteration, whichever got the signal.
    * A write that fails (a full disk, a directory that cannot be written) keeps the previous
      checkpoint and ``last_checkpoint`` as they were and stops training in every process with a line
      that names the file and the error; weights that are not finite are never saved.

    Args:
        save_on_sigterm (bool): Save and exit on SIGTERM; False leaves SIGTERM's default (the process
            dies). Defaults to True.
        stop_on_save_error (bool): Stop training when a checkpoint cannot be written; False logs it
            and trains on without that checkpoint. A save on SIGTERM or bad data, being the last,
            always raises. Defaults to True.
        **kwargs: ``CheckpointHook``'s arguments. Unless ``backend_args`` names a backend, a local
            ``out_dir`` is written atomically.
    """

    def __init__(self, *args, save_on_sigterm: bool = True, stop_on_save_error: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.save_on_sigterm = save_on_sigterm
        self.stop_on_save_error = stop_on_save_error
        self._sigterm_received = False
        self._previous_sigterm_handler = None
        self._random_states: Optional[List[dict]] = None  # all processes', for the save under way
        self._loaded = None  # (meta, random states) of the checkpoint loaded, until training starts
        self._restore_before_next_batch: Optional[dict] = None
        self._state_before_val: Optional[dict] = None
        self._saved_iter: Optional[int] = None  # the iterations done when the last checkpoint was saved
        self._state_before_batch: Optional[dict] = None  # before the batch being loaded was drawn

    # ------------------------------------------------------------------ start and end of training
    def before_train(self, runner) -> None:
        out_dir = str(self.out_dir or runner.work_dir)
        if self.backend_args is None and self.file_client_args is None and '://' not in out_dir:
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        super().before_train(runner)
        if is_main_process():
            self._remove_temporaries(runner)
        self._continue_loaded_run(runner)
        if self.save_on_sigterm:
            self._previous_sigterm_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def after_train(self, runner) -> None:
        super().after_train(runner)
        if self._previous_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._previous_sigterm_handler = None

    def _remove_temporaries(self, runner) -> None:
        """Writes that a kill interrupted: never read, only in the way."""
        for directory in {runner.work_dir, str(self.out_dir)}:
            if osp.isdir(directory):
                for name in os.listdir(directory):
                    if _TEMPORARY.match(name):
                        os.remove(osp.join(directory, name))

    # ------------------------------------------------------------------ resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # A checkpoint is loaded both to resume and as initial weights (load_from); which of the two
        # it was is known only once the runner has set its counters, in before_train.
        self._loaded = (checkpoint.get('meta') or {}, checkpoint.get(RANDOM_STATE_KEY))

    def _continue_loaded_run(self, runner) -> None:
        if self._loaded is None:
            return
        meta, states = self._loaded
        self._loaded = None
        if runner.iter == 0 or runner.iter != meta.get('iter'):
            return  # weights to start from, not a run to continue
        state = self._own_random_state(runner, states)
        loop = runner.train_loop
        done = (runner.iter - runner.epoch * len(loop.dataloader)
                if isinstance(loop, EpochBasedTrainLoop) else 0)
        if done > 0:
            dataloader = loop.dataloader
            if dataloader.batch_sampler is None:
                runner.logger.warning('resuming in the middle of an epoch needs a batch sampler; '
                                      'the epoch starts again from its first batch')
                self._restore_before_next_batch = state
                return
            # DataLoader refuses a new batch sampler once built; the iterators it makes read this one
            object.__setattr__(
                dataloader, 'batch_sampler',
                _ResumeWithinEpoch(dataloader.batch_sampler, done, state))
            runner.logger.info(f'resuming within epoch {runner.epoch + 1}: skipping the {done} '
                               f'batches trained on before the interruption')
        else:
            self._restore_before_next_batch = state

    def _own_random_state(self, runner, states) -> Optional[dict]:
        if not states:
            runner.logger.warning('the checkpoint holds no random generator states (saved without '
                                  'ResumableCheckpointHook): augmentation and sampling continue '
                                  'differently from the interrupted run')
            return None
        if len(states) != get_world_size():
            runner.logger.warning(f'the checkpoint holds the random generator states of '
                                  f'{len(states)} processes, this run has {get_world_size()}: '
                                  f'they are not restored')
            return None
        return states[get_rank()]

    def before_train_epoch(self, runner) -> None:
        self._restore_pending()
        self._state_before_batch = capture_random_state()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        # iteration-based loops have no epochs; they call this after replaying the batches done
        self._restore_pending()

    def _restore_pending(self) -> None:
        if self._restore_before_next_batch is not None:
            restore_random_state(self._restore_before_next_batch)
            self._restore_before_next_batch = None

    def before_val(self, runner) -> None:
        self._state_before_val = capture_random_state()

    def after_val(self, runner) -> None:
        if self._state_before_val is not None:
            restore_random_state(self._state_before_val)
            self._state_before_val = None

    # ------------------------------------------------------------------ saving
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # runs in the main process only; a checkpoint saved outside _save (e.g. the best one) holds
        # the main process's state alone
        checkpoint[RANDOM_STATE_KEY] = self._random_states or [capture_random_state()]

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        hub = runner.message_hub
        kept = list(self.keep_ckpt_ids) if self.max_keep_ckpts > 0 else []
        keep = list(kept)
        if self.max_keep_ckpts > 0 and not (keep and keep[-1] == step):
            # recorded before saving, so that the checkpoint knows itself and, if the run is killed
            # before the outdated file below is removed, the resumed run removes it
            keep.append(step)
            hub.update_info('keep_ckpt_ids', keep)
        if not self._save(runner, self.filename_tmpl.format(step), meta, by_epoch=self.by_epoch):
            if self.max_keep_ckpts > 0:
                hub.update_info('keep_ckpt_ids', kept)
            return
        if self.max_keep_ckpts > 0:
            while len(keep) > self.max_keep_ckpts:
                self._remove(self.filename_tmpl.format(keep.pop(0)))
            self.keep_ckpt_ids = deque(keep, self.max_keep_ckpts)
            hub.update_info('keep_ckpt_ids', keep)

    def _save(self, runner, filename: str, meta: dict, by_epoch: bool, preemption: bool = False,
              random_state: Optional[dict] = None) -> bool:
        """Save ``filename`` with every process's generator states, then point ``last_checkpoint`` at
        it and remove the previous pre-emption checkpoint, which it supersedes.

        Returns whether it saved: a write that fails (a full disk, a directory that cannot be
        written) leaves the previous checkpoint and ``last_checkpoint`` as they were and raises
        :class:`CheckpointSaveError` in every process, or with ``stop_on_save_error=False`` logs it
        and returns False.
        """
        path = self.file_backend.join_path(self.out_dir, filename)
        self._refuse_non_finite_weights(runner, path)
        hub = runner.message_hub
        # the checkpoint names itself: mmengine's resume reads these back from it
        before = {key: hub.get_info(key) for key in ('preemption_checkpoint', 'last_ckpt')}
        hub.update_info('preemption_checkpoint', path if preemption else None)
        hub.update_info('last_ckpt', path)
        # in the middle of validation, the state that training continues with is the one before it
        state = random_state or self._state_before_val or capture_random_state()
        self._random_states = all_gather_object(state) if get_world_size() > 1 else [state]
        error = None
        try:
            runner.save_checkpoint(  # writes in the main process only
                self.out_dir, filename, self.file_client_args, save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=by_epoch,
                backend_args=self.backend_args, **self.args)
            if is_main_process():
                atomic_write(path.encode(), osp.join(runner.work_dir, 'last_checkpoint'))
        except OSError as e:
            error = e
        finally:
            self._random_states = None
        failed = ranks_where(error is not None)
        if failed:
            for key, value in before.items():
                hub.update_info(key, value)
            # a save on SIGTERM or bad data is the last: nothing to go on to
            self._report_failed_save(runner, path, error, failed,
                                     stop=self.stop_on_save_error or preemption)
            return False
        self.last_ckpt = path
        self._saved_iter = meta['iter']
        superseded = before['preemption_checkpoint']
        if superseded and superseded != path:
            self._remove(osp.basename(superseded))
        return True

    def _report_failed_save(self, runner, path: str, error: Optional[OSError], ranks: List[int],
                            stop: bool) -> None:
        if error is None:
            what = f'saving {path} failed in {describe_ranks(ranks)}'
        else:
            reason = f'[Errno {error.errno}] {error.strerror}' if error.strerror else str(error)
            what = f'saving {path} failed: {reason}'
        last = self.last_ckpt
        kept = (f'the last complete checkpoint, {last}, is kept and last_checkpoint names it' if last
                else 'no checkpoint was saved before')
        if stop:
            raise CheckpointSaveError(
                f'{what}; {kept}. Training stopped: make room or make the directory writable, then '
                f'continue with --resume (ResumableCheckpointHook(stop_on_save_error=False) trains on '
                f'without the checkpoints)')
        runner.logger.warning(f'{what}; {kept}. Training goes on (stop_on_save_error=False)')

    def _refuse_non_finite_weights(self, runner, path: str) -> None:
        """Never save NaN or infinite weights: they would replace the last good checkpoint."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
        spoilt = [name for name, t in tensors if not torch.isfinite(t).all()]
        ranks = ranks_where(bool(spoilt))
        if not ranks:
            return
        what = (f'{len(spoilt)} of the {len(tensors)} tensors of the model are not finite '
                f'({", ".join(spoilt[:3])}{", ..." if len(spoilt) > 3 else ""})' if spoilt else
                f'the model of {describe_ranks(ranks)} is not finite')
        last = self.last_ckpt
        kept = f'the last checkpoint, {last}, is kept' if last else 'no checkpoint was saved'
        raise CheckpointSaveError(f'refusing to save {path}: {what}; {kept}. Lower the learning rate '
                                 f'or check the data, then continue with --resume')

    def _remove(self, filename: str) -> None:
        if not is_main_process():
            return
        path = self.file_backend.join_path(self.out_dir, filename)
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # deepspeed saves directories
            self.file_backend.rmtree(path)

    # ------------------------------------------------------------------ SIGTERM
    def _on_sigterm(self, signum, frame) -> None:
        # only a flag: the iteration under way finishes, and after_train_iter saves
        self._sigterm_received = True

    def save_progress(self, runner, done: Optional[int] = None, before_batch: bool = False) -> str:
        """Save the training done so far (``done`` iterations, by default all the runner counted) as
        ``iter_<done>.pth``, unless the last checkpoint already holds it, and return its path. The file
        is removed once a later checkpoint is complete.

        ``before_batch``: a batch was being loaded (and failed); the generators are saved as they were
        before it was drawn, where the resumed run will draw it again."""
        done = runner.iter if done is None else done
        if self._saved_iter != done:
            self._save(runner, f'iter_{done}.pth', dict(epoch=runner.epoch, iter=done),
                       by_epoch=False, preemption=True,
                       random_state=self._state_before_batch if before_batch else None)
        return self.last_ckpt

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        if not self._stop_requested():
            self._state_before_batch = capture_random_state()
            return
        done = runner.iter + 1  # the loop counts this iteration once the hooks have run
        path = self.save_progress(runner, done)
        runner.logger.info(f'SIGTERM: saved {path} after iteration {done}; exiting. Continue with '
                           f'--resume.')
        raise SystemExit(0)

    def _stop_requested(self) -> bool:
        """Whether any process got SIGTERM: all stop at the same iteration, or the others would wait
        for them in the next all-reduce."""
        return bool(ranks_where(self._sigterm_received))
