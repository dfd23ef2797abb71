"""The ADM UNet of openai/guided-diffusion (Dhariwal & Nichol 2021), key for key.

Module tree and parameter names follow guided-diffusion's unet.py (time_embed, input_blocks,
middle_block, output_blocks, out; in_layers / emb_layers / out_layers / skip_connection inside ResBlock;
norm / qkv / proj_out inside AttentionBlock, with the legacy head-then-qkv split), so
`256x256_diffusion_uncond.pt` (DiffPure's ImageNet model) loads strictly. Where a GroupNorm is followed by
SiLU in a Sequential, the fused GroupNormSiLU sits at the norm's index and nn.Identity at the SiLU's, so no
key moves; the scale-shift norm (norm, FiLM, SiLU) is one `group_norm_act` call and GroupNorm32 a plain
`GroupNormAct`, all on rdp_core.ops' dispatched backends. Attention goes through rdp_core.ops, and the
convolutions are rdp_core.ops.conv3x3's Conv2d (nn.Conv2d's keys; the 3x3 ones run Winograd on the CPU).
fp16 inference converts the torso's convolutions, as guided-diffusion's convert_to_fp16 does; normalisation
always computes its statistics in float32 and returns the input's dtype.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rdp_core.models.checkpoint import load_strict, read_state
from rdp_core.ops import GroupNormAct, GroupNormSiLU, group_norm_act
from rdp_core.ops.attention import attention
from rdp_core.ops.conv3x3 import Conv2d


@dataclass(frozen=True)
class ADMConfig:
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6  # learn_sigma: epsilon and the variance interpolation
    num_res_blocks: int = 2
    attention_resolutions: tuple = (32, 16, 8)  # in pixels, as the command-line flag gives them
    dropout: float = 0.0
    channel_mult: tuple = (1, 1, 2, 2, 4, 4)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_fp16: bool = True

    @property
    def attention_rates(self):
        """Downsampling rates at which attention runs (guided-diffusion's internal `ds` values)."""
        return {self.image_size // r for r in self.attention_resolutions}


IMAGENET256_UNCOND = ADMConfig()


class GroupNorm32(GroupNormAct):
    """guided-diffusion's GroupNorm32: statistics in float32 (or wider) whatever the input dtype, result in the
    input's dtype; no activation. Same parameters as nn.GroupNorm, so keys stay."""

    def __init__(self, num_groups, num_channels, eps=1e-5):
        super().__init__(num_groups, num_channels, eps, activation=None)


def timestep_embedding(timesteps, dim, max_period=10000):
    """guided-diffusion's sinusoidal embedding: [cos, sin], frequencies exp(-ln(max_period) k / half)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                 device=timesteps.device) / half)
    angles = timesteps[:, None].float() * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def _zero(module):
    for p in module.parameters():
        p.detach().zero_()
    return module


class Upsample(nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        if use_conv:
            self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning, optional FiLM (scale-shift) norm and resampling."""

    checkpoint_unit = True  # recomputed, not kept, under the adjoint's block checkpointing

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False,
                 up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNormSiLU(32, channels), nn.Identity(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (1 + use_scale_shift_norm) * out_channels))
        # With scale-shift the FiLM sits between the norm and the SiLU: they stay two modules (for the keys), and
        # forward runs norm, FiLM and SiLU as one fused op from the norm's parameters.
        first = (GroupNorm32(32, out_channels), nn.SiLU()) if use_scale_shift_norm else \
            (GroupNormSiLU(32, out_channels), nn.Identity())
        self.out_layers = nn.Sequential(*first, nn.Dropout(dropout),
                                        _zero(Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers[0](x)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            norm = self.out_layers[0]
            h = group_norm_act(h, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift, activation="silu")
            h = self.out_layers[2:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over positions, guided-diffusion's legacy layout (heads, then q/k/v)."""

    checkpoint_unit = True  # recomputed, not kept, under the adjoint's block checkpointing

    def __init__(self, channels, num_head_channels):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        head = c // self.num_heads
        q, k, v = qkv.reshape(b, self.num_heads, 3 * head, -1).transpose(-1, -2).split(head, dim=-1)
        # Strided views of qkv: the compiled attention backends read them in place, so no copies here.
        h = attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to the ResBlocks in it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """guided-diffusion's UNetModel (unconditional); forward(x, timesteps) with timesteps in [0, 999]."""

    def __init__(self, config=IMAGENET256_UNCOND):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        def res(ch, out=None, **kw):
            return ResBlock(ch, emb_dim, c.dropout, out, c.use_scale_shift_norm, **kw)

        def attn(ch):
            return AttentionBlock(ch, c.num_head_channels)

        ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(c.in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, int(mult * c.model_channels))]
                ch = int(mult * c.model_channels)
                if ds in c.attention_rates:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(c.model_channels * mult))]
                ch = int(c.model_channels * mult)
                if ds in c.attention_rates:
                    layers.append(attn(ch))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNormSiLU(32, ch), nn.Identity(),
                                 _zero(Conv2d(ch, c.out_channels, 3, padding=1)))
        self.dtype = torch.float32

    def convert_to_fp16(self):
        """Half-precision convolutions in the torso (not the embedding, norms or output), as guided-diffusion."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.half()
        self.dtype = torch.float16
        return self

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        hs, h = [], x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class ADMEpsModel(nn.Module):
    """A guided-diffusion model as the samplers' epsilon model: eps(x_t, t) = net(x_t, 1000 t - 1)[:, :C].

    Continuous time t maps to the discrete index i = 1000 t - 1 (rdp_core's convention); with learn_sigma
    the network's extra channels (the variance) are dropped.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t * 1000.0 - 1.0)[:, : self.net.config.in_channels].float()


def load_guided_diffusion_checkpoint(path, config=IMAGENET256_UNCOND, device="cpu"):
    """An eval-mode ADMEpsModel from a guided-diffusion state dict (e.g. 256x256_diffusion_uncond.pt)."""
    net = UNetModel(config)
    load_strict(net, read_state(path), source=str(path))
    net = net.to(device)
    if config.use_fp16:
        net.convert_to_fp16()
    return ADMEpsModel(net).eval()
