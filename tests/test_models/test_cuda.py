"""The backbones on a CUDA device; skipped where there is none (CI). The kernels' own float64
gradchecks run there too (``tests/test_kernels``, the ``cuda`` cases): ``tools/run_tests.sh -k cuda``.

CUDA computes differently: its own pooling, GroupNorm and LayerNorm kernels, the fused MLP's products
through cuBLAS, and autocast in fp16 with a loss scaler, which is what ``--amp`` gives on a GPU. So
the fused backbones are compared with the formulation as written in float64 on the CPU. TF32 is
turned off for the comparisons in fp32: it rounds products to 10 bits of mantissa, which is a choice
of speed, not an error of ours.
"""
import copy

import pytest
import torch

from mmpoolformer import kernels
from mmpoolformer.models import CAFormer, ConvFormer, PoolFormer, PoolFormerV2
from mmpoolformer.testing import max_rel_err, randomize_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
DEVICE = 'cuda'
LAYOUTS = dict(contiguous=torch.contiguous_format, channels_last=torch.channels_last)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run(model, x, plan):
    """Outputs, the input's gradient and every parameter's, computed with ``plan``."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    with kernels.forced(plan):
        outs = model(x)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)
               for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs, x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('layout', LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize('cls', [PoolFormer, PoolFormerV2, ConvFormer, CAFormer],
                         ids=lambda cls: cls.__name__)
def test_fused_backbones_equal_the_formula_as_written(cls, layout):
    """In float64 the fused and the plain formulation agree to rounding (1e-10). In fp32 the fused one
    is within the CPU tests' bounds of the float64 result (1e-5 for outputs and the input's gradient,
    2e-5 for parameters'), or no further from it than twice the plain fp32 formulation. A scalar
    parameter (StarReLU's scale and bias) gets 1e-3: its gradient sums terms of both signs over every
    activation of a block, so the rounding of the terms, whichever order computed them, is amplified
    by the cancellation (up to 1.2e-4 on the CPU)."""
    model = randomize_weights(cls(arch=next(iter(cls.arch_zoo)))).train()
    x = torch.randn(2, 3, 61, 45).contiguous(memory_format=layout)
    # the reference: the formulation as written, in float64, on the CPU (CUDA's own pooling and norm
    # kernels are under test too)
    exact = run(copy.deepcopy(model).double(), x.double(), kernels.PLAIN)
    model.to(DEVICE).double()
    x = x.to(DEVICE)
    fused64 = run(model, x.double(), kernels.Plan())
    model.float()
    fused32, plain32 = run(model, x, kernels.Plan()), run(model, x, kernels.PLAIN)

    def flat(result):  # name -> tensor on the CPU, the input's gradient and the outputs included
        outs, grad_x, grads = result
        named = {**{f'out{i}': o for i, o in enumerate(outs)}, 'grad_x': grad_x, **grads}
        return {name: t.cpu() for name, t in named.items()}

    exact, fused64, fused32, plain32 = map(flat, (exact, fused64, fused32, plain32))
    for name, ref in exact.items():
        if name.endswith('norm1.bias') and cls is PoolFormer:
            continue  # cancelled by pooling: zero fused, rounding noise as written
        assert max_rel_err(fused64[name], ref) <= 1e-10, name
        bound = 1e-5 if name.startswith(('out', 'grad_x')) else 1e-3 if ref.numel() == 1 else 2e-5
        assert max_rel_err(fused32[name], ref) <= max(bound, 2 * max_rel_err(plain32[name], ref)), name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_autocast_training_steps_stay_finite_and_track_fp32(dtype):
    """A few optimizer steps under autocast (fp16 with a loss scaler, as ``--amp`` runs on a GPU)
    follow the fp32 ones: every loss and gradient finite, the losses within 2%."""
    torch.manual_seed(0)
    init = PoolFormer('s12', out_indices=(0, 1, 2, 3)).to(DEVICE).train()
    x = torch.randn(2, 3, 128, 96, device=DEVICE)
    targets = [torch.randn(o.shape, device=DEVICE) for o in init(x)]
    histories = []
    for amp in (None, dtype):
        model = copy.deepcopy(init)
        optim = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler(DEVICE, enabled=amp == torch.float16)
        losses = []
        for _ in range(4):
            with torch.autocast(DEVICE, dtype=amp or torch.float32, enabled=amp is not None):
                loss = sum(((o.float() - t)**2).mean() for o, t in zip(model(x), targets))
            optim.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(optim)
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            scaler.step(optim)
            scaler.update()
            losses.append(loss.item())
        histories.append(losses)
    fp32, low = histories
    assert low[-1] < low[0]
    for a, b in zip(low, fp32):
        assert abs(a - b) <= 2e-2 * abs(b)


AMP_WRAPPER = 'AmpOptimWrapper'  # mmengine's, as the configs' --amp gives it on a GPU


def mmcv_ops_run_on_cuda() -> bool:
    """Whether mmcv's compiled ops here were built with CUDA (``tools/setup_env.sh --gpu``)."""
    if not torch.cuda.is_available():
        return False
    try:
        from mmcv.ops import nms
        boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]], device=DEVICE)
        nms(boxes, torch.tensor([0.9, 0.8], device=DEVICE), 0.5)
        return True
    except Exception:  # noqa: BLE001  (not built, or without CUDA)
        return False


@pytest.mark.skipif(not mmcv_ops_run_on_cuda(), reason="mmcv's ops without CUDA")
@pytest.mark.parametrize('config, dtype', [
    ('detection/retinanet_poolformer_s12.py', torch.float16),
    ('detection/mask_rcnn_poolformer_s12.py', torch.float16),
    ('segmentation/fpn_poolformer_s12.py', torch.bfloat16),
])
def test_whole_models_train_and_predict_on_cuda(config, dtype):
    """The paper's detectors and segmentor on CUDA: three training iterations through mmengine's AMP
    optimizer wrapper (as ``--amp`` runs them; fp16 with a loss scaler, here starting at 2^10 so that
    no step is skipped for overflow) with finite losses, parameters that moved and stayed finite,
    then a prediction per image."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope

    from mmpoolformer import config_path
    cfg = Config.fromfile(config_path(config))
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    cfg.model.backbone.init_cfg = None  # no download in tests
    model = MODELS.build(cfg.model)
    model.init_weights()  # (as the runner does: RetinaNet's classification prior, or fp16 overflows)
    model = model.to(DEVICE)
    optim = build_optim_wrapper(model, dict(cfg.optim_wrapper, type=AMP_WRAPPER, dtype=dtype,
                                            loss_scale=dict(init_scale=2.**10)))
    if scope == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        samples = []
        for _ in range(2):
            sample = SegDataSample(metainfo=dict(img_shape=(256, 256), ori_shape=(256, 256)))
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 256, 256)))
            samples.append(sample)
        data = dict(inputs=[torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)] * 2,
                    data_samples=samples)
    else:
        from mmdet.testing import demo_mm_inputs
        data = demo_mm_inputs(batch_size=2, image_shapes=[(3, 320, 416), (3, 288, 352)],
                              num_items=[3, 1], num_classes=80, with_mask='mask' in config)
    model.train()
    before = copy.deepcopy(model.backbone.state_dict())
    for _ in range(3):
        losses = model.train_step(data, optim)
        assert all(torch.isfinite(v).all() for v in losses.values()), losses
    after = model.backbone.state_dict()
    assert all(torch.isfinite(t).all() for t in after.values())
    assert not torch.equal(before['patch_embed.proj.weight'], after['patch_embed.proj.weight'])
    model.eval()
    assert len(model.test_step(data)) == 2
