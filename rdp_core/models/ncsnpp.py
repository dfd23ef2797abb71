"""DDPM++ as built by score_sde's NCSN++ class (Song et al. 2021), key for key.

The configurations DiffPure purifies CIFAR-10 with, vp/cifar10_ddpmpp_continuous and
vp/cifar10_ddpmpp_deep_continuous: nf 128, ch_mult (1, 2, 2, 2), 4 or 8 residual blocks per resolution,
attention at 16x16, BigGAN-type residual blocks that also resample, skip connections rescaled by 1/sqrt(2),
sinusoidal ("positional") time embedding, no FIR filters, centred data. The module tree is score_sde's:
one flat `all_modules` ModuleList in construction order, with the original attribute names (GroupNorm_0,
Conv_0, Dense_0, NIN_0, ... and NIN's `W`/`b`), so an official checkpoint's state dict and its EMA
`shadow_params` (a list in parameter order) load unchanged. Only the configurations above are built:
no FIR, no progressive growing, no Fourier embedding.

GroupNorm followed by SiLU is one `GroupNormSiLU`, attention's plain GroupNorm a `GroupNormAct` without
activation (both keep nn.GroupNorm's `weight`/`bias` keys), convolutions are rdp_core.ops.conv3x3's Conv2d
(nn.Conv2d's keys; the 3x3 ones run Winograd on the CPU), and attention goes through rdp_core.ops, so the
fused kernels apply without any key moving.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rdp_core.models.checkpoint import CheckpointMismatch, load_strict, read_state, strip_prefix
from rdp_core.models.layout import memory_format_of
from rdp_core.ops import GroupNormAct, GroupNormSiLU
from rdp_core.ops.attention import attention
from rdp_core.ops.conv3x3 import Conv2d


@dataclass(frozen=True)
class DDPMppConfig:
    nf: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    image_size: int = 32
    num_channels: int = 3
    init_scale: float = 0.0
    time_scale: float = 999.0  # score_sde's VP continuous models are conditioned on 999 t


CIFAR10_DDPMPP = DDPMppConfig()
CIFAR10_DDPMPP_DEEP = replace(CIFAR10_DDPMPP, num_res_blocks=8)


def _variance_scaling(shape, scale):
    """score_sde's default_init: uniform, fan-average variance scaling (scale 0 means 1e-10)."""
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_avg = (shape[0] + shape[1]) * receptive / 2
    return (torch.rand(shape) * 2 - 1) * math.sqrt(3 * scale / fan_avg)


def _conv(in_ch, out_ch, kernel, stride=1, padding=None, init_scale=1.0):
    conv = Conv2d(in_ch, out_ch, kernel, stride, kernel // 2 if padding is None else padding)
    with torch.no_grad():
        conv.weight.copy_(_variance_scaling(conv.weight.shape, init_scale))
        conv.bias.zero_()
    return conv


def _dense(in_features, out_features):
    dense = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.copy_(_variance_scaling(dense.weight.shape, 1.0))
        dense.bias.zero_()
    return dense


def _groups(channels):
    return min(channels // 4, 32)


def timestep_embedding(timesteps, dim, max_positions=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, as DDPM and score_sde compute it."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=timesteps.device, dtype=torch.float32)
                            * -(math.log(max_positions) / (half - 1)))
    angles = timesteps.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def _rescaled_skip(x, h):
    """(x + h) / sqrt(2), score_sde's rescaled skip connection, with the same rounding, computed in place in h: h
    is a fresh convolution output that nothing else holds (a convolution's backward does not read its output),
    so this saves an allocation and a pass over memory."""
    if torch.result_type(x, h) != h.dtype:  # mixed precision: keep the wider result, as the plain sum would
        return (x + h) / math.sqrt(2.0)
    return h.add_(x).div_(math.sqrt(2.0))


class NIN(nn.Module):
    """A 1x1 convolution stored as score_sde stores it: W of shape (in, out) and b."""

    def __init__(self, in_dim, num_units, init_scale=0.1):
        super().__init__()
        self.W = nn.Parameter(_variance_scaling((in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x):
        # The same product as score_sde's einsum, as a 1x1 convolution: it follows x's memory layout, and on the
        # CPU oneDNN's convolution runs it faster than the float32 matmul einsum would call (bench/RESULTS.md).
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlockpp(nn.Module):
    """Single-head self-attention over the pixels, head dim = channels, with a rescaled skip."""

    checkpoint_unit = True  # recomputed, not kept, under the adjoint's block checkpointing

    def __init__(self, channels, init_scale=0.0):
        super().__init__()
        self.GroupNorm_0 = GroupNormAct(_groups(channels), channels, eps=1e-6, activation=None)  # keys of nn.GroupNorm
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.GroupNorm_0(x)
        # (N, 1, HW, C) token views of the channels-last NIN outputs, and the result back as a channels-last
        # (N, C, H, W) view: no copies between the projections and the attention kernel.
        q, k, v = (nin(h).flatten(2).transpose(1, 2).unsqueeze(1) for nin in (self.NIN_0, self.NIN_1, self.NIN_2))
        h = attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        # The attention result is a channels-last view whatever x's layout. Let through into an NCHW model, it
        # would turn everything after the first attention block channels-last and the skip concatenations and
        # sums into mixes of both layouts (on a GPU: cuDNN layout conversions and strided elementwise kernels).
        # One copy of a low-resolution map keeps the model in x's layout; a no-op when x is channels-last.
        h = h.contiguous(memory_format=memory_format_of(x))
        return _rescaled_skip(x, self.NIN_3(h))


class ResnetBlockBigGANpp(nn.Module):
    """Pre-activation residual block with time conditioning; optionally halves or doubles the resolution."""

    checkpoint_unit = True  # recomputed, not kept, under the adjoint's block checkpointing

    def __init__(self, in_ch, out_ch=None, temb_dim=None, up=False, down=False, dropout=0.1, init_scale=0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = GroupNormSiLU(_groups(in_ch), in_ch, eps=1e-6)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = GroupNormSiLU(_groups(out_ch), out_ch, eps=1e-6)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = _conv(in_ch, out_ch, 1)
        self.up, self.down = up, down

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, temb=None):
        h = self.Conv_0(self._resample(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.GroupNorm_1(h)))
        x = self._resample(x)
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return _rescaled_skip(x, h)


class NCSNpp(nn.Module):
    """DDPM++ (score_sde's NCSN++ class in its DDPM++ configuration); forward(x, time_cond) -> epsilon."""

    def __init__(self, config=CIFAR10_DDPMPP):
        super().__init__()
        self.config = config
        nf, temb_dim = config.nf, 4 * config.nf
        def block(in_ch, out_ch=None, **kw):
            return ResnetBlockBigGANpp(in_ch, out_ch, temb_dim, dropout=config.dropout,
                                       init_scale=config.init_scale, **kw)

        resolutions = [config.image_size // 2**i for i in range(len(config.ch_mult))]
        modules = [_dense(nf, temb_dim), _dense(temb_dim, temb_dim), _conv(config.num_channels, nf, 3)]
        skips, in_ch = [nf], nf
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                modules.append(block(in_ch, nf * mult))
                in_ch = nf * mult
                if resolutions[level] in config.attn_resolutions:
                    modules.append(AttnBlockpp(in_ch, config.init_scale))
                skips.append(in_ch)
            if level != len(config.ch_mult) - 1:
                modules.append(block(in_ch, down=True))
                skips.append(in_ch)
        modules += [block(in_ch), AttnBlockpp(in_ch, config.init_scale), block(in_ch)]
        for level in reversed(range(len(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                modules.append(block(in_ch + skips.pop(), nf * config.ch_mult[level]))
                in_ch = nf * config.ch_mult[level]
            if resolutions[level] in config.attn_resolutions:
                modules.append(AttnBlockpp(in_ch, config.init_scale))
            if level != 0:
                modules.append(block(in_ch, up=True))
        modules += [GroupNormSiLU(_groups(in_ch), in_ch, eps=1e-6),
                    _conv(in_ch, config.num_channels, 3, init_scale=config.init_scale)]
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x, time_cond):
        c = self.config
        # Its attention blocks sit at fixed resolutions: another image size would misalign the module sequence.
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"this DDPM++ model takes images of shape (N, {c.num_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(x.shape)}")
        it = iter(self.all_modules)
        temb = next(it)(timestep_embedding(time_cond, self.config.nf))
        temb = next(it)(F.silu(temb))
        hs = [next(it)(x)]
        for level in range(len(self.config.ch_mult)):
            for _ in range(self.config.num_res_blocks):
                h = next(it)(hs[-1], temb)
                if h.shape[-1] in self.config.attn_resolutions:
                    h = next(it)(h)
                hs.append(h)
            if level != len(self.config.ch_mult) - 1:
                hs.append(next(it)(hs[-1], temb))
        h = next(it)(hs[-1], temb)
        h = next(it)(h)
        h = next(it)(h, temb)
        for level in reversed(range(len(self.config.ch_mult))):
            for _ in range(self.config.num_res_blocks + 1):
                h = next(it)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in self.config.attn_resolutions:
                h = next(it)(h)
            if level != 0:
                h = next(it)(h, temb)
        h = next(it)(h)  # GroupNorm + SiLU
        return next(it)(h)


class ScoreSDEEpsModel(nn.Module):
    """A score_sde VP model as the samplers' epsilon model: eps(x_t, t) = net(x_t, 999 t).

    score_sde's VP score is -net(x, 999 t) / sigma(t), so the network output is the noise estimate itself.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t * self.net.config.time_scale)


def load_score_sde_checkpoint(path, config=CIFAR10_DDPMPP_DEEP, use_ema=True):
    """An eval-mode ScoreSDEEpsModel from an official score_sde checkpoint (e.g. DiffPure's checkpoint_8.pth).

    The file is a dict with "model" (keys prefixed "module."), "ema" ({"shadow_params": [...]}, the
    parameters in model order), "optimizer" and "step"; DiffPure purifies with the EMA weights.
    """
    net = NCSNpp(config)
    state = read_state(path)
    if "model" not in state:
        raise CheckpointMismatch(f"{path} is not a score_sde checkpoint: no 'model' entry (found {sorted(state)[:5]})")
    load_strict(net, strip_prefix(state["model"]), source=f"{path} ['model']")
    if use_ema:
        _copy_shadow_params(net, state, path)
    return ScoreSDEEpsModel(net).eval()


def _copy_shadow_params(net, state, path):
    shadow = (state.get("ema") or {}).get("shadow_params")
    params = list(net.parameters())
    if not isinstance(shadow, list) or len(shadow) != len(params):
        found = len(shadow) if isinstance(shadow, list) else type(shadow).__name__
        raise CheckpointMismatch(f"{path}: ema shadow_params must list the model's {len(params)} parameters, "
                                 f"found {found}")
    names = [name for name, _ in net.named_parameters()]
    for name, param, value in zip(names, params, shadow):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointMismatch(f"{path}: ema parameter for {name} must be a floating-point tensor, got "
                                     f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
        if param.shape != value.shape:
            raise CheckpointMismatch(f"{path}: ema parameter for {name} has shape {tuple(value.shape)}, "
                                     f"model has {tuple(param.shape)}")
    with torch.no_grad():
        for param, value in zip(params, shadow):
            param.copy_(value)
