"""Faults that stop training: a checkpoint that cannot be written and a loss that is not finite stop the
run with one line, keep the last good checkpoint, and --resume goes on from it exactly (see
fault_injection.py for the faults injected, tiny_project.py for the project); fp16 loss scaling on
CPU, whose skipped steps are not faults."""
import os
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub
from tiny_project import assert_same_training_state, last_checkpoint

from mmpoolformer.engine import (AmpOptimWrapper, CheckpointSaveError, NonFiniteLossError,
                                 NonFiniteLossHook, ResumableCheckpointHook)
from mmpoolformer.models.weights import read_checkpoint


def checkpoint_files(work_dir):
    return sorted(n for n in os.listdir(work_dir) if n.endswith(('.pth', '.tmp')))


def test_a_checkpoint_that_cannot_be_written_stops_training_and_keeps_the_last_one(
        tiny, uninterrupted, tmp_path):
    config = tiny.config_with('disk_full_in_epoch_2', dict(type='FillTheDisk', epoch=2))
    work_dir = tmp_path / 'work'
    out = tiny.run(tiny.train_cmd(work_dir, config=config), expect=1)
    kept = work_dir / 'epoch_1.pth'
    assert out.strip().splitlines()[-1] == (
        f'train.py: error: saving {work_dir}/epoch_2.pth failed: [Errno 27] File too large; the last '
        f'complete checkpoint, {kept}, is kept and last_checkpoint names it. Training stopped: make '
        f'room or make the directory writable, then continue with --resume '
        f'(ResumableCheckpointHook(stop_on_save_error=False) trains on without the checkpoints)')
    assert checkpoint_files(work_dir) == ['epoch_1.pth']  # the half-written one removed
    assert last_checkpoint(work_dir) == str(kept)
    assert read_checkpoint(str(kept))['meta']['iter'] == tiny.iters_per_epoch

    tiny.run(tiny.train_cmd(work_dir, '--resume'))  # with room again
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', uninterrupted)


def test_training_goes_on_without_checkpoints_only_when_asked(tiny, tmp_path):
    # nor validation nor the scalar log, which write files too
    config = tiny.config_with('disk_full_trains_on', dict(type='FillTheDisk', epoch=2),
                              default_hooks=dict(checkpoint=dict(stop_on_save_error=False)),
                              val_cfg=None, val_dataloader=None, val_evaluator=None,
                              visualizer=dict(vis_backends=[]))
    work_dir = tmp_path / 'work'
    out = tiny.run(tiny.train_cmd(work_dir, config=config))
    for epoch in (2, 3):
        assert (f'saving {work_dir}/epoch_{epoch}.pth failed: [Errno 27] File too large; the last '
                f'complete checkpoint, {work_dir}/epoch_1.pth, is kept and last_checkpoint names it. '
                f'Training goes on (stop_on_save_error=False)') in out
    assert f'Epoch(train) [{tiny.epochs}][4/4]' in out
    assert checkpoint_files(work_dir) == ['epoch_1.pth']
    assert last_checkpoint(work_dir) == str(work_dir / 'epoch_1.pth')


def test_a_non_finite_loss_stops_training_before_its_weights_are_saved(tiny, uninterrupted, tmp_path):
    config = tiny.config_with('nan_in_iteration_6', dict(type='SpoilAWeight', iteration=6))
    work_dir = tmp_path / 'work'
    out = tiny.run(tiny.train_cmd(work_dir, config=config), expect=1)
    kept = work_dir / 'epoch_1.pth'
    assert out.strip().splitlines()[-1] == (
        f'train.py: error: the loss is not finite at iteration 6 (epoch 2): loss=nan, loss_cls=nan, '
        f'loss_bbox=nan; training stopped before saving these weights (the last checkpoint, {kept}, '
        f'is kept). Lower the learning rate or check the data, then continue with --resume')
    assert checkpoint_files(work_dir) == ['epoch_1.pth']
    assert last_checkpoint(work_dir) == str(kept)

    tiny.run(tiny.train_cmd(work_dir, '--resume'))  # without the fault
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', uninterrupted)


def runner_stub(iteration, epoch, last_ckpt=None):
    hub = MessageHub.get_instance(f'faults_{iteration}_{epoch}_{last_ckpt}')
    hub.update_info('last_ckpt', last_ckpt)
    return SimpleNamespace(iter=iteration - 1, epoch=epoch - 1, message_hub=hub)


def test_the_loss_hook_names_every_term_and_passes_finite_losses():
    hook = NonFiniteLossHook()
    finite = dict(loss=torch.tensor(1.5), loss_cls=torch.tensor(1.0), loss_bbox=torch.tensor(0.5),
                  acc=torch.tensor(float('nan')))  # not a loss: mmdet logs accuracies too
    hook.after_train_iter(runner_stub(3, 1), 2, outputs=finite)
    spoilt = dict(loss=torch.tensor(float('inf')), loss_cls=torch.tensor(float('inf')),
                  loss_bbox=[torch.tensor(0.25), torch.tensor(0.5)])
    with pytest.raises(NonFiniteLossError) as error:
        hook.after_train_iter(runner_stub(3, 1), 2, outputs=spoilt)
    assert str(error.value) == (
        'the loss is not finite at iteration 3 (epoch 1): loss=inf, loss_cls=inf, loss_bbox=0.375; '
        'training stopped before saving these weights (no checkpoint was saved). Lower the learning '
        'rate or check the data, then train again')


def test_non_finite_weights_are_never_saved():
    hook = ResumableCheckpointHook()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    runner = SimpleNamespace(model=model)
    hook._refuse_non_finite_weights(runner, 'epoch_2.pth')  # finite: saved
    model[1].running_var[0] = float('inf')
    hook.last_ckpt = 'epoch_1.pth'
    with pytest.raises(CheckpointSaveError) as error:
        hook._refuse_non_finite_weights(runner, 'epoch_2.pth')
    assert str(error.value) == (
        'refusing to save epoch_2.pth: 1 of the 6 tensors of the model are not finite '
        '(1.running_var); the last checkpoint, epoch_1.pth, is kept. Lower the learning rate or '
        'check the data, then continue with --resume')


def test_fp16_loss_scaling_on_cpu_skips_overflowing_steps_and_they_are_not_faults():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    before = model.weight.detach().clone()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              dtype='float16', loss_scale=dict(init_scale=2.0**40))
    x = torch.randn(4, 8)
    with wrapper.optim_context(model):
        out = model(x)
    assert out.dtype == torch.float16  # fp16 autocast on CPU
    loss = out.float().square().mean()
    wrapper.update_params(loss)  # the scaled gradients overflow fp16: the step is skipped
    assert torch.isfinite(loss) and torch.equal(model.weight, before)
    assert wrapper.loss_scaler.get_scale() == 2.0**39
    NonFiniteLossHook().after_train_iter(runner_stub(1, 1), 0, outputs=dict(loss=loss.detach()))

    wrapper.loss_scaler.update(2.0**8)  # a scale that fits: the step is taken
    with wrapper.optim_context(model):
        loss = model(x).float().square().mean()
    wrapper.update_params(loss)
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)


def test_amp_on_cpu_autocasts_in_bf16_by_default():
    model = torch.nn.Linear(8, 8)
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        assert model(torch.randn(2, 8)).dtype == torch.bfloat16


def test_fp32_only_cpu_ops_run_in_fp32_under_cpu_autocast():
    """An autograd Function whose CPU kernel takes fp32 only, wrapped as the AMP wrapper wraps mmcv's
    NMS and RoIAlign: under bf16 autocast it sees fp32, returns the input's dtype, and its backward
    too; without low-precision inputs it is called as it is."""
    from mmpoolformer.engine.amp import in_fp32_on_cpu

    class Fp32Only(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor):
            assert x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            ctx.factor = factor
            return x * factor

        @staticmethod
        def backward(ctx, grad):
            assert grad.dtype == torch.float32
            return grad * ctx.factor, None

    Fp32Only.forward = staticmethod(in_fp32_on_cpu(Fp32Only.forward))
    Fp32Only.backward = staticmethod(in_fp32_on_cpu(Fp32Only.backward))
    x = torch.randn(4, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = Fp32Only.apply(x.bfloat16(), 3.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, torch.full((4, ), 3.0))
    assert Fp32Only.apply(torch.ones(2), 2.0).dtype == torch.float32
