"""MetaFormer backbones for dense prediction, and PoolFormer, the MetaFormer with a pooling mixer.

The data path, as in Yu et al. (CVPR 2022)::

    image -> stem (7x7 conv, stride 4) -> stage 0 -> down (3x3 conv, stride 2) -> stage 1 -> ... -> stage 3
                                             |                                      |
                                           norm0                                  norm2   ...  (emitted)

A stage is a stack of MetaFormer blocks, ``x = x + ls1 * mixer(norm1(x)); x = x + ls2 * mlp(norm2(x))``,
and only the token mixer changes between family members (chosen per stage, see ``token_mixers.py``).

Module names follow the official release (``patch_embed``, ``network.{0..6}``, ``norm{0,2,4,6}``; stages
at even and downsampling at odd ``network`` positions), so the released ImageNet, COCO and ADE20K weights
load without renaming; ``weights.py`` maps timm's and mmpretrain's layouts onto it. As in the official
hybrids, a stage with a position embedding has it as its own ``network`` entry just before the stage,
which shifts the later entries by one (``metaformer_ppaa_s12_224``: stage 2 is ``network.5``).
"""
import copy
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..kernels import conv2d, norm_mlp_residual, to_nchw
from ..registry import MODELS
from .arguments import check_arguments
from .layers import add_residual, build_act, build_norm
from .token_mixers import build_token_mixer
from .weights import load_pretrained


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for a whole sample, rescaling the kept ones."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def factors(self, x) -> Optional[torch.Tensor]:
        """This step's per-sample factors, ``(N, 1, ..., 1)``: 0 or ``1 / keep``; None when inactive."""
        if not self.training or self.drop_prob == 0.:
            return None
        keep = 1. - self.drop_prob
        return x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def forward(self, x):
        factors = self.factors(x)
        return x if factors is None else x * factors

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class PatchEmbed(nn.Module):
    """A strided convolution: the stem (7x7, stride 4) and the downsampling between stages (3x3, 2).

    The MetaFormer Baselines normalise around it: after the stem's convolution (``post_norm``) and
    before each downsampling one (``pre_norm``); PoolFormer does neither.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding,
                 pre_norm_cfg: Optional[dict] = None, post_norm_cfg: Optional[dict] = None):
        super().__init__()
        self.pre_norm = None if pre_norm_cfg is None else build_norm(pre_norm_cfg, in_channels)
        # stored channels-last, like the maps it convolves: otherwise each call copies the weight
        # into that layout (forward, the input's gradient) and its gradient out of it
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding).to(
            memory_format=torch.channels_last)
        self.post_norm = None if post_norm_cfg is None else build_norm(post_norm_cfg, out_channels)

    def forward(self, x):
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = conv2d(self.proj, x)
        return x if self.post_norm is None else self.post_norm(x)


class PositionEmbedding(nn.Module):
    """A learned position embedding added to a stage's input (the official hybrids' ``AddPositionEmb``;
    parameter ``pos_embed`` of shape ``(1, C, h, w)``).

    It is learned for one token grid. On another grid (detection and segmentation inputs, odd sizes)
    it is resized bicubically to the actual grid, as ViT-style detectors do; on its own grid it is
    added as it is.

    Args:
        dim (int): Channels of the stage.
        size (tuple[int, int]): The token grid ``(h, w)`` it is learned for, e.g. (14, 14) for stage 2
            of a 224x224 input.
    """

    def __init__(self, dim: int, size: Sequence[int]):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *size))

    def forward(self, x):
        pos_embed = self.pos_embed
        if pos_embed.shape[2:] != x.shape[2:]:
            pos_embed = F.interpolate(pos_embed, size=x.shape[2:], mode='bicubic', align_corners=False)
        return x + pos_embed


class Mlp(nn.Module):
    """The channel MLP of a block: two 1x1 convolutions around an activation.

    As a residual branch after a GroupNorm or a channel LayerNorm it has a fused kernel
    (``kernels.mlp``: norm, products, activation, scales and residual in token chunks over the
    channels-last map, which keeps only the block's input and hidden map for backward).
    """

    def __init__(self, dim, hidden_dim, act_cfg, drop=0., bias=True):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias)
        self.act = build_act(act_cfg)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=bias)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def fused_residual(self, x, norm, layer_scale, res_scale, factors, plain, overwrite=False):
        """See :meth:`MetaFormerBlock.residual`."""
        if isinstance(self.drop, nn.Dropout):
            return plain(x)
        return norm_mlp_residual(x, norm, self.fc1, self.act, self.fc2, layer_scale, res_scale,
                                 factors, plain, overwrite)


class MetaFormerBlock(nn.Module):
    """``x = rs1 * x + ls1 * mixer(norm1(x))``, then ``x = rs2 * x + ls2 * mlp(norm2(x))``.

    PoolFormer scales the branches (LayerScale ``ls``); the MetaFormer Baselines scale the residual
    instead in their last two stages (ResScale ``rs``). Either is a learned per-channel vector, or
    absent (a factor of one, no parameter).

    Args:
        dim (int): Channels.
        token_mixer (nn.Module): The spatial mixer, already built for ``dim``.
        mlp_ratio (float): Hidden width of the MLP relative to ``dim``.
        norm_cfg (dict): Normalisation before the mixer and before the MLP.
        act_cfg (dict): Activation inside the MLP.
        mlp_bias (bool): Biases in the MLP's two layers. Defaults to True.
        drop (float): Dropout inside the MLP.
        drop_path (float): Stochastic-depth rate of both residual branches.
        layer_scale_init_value (float, optional): Initial LayerScale of both branches; None disables
            it. Defaults to 1e-5.
        res_scale_init_value (float, optional): Initial ResScale of both residuals; None (default)
            disables it.
    """

    def __init__(self,
                 dim: int,
                 token_mixer: nn.Module,
                 mlp_ratio: float = 4.,
                 norm_cfg: dict = dict(type='GN', num_groups=1),
                 act_cfg: dict = dict(type='GELU'),
                 mlp_bias: bool = True,
                 drop: float = 0.,
                 drop_path: float = 0.,
                 layer_scale_init_value: Optional[float] = 1e-5,
                 res_scale_init_value: Optional[float] = None):
        super().__init__()
        self.norm1 = build_norm(norm_cfg, dim)
        self.token_mixer = token_mixer
        self.norm2 = build_norm(norm_cfg, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_cfg, drop, bias=mlp_bias)
        self.drop_path = DropPath(drop_path)
        self.use_layer_scale = layer_scale_init_value is not None
        if self.use_layer_scale:
            self.layer_scale_1 = nn.Parameter(torch.full((dim, ), float(layer_scale_init_value)))
            self.layer_scale_2 = nn.Parameter(torch.full((dim, ), float(layer_scale_init_value)))
        self.use_res_scale = res_scale_init_value is not None
        if self.use_res_scale:
            self.res_scale_1 = nn.Parameter(torch.full((dim, ), float(res_scale_init_value)))
            self.res_scale_2 = nn.Parameter(torch.full((dim, ), float(res_scale_init_value)))

    def forward(self, x):
        ls1, ls2 = (self.layer_scale_1, self.layer_scale_2) if self.use_layer_scale else (None, None)
        rs1, rs2 = (self.res_scale_1, self.res_scale_2) if self.use_res_scale else (None, None)
        mixed = self.residual(x, self.norm1, self.token_mixer, ls1, rs1)
        # the mixer's residual is a new map, the block's own: the MLP's may be written over it
        owned = mixed is not x and not mixed._is_view()
        return self.residual(mixed, self.norm2, self.mlp, ls2, rs2, overwrite=owned)

    def residual(self, x, norm, branch, layer_scale, res_scale=None, overwrite=False):
        """``res_scale * x + drop_path(layer_scale * branch(norm(x)))``.

        A branch that can compute this faster than as written, fused with the norm and the residual
        add, has a method ``fused_residual(x, norm, layer_scale, res_scale, factors, plain)``:
        ``factors`` are stochastic depth's per-sample factors for this step (or None), ``plain(x)`` is
        this formula as written, which the branch returns wherever its kernel does not apply or does
        not pay. With ``overwrite`` (the MLP's, see :meth:`forward`) it is also given
        ``overwrite=True``: ``x`` is the block's own temporary, which the kernel may write its result
        over where nothing records gradients (inference).
        """
        factors = self.drop_path.factors(x)

        def plain(x):
            return add_residual(x, branch(norm(x)), layer_scale, res_scale, factors)

        fused = getattr(branch, 'fused_residual', None)
        if fused is None:
            return plain(x)
        if overwrite:
            return fused(x, norm, layer_scale, res_scale, factors, plain, overwrite=True)
        return fused(x, norm, layer_scale, res_scale, factors, plain)


_ARCH_KEYS = {'depths', 'embed_dims', 'mlp_ratios', 'layer_scale_init_value', 'res_scale_init_values'}


class _FamilyDefault:
    """The default of an argument whose value differs between families: the family's own, from the
    class's ``family_defaults`` table."""

    def __repr__(self) -> str:
        return 'FAMILY_DEFAULT'


FAMILY_DEFAULT = _FamilyDefault()


@MODELS.register_module()
@check_arguments
class MetaFormer(BaseModule):
    """A four-stage MetaFormer backbone whose token mixer is a plug-in, chosen per stage.

    A family of MetaFormers (PoolFormer here, the MetaFormer Baselines in ``baselines.py``) is this
    class with two tables: ``arch_zoo``, its sizes, and ``family_defaults``, the settings it fixes
    unless a config says otherwise (mixers, norms, activation, ...).

    Args:
        arch (str | dict): A name from ``arch_zoo`` or a dict with ``depths`` and ``embed_dims`` (one
            entry per stage) and optionally ``mlp_ratios`` (a number or one per stage),
            ``layer_scale_init_value`` (None disables LayerScale) and ``res_scale_init_values`` (a
            number, None, or one of either per stage; None disables ResScale); the family's
            ``arch_defaults`` fill what is left out.
        token_mixers (dict | list[dict], optional): Registered mixer configs (see
            ``token_mixers.py``), one for all stages or one per stage. Each is built with ``dim`` set
            to its stage's channels. Defaults to the family's (pooling, size 3, for PoolFormer).
        in_channels (int): Input image channels. Defaults to 3.
        norm_cfg (dict): Normalisation in the blocks: ``GN`` (the paper's modified LayerNorm,
            ``GroupNorm(1, C)``, PoolFormer's default), ``LN2d`` (channel LayerNorm), ``BN``,
            ``SyncBN``; ``GN`` and ``LN2d`` take ``bias=False`` and ``eps``.
        act_cfg (dict): MLP activation: ``GELU`` (PoolFormer's default), ``ReLU``, ``SiLU``,
            ``StarReLU``.
        mlp_bias (bool): Biases in the MLPs. Defaults to the family's (True for PoolFormer).
        downsample_norm_cfg (dict, optional): A norm after the stem's convolution and before each
            downsampling convolution, as in the MetaFormer Baselines; None (PoolFormer's default):
            none.
        out_norm_cfg (dict, optional): The norm of each emitted map, one per stage listed in
            ``out_indices`` (``norm{2 * i}``); None emits the raw stage outputs (for necks that
            normalise themselves, and for comparisons). Defaults to the family's; PoolFormer's is
            ``norm_cfg``.
        drop_rate (float): Dropout in the MLPs. Defaults to 0.
        drop_path_rate (float): Stochastic depth, rising linearly from 0 at the first block to this
            value at the last. Defaults to 0.
        use_layer_scale (bool): LayerScale on both residual branches of every block (the paper's
            ablation switch); False builds no LayerScale parameter at all. Defaults to True, with the
            arch's ``layer_scale_init_value`` (None in the Baselines' archs).
        pos_embed_sizes (list, optional): One entry per stage: None, or the token grid ``(h, w)`` of a
            learned position embedding added to the stage's input (the official attention hybrids
            add one to their first attention stage). See :class:`PositionEmbedding` for other grids.
        out_indices (Sequence[int]): Stages (0-3) whose outputs are emitted. Stages after the last
            one listed are not built, so every parameter takes part in the forward pass. Defaults to
            all four.
        frozen_stages (int): -1 freezes nothing; 0 freezes the stem; k >= 1 freezes the stem and stages
            0 .. k-1 with their downsampling layers and output norms (mmdet's ResNet / Swin convention).
        norm_eval (bool): Keep BatchNorm layers in eval mode while training (no effect on GroupNorm /
            LayerNorm, which have no running statistics). Defaults to False.
        with_cp (bool): Recompute each block in the backward pass instead of storing its activations.
        init_cfg (dict | list[dict], optional): ``dict(type='Pretrained', checkpoint=PATH_OR_URL)``
            loads released weights in the official, timm, mmpretrain or sail-sg/metaformer layout
            (recognised automatically; classifier keys dropped; missing and unexpected keys logged).
    """

    # The paper's sizes (Table 1); they describe the MetaFormer, whatever its mixer.
    arch_zoo = {
        's12': dict(depths=[2, 2, 6, 2], embed_dims=[64, 128, 320, 512], layer_scale_init_value=1e-5),
        's24': dict(depths=[4, 4, 12, 4], embed_dims=[64, 128, 320, 512], layer_scale_init_value=1e-5),
        's36': dict(depths=[6, 6, 18, 6], embed_dims=[64, 128, 320, 512], layer_scale_init_value=1e-6),
        'm36': dict(depths=[6, 6, 18, 6], embed_dims=[96, 192, 384, 768], layer_scale_init_value=1e-6),
        'm48': dict(depths=[8, 8, 24, 8], embed_dims=[96, 192, 384, 768], layer_scale_init_value=1e-6),
    }
    arch_defaults = dict(mlp_ratios=4, layer_scale_init_value=1e-5, res_scale_init_values=None)
    # No ``out_norm_cfg``: the emitted maps take ``norm_cfg``, whatever it is.
    family_defaults = dict(
        token_mixers=dict(type='Pooling', pool_size=3),
        norm_cfg=dict(type='GN', num_groups=1),
        act_cfg=dict(type='GELU'),
        mlp_bias=True,
        downsample_norm_cfg=None)

    def __init__(self,
                 arch: Union[str, dict] = 's12',
                 token_mixers: Optional[Union[dict, List[dict]]] = FAMILY_DEFAULT,
                 in_channels: int = 3,
                 norm_cfg: dict = FAMILY_DEFAULT,
                 act_cfg: dict = FAMILY_DEFAULT,
                 mlp_bias: bool = FAMILY_DEFAULT,
                 downsample_norm_cfg: Optional[dict] = FAMILY_DEFAULT,
                 out_norm_cfg: Optional[dict] = FAMILY_DEFAULT,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 use_layer_scale: bool = True,
                 pos_embed_sizes: Optional[Sequence[Optional[Sequence[int]]]] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(init_cfg=init_cfg)
        family = self._family_settings(
            token_mixers=token_mixers, norm_cfg=norm_cfg, act_cfg=act_cfg, mlp_bias=mlp_bias,
            downsample_norm_cfg=downsample_norm_cfg, out_norm_cfg=out_norm_cfg)
        arch = self._parse_arch(arch)
        depths, dims = arch['depths'], arch['embed_dims']
        num_stages = len(depths)
        mlp_ratios = arch['mlp_ratios']
        self.out_indices = self._parse_out_indices(out_indices, num_stages)
        mixer_cfgs = self._parse_token_mixers(family['token_mixers'], num_stages)
        pos_embed_sizes = self._parse_pos_embed_sizes(pos_embed_sizes, num_stages)
        layer_scale_init_value = arch['layer_scale_init_value'] if use_layer_scale else None
        res_scale_init_values = arch['res_scale_init_values']
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f'frozen_stages must be an int in [-1, {num_stages}], got {frozen_stages!r}')
        if not 0. <= drop_path_rate < 1.:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate!r}')

        self.arch = arch
        self.embed_dims = list(dims)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        down_norm = family['downsample_norm_cfg']
        self.patch_embed = PatchEmbed(in_channels, dims[0], kernel_size=7, stride=4, padding=2,
                                      post_norm_cfg=down_norm)
        # Stochastic depth is linear over every block of the full arch, built or not, so truncating
        # the network (out_indices) does not change the rates of the blocks that remain.
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.num_built_stages = max(self.out_indices) + 1
        network = []
        # The ``network`` entries each stage runs, in order: its downsampling, its position
        # embedding, its blocks (the last one).
        self.stage_entries: List[List[int]] = []
        for i in range(self.num_built_stages):
            entries = []
            if i > 0:
                entries.append(len(network))
                network.append(
                    PatchEmbed(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1,
                               pre_norm_cfg=down_norm))
            if pos_embed_sizes[i] is not None:
                entries.append(len(network))
                network.append(PositionEmbedding(dims[i], pos_embed_sizes[i]))
            self.stage_entries.append(entries + [len(network)])
            first = sum(depths[:i])
            network.append(
                nn.Sequential(*[
                    MetaFormerBlock(
                        dims[i],
                        token_mixer=build_token_mixer(mixer_cfgs[i], dims[i]),
                        mlp_ratio=mlp_ratios[i],
                        norm_cfg=family['norm_cfg'],
                        act_cfg=family['act_cfg'],
                        mlp_bias=family['mlp_bias'],
                        drop=drop_rate,
                        drop_path=dpr[first + j],
                        layer_scale_init_value=layer_scale_init_value,
                        res_scale_init_value=res_scale_init_values[i])
                    for j in range(depths[i])
                ]))
        self.network = nn.ModuleList(network)
        if family['out_norm_cfg'] is not None:
            for i in self.out_indices:
                norm = build_norm(family['out_norm_cfg'], dims[i])
                if hasattr(norm, 'contiguous_output'):  # (it writes the NCHW map forward emits)
                    norm.contiguous_output = True
                self.add_module(f'norm{2 * i}', norm)

        self._freeze_stages()

    # ------------------------------------------------------------------ argument parsing
    def _parse_arch(self, arch) -> dict:
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise ValueError(f'unknown arch {arch!r} for {type(self).__name__}; valid: '
                                 f'{sorted(self.arch_zoo)} or a dict with keys depths, '
                                 f'embed_dims[, mlp_ratios, layer_scale_init_value, '
                                 f'res_scale_init_values]')
            arch = self.arch_zoo[arch.lower()]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        missing = {'depths', 'embed_dims'} - set(arch)
        unknown = set(arch) - _ARCH_KEYS
        if missing or unknown:
            raise ValueError(f'arch dict: missing keys {sorted(missing)}, unknown keys '
                             f'{sorted(unknown)}; allowed keys: {sorted(_ARCH_KEYS)}')
        arch = copy.deepcopy({**self.arch_defaults, **arch})
        depths, dims = list(arch['depths']), list(arch['embed_dims'])
        if not depths or len(depths) != len(dims):
            raise ValueError(f'arch: depths {depths} and embed_dims {dims} must be non-empty and '
                             f'have one entry per stage')
        if not all(isinstance(v, int) and v > 0 for v in depths + dims):
            raise ValueError(f'arch: depths {depths} and embed_dims {dims} must be positive ints')
        ratios = arch['mlp_ratios']
        ratios = [ratios] * len(depths) if isinstance(ratios, (int, float)) else list(ratios)
        if len(ratios) != len(depths) or not all(r > 0 for r in ratios):
            raise ValueError(f'arch: mlp_ratios must be a positive number or one per stage, '
                             f'got {arch["mlp_ratios"]!r}')
        ls = arch['layer_scale_init_value']
        if ls is not None and not isinstance(ls, (int, float)):
            raise TypeError(f'arch: layer_scale_init_value must be a number or None, got {ls!r}')
        rs = arch['res_scale_init_values']
        rs = list(rs) if isinstance(rs, (list, tuple)) else [rs] * len(depths)
        if len(rs) != len(depths) or not all(v is None or isinstance(v, (int, float)) for v in rs):
            raise ValueError(f'arch: res_scale_init_values must be a number, None, or one of either '
                             f'per stage, got {arch["res_scale_init_values"]!r}')
        return dict(depths=depths, embed_dims=dims, mlp_ratios=ratios, layer_scale_init_value=ls,
                    res_scale_init_values=rs)

    def _family_settings(self, **given) -> dict:
        """The arguments the family decides: those given, then ``family_defaults``; the emitted maps'
        norm is the blocks' where the family names none."""
        settings = {k: copy.deepcopy(self.family_defaults[k]) if v is FAMILY_DEFAULT
                    or (k == 'token_mixers' and v is None) else v
                    for k, v in given.items() if k != 'out_norm_cfg'}
        out_norm = given['out_norm_cfg']
        if out_norm is FAMILY_DEFAULT:
            out_norm = copy.deepcopy(self.family_defaults.get('out_norm_cfg', settings['norm_cfg']))
        settings['out_norm_cfg'] = out_norm
        return settings

    @staticmethod
    def _parse_out_indices(out_indices, num_stages) -> tuple:
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        valid = list(range(num_stages))
        if (not isinstance(out_indices, Sequence) or not out_indices
                or any(not isinstance(i, int) or i not in valid for i in out_indices)
                or len(set(out_indices)) != len(out_indices)):
            raise ValueError(f'out_indices must be a non-empty sequence of distinct stage indices '
                             f'from {valid}, got {out_indices!r}')
        return tuple(sorted(out_indices))

    def _parse_token_mixers(self, token_mixers, num_stages) -> List[dict]:
        if isinstance(token_mixers, dict):
            token_mixers = [token_mixers] * num_stages
        if (not isinstance(token_mixers, (list, tuple)) or len(token_mixers) != num_stages
                or not all(isinstance(c, dict) and 'type' in c for c in token_mixers)):
            raise ValueError(f'token_mixers must be a dict with a "type" key or a list of '
                             f'{num_stages} such dicts (one per stage), got {token_mixers!r}')
        return [dict(c) for c in token_mixers]

    @staticmethod
    def _parse_pos_embed_sizes(sizes, num_stages) -> list:
        if sizes is None:
            return [None] * num_stages
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != num_stages or not all(
                s is None or (isinstance(s, (list, tuple)) and len(s) == 2
                              and all(isinstance(v, int) and v > 0 for v in s)) for s in sizes)):
            raise ValueError(f'pos_embed_sizes must be a list of {num_stages} entries (one per stage), '
                             f'each None or a token grid (h, w) of positive ints, got {sizes!r}')
        return [None if s is None else tuple(s) for s in sizes]

    # ------------------------------------------------------------------ weights
    def init_weights(self):
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in cfgs if c and c.get('type') == 'Pretrained']
        if not pretrained:
            self.apply(self._init_default)
            super().init_weights()
            return
        cfg = pretrained[-1]
        if 'checkpoint' not in cfg:
            raise ValueError(f'init_cfg {cfg!r} needs a "checkpoint" (a path or URL)')
        load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
        self._is_init = True

    @staticmethod
    def _init_default(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ training state
    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        frozen = [self.patch_embed]
        for i in range(min(self.frozen_stages, self.num_built_stages)):
            frozen += [self.network[j] for j in self.stage_entries[i]]
            if hasattr(self, f'norm{2 * i}'):
                frozen.append(getattr(self, f'norm{2 * i}'))
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def _run_stage(self, stage: nn.Sequential, x):
        if not (self.with_cp and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = cp.checkpoint(block, x, use_reentrant=False) if x.requires_grad else block(x)
        return x

    def forward(self, x):
        """Runs channels-last inside (the MLPs are then plain matrix products over tokens) and
        emits contiguous ``(N, C, H, W)`` maps, as every mmdet / mmseg neck expects. The stem takes
        the image as it comes: with its weight channels-last it writes channels-last maps from either
        layout (converting the image first cost a copy of it, and more time in the convolution)."""
        x = self.patch_embed(x).contiguous(memory_format=torch.channels_last)
        outs = []
        for i, entries in enumerate(self.stage_entries):
            for j in entries[:-1]:
                x = self.network[j](x)
            x = self._run_stage(self.network[entries[-1]], x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{2 * i}', None)
                outs.append(to_nchw(x if norm is None else norm(x)))
        return tuple(outs)


@MODELS.register_module()
class PoolFormer(MetaFormer):
    """PoolFormer: the MetaFormer whose token mixer is average pooling (paper, Table 1).

    Takes every argument of :class:`MetaFormer`; ``arch`` is one of ``s12, s24, s36, m36, m48``, and
    the mixer of every stage is :class:`~mmpoolformer.models.token_mixers.Pooling` unless
    ``token_mixers`` says otherwise.
    """


# The hybrid ImageNet releases of the official repository (``models/metaformer.py`` of
# sail-sg/poolformer, all S12-sized): the MetaFormer arguments under which our modules, names and shapes
# are exactly theirs, so that their checkpoints load unchanged. Note what the official code does, which
# is not uniform: the attention hybrids use channel LayerNorm and a position embedding at their first
# attention stage; the spatial-FC hybrids and the identity model use the modified LayerNorm
# (GroupNorm(1, C)) and no position embedding.
_POOL = dict(type='Pooling', pool_size=3)
_ATTENTION = dict(type='Attention', head_dim=32)
_MODIFIED_LN = dict(type='GN', num_groups=1)
_CHANNEL_LN = dict(type='LN2d')
HYBRID_RELEASES = {
    'metaformer_id_s12':
    dict(arch='s12', token_mixers=dict(type='Identity'), norm_cfg=_MODIFIED_LN),
    'metaformer_pppa_s12_224':
    dict(arch='s12', token_mixers=[_POOL, _POOL, _POOL, _ATTENTION], norm_cfg=_CHANNEL_LN,
         pos_embed_sizes=[None, None, None, (7, 7)]),
    'metaformer_ppaa_s12_224':
    dict(arch='s12', token_mixers=[_POOL, _POOL, _ATTENTION, _ATTENTION], norm_cfg=_CHANNEL_LN,
         pos_embed_sizes=[None, None, (14, 14), None]),
    'metaformer_pppf_s12_224':
    dict(arch='s12', norm_cfg=_MODIFIED_LN,
         token_mixers=[_POOL, _POOL, _POOL, dict(type='SpatialFc', spatial_shape=(7, 7))]),
    'metaformer_ppff_s12_224':
    dict(arch='s12', norm_cfg=_MODIFIED_LN,
         token_mixers=[_POOL, _POOL, dict(type='SpatialFc', spatial_shape=(14, 14)),
                       dict(type='SpatialFc', spatial_shape=(7, 7))]),
}


def _release_builder(name: str):
    def build(**kwargs) -> MetaFormer:
        return MetaFormer(**{**copy.deepcopy(HYBRID_RELEASES[name]), **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f'The MetaFormer of the official ``{name}`` release; keyword arguments '
                     f'(``out_indices``, ``init_cfg``, ...) are those of :class:`MetaFormer` and '
                     f'override the release\'s.')
    return build


# Registered by release name, e.g. ``dict(type='mmpoolformer.metaformer_ppaa_s12_224', init_cfg=...)``.
for _name in HYBRID_RELEASES:
    MODELS.register_module(name=_name, module=_release_builder(_name))
