"""GroupNorm (+ guided-diffusion's scale-shift FiLM) (+ SiLU) as Triton kernels, forward and backward.

    y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift),   act = SiLU or the identity,

with weight/bias per channel and scale/shift per sample and channel, each optional (constexpr flags, so an
absent one costs nothing). One program normalises one (sample, group) and walks it in [BLOCK_C, BLOCK_HW]
tiles, so a group of any size (512 channels / 32 groups at 64x64 = 65536 elements) fits, and masking covers
any spatial size. Statistics are float32 whatever the input dtype, two-pass (mean, then E[(x - mean)^2]);
the first pass sums x - x[0] so a large common offset does not eat the float32 mantissa.

Layouts: contiguous NCHW, or a 4-D tensor in channels-last memory (NHWC), read and written in place (the
result keeps the input's layout): a channels-last model on the GPU, where cuDNN's convolutions want NHWC,
then pays no layout copy per norm. The kernels take the element strides of a channel and of a position
(HW and 1 for NCHW, 1 and C for NHWC); a stride of 1 is specialised by Triton, so each layout gets its own
contiguous loads. In NHWC one group's row is only its channels (4 to 16 at DDPM++'s widths), so its loads
are short; whether that costs bandwidth against NCHW is for bench_group_norm_silu's channels-last rows.

Plain launchers only: the autograd.Function lives in rdp_core.ops.group_norm_silu.
"""
import torch
import triton
import triton.language as tl

# Largest tile one program holds in registers; fixed (no autotune), which the interpreter needs anyway.
_TILE = 2048
_MAX_BLOCK_HW = 1024


@triton.jit
def _tile_offsets(c0, h0, CPG, HW, STRIDE_C, STRIDE_P, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Channel indices (within the group), element offsets (from the group's first element) and the mask of
    one tile."""
    c = c0 + tl.arange(0, BLOCK_C)
    h = h0 + tl.arange(0, BLOCK_HW)
    mask = (c < CPG)[:, None] & (h < HW)[None, :]
    return c, c[:, None] * STRIDE_C + h[None, :] * STRIDE_P, mask


@triton.jit
def _group_base(pid, G, C, HW, CPG, STRIDE_C):
    """Offset of the first element of group pid = sample * G + group (int64: large batches overflow int32)."""
    return (pid // G).to(tl.int64) * C * HW + (pid % G).to(tl.int64) * CPG * STRIDE_C


@triton.jit
def _channel_affine(W, B, SCALE, SHIFT, channel, film_row, c_mask, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """alpha, beta of z = x_hat * alpha + beta for a vector of channels (zero where masked off)."""
    alpha = tl.where(c_mask, 1.0, 0.0)
    beta = tl.zeros_like(alpha)
    if HAS_WEIGHT:
        alpha = tl.load(W + channel, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(B + channel, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        gain = 1.0 + tl.load(SCALE + film_row + channel, mask=c_mask, other=0.0).to(tl.float32)
        alpha = alpha * gain
        beta = beta * gain
    if HAS_SHIFT:
        beta = beta + tl.load(SHIFT + film_row + channel, mask=c_mask, other=0.0).to(tl.float32)
    return alpha, beta


@triton.jit
def _group_norm_act_fwd_kernel(X, W, B, SCALE, SHIFT, Y, MEAN, RSTD, C, HW, G, CPG, STRIDE_C, STRIDE_P, eps,
                               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                               HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)  # sample * G + group
    count = CPG * HW
    base = _group_base(pid, G, C, HW, CPG, STRIDE_C)
    pivot = tl.load(X + base).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            _, offs, mask = _tile_offsets(c0, h0, CPG, HW, STRIDE_C, STRIDE_P, BLOCK_C, BLOCK_HW)
            x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, x - pivot, 0.0)
    mean = pivot + tl.sum(tl.sum(acc, axis=1), axis=0) / count
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            _, offs, mask = _tile_offsets(c0, h0, CPG, HW, STRIDE_C, STRIDE_P, BLOCK_C, BLOCK_HW)
            x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean, 0.0)
            acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / count + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    first_channel = (pid % G) * CPG
    film_row = (pid // G) * C
    for c0 in range(0, CPG, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            c, offs, mask = _tile_offsets(c0, h0, CPG, HW, STRIDE_C, STRIDE_P, BLOCK_C, BLOCK_HW)
            alpha, beta = _channel_affine(W, B, SCALE, SHIFT, first_channel + c, film_row, c < CPG, HAS_WEIGHT,
                                          HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            z = (x - mean) * rstd * alpha[:, None] + beta[:, None]
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(Y + base + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dz_tile(X, DY, base, offs, mask, mean, rstd, alpha, beta, SILU: tl.constexpr):
    """x_hat and dL/dz (z the pre-activation) of one tile, zero where masked off."""
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean) * rstd
    if SILU:
        z = x_hat * alpha[:, None] + beta[:, None]
        sigmoid = tl.sigmoid(z)
        dy = dy * sigmoid * (1.0 + z * (1.0 - sigmoid))
    return tl.where(mask, x_hat, 0.0), tl.where(mask, dy, 0.0)


@triton.jit
def _group_norm_act_bwd_kernel(X, W, B, SCALE, SHIFT, MEAN, RSTD, DY, DX, SUM_DZ, SUM_DZ_XHAT, C, HW, G, CPG,
                               STRIDE_C, STRIDE_P,
                               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                               HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, STORE_SUMS: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    count = CPG * HW
    base = _group_base(pid, G, C, HW, CPG, STRIDE_C)
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    first_channel = (pid % G) * CPG
    film_row = (pid // G) * C
    # Pass 1: per channel, A = sum dz and Bc = sum dz * x_hat; the group sums of dx_hat = dz * alpha and
    # dx_hat * x_hat follow from them, and so do all parameter gradients (see the launcher).
    m1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        alpha, beta = _channel_affine(W, B, SCALE, SHIFT, first_channel + c, film_row, c < CPG, HAS_WEIGHT,
                                      HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
        for h0 in range(0, HW, BLOCK_HW):
            _, offs, mask = _tile_offsets(c0, h0, CPG, HW, STRIDE_C, STRIDE_P, BLOCK_C, BLOCK_HW)
            x_hat, dz = _dz_tile(X, DY, base, offs, mask, mean, rstd, alpha, beta, SILU)
            sum_dz += tl.sum(dz, axis=1)
            sum_dz_xhat += tl.sum(dz * x_hat, axis=1)
        m1 += alpha * sum_dz
        m2 += alpha * sum_dz_xhat
        if STORE_SUMS:
            tl.store(SUM_DZ + film_row + first_channel + c, sum_dz, mask=c < CPG)
            tl.store(SUM_DZ_XHAT + film_row + first_channel + c, sum_dz_xhat, mask=c < CPG)
    mean_dxhat = tl.sum(m1, axis=0) / count
    mean_dxhat_xhat = tl.sum(m2, axis=0) / count
    # Pass 2: dx = rstd * (dz * alpha - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)); dz is recomputed
    # rather than kept, which costs arithmetic where keeping it would cost a round trip through memory.
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        alpha, beta = _channel_affine(W, B, SCALE, SHIFT, first_channel + c, film_row, c < CPG, HAS_WEIGHT,
                                      HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        for h0 in range(0, HW, BLOCK_HW):
            _, offs, mask = _tile_offsets(c0, h0, CPG, HW, STRIDE_C, STRIDE_P, BLOCK_C, BLOCK_HW)
            x_hat, dz = _dz_tile(X, DY, base, offs, mask, mean, rstd, alpha, beta, SILU)
            dx = rstd * (dz * alpha[:, None] - mean_dxhat - x_hat * mean_dxhat_xhat)
            tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(channels_per_group, spatial):
    """(BLOCK_C, BLOCK_HW, num_warps): rows of the spatial extent, as many channels as fill the tile."""
    block_hw = min(triton.next_power_of_2(spatial), _MAX_BLOCK_HW)
    block_c = min(triton.next_power_of_2(channels_per_group), max(1, _TILE // block_hw))
    return block_c, block_hw, 8 if block_c * block_hw >= 2048 else 4


def _sizes(x, num_groups):
    n, c = x.shape[:2]
    return n, c, x[0, 0].numel(), c // num_groups


def _contiguous(t):
    return None if t is None else t.contiguous()


def _channels_last(x):
    """Whether x is a 4-D tensor stored channels-last (and not also plain contiguous, as when H = W = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _in_kernel_layout(x, like=None):
    """x as the kernels read it: channels-last kept when `like` (default x) is channels-last, else NCHW."""
    channels_last = _channels_last(x if like is None else like)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _strides(x):
    """(STRIDE_C, STRIDE_P): element strides of a channel and of a spatial position in x's layout."""
    return (1, x.shape[1]) if _channels_last(x) else (x[0, 0].numel(), 1)


def group_norm_act_fwd(x, num_groups, weight=None, bias=None, scale=None, shift=None, eps=1e-5, silu=True):
    """(y, mean, rstd) for x (N, C, *spatial); weight, bias (C,) and scale, shift (N, C) may be None.

    y has x's dtype and shape, in x's layout (channels-last kept, anything else made contiguous NCHW); mean
    and rstd are float32 of shape (N * num_groups,).
    """
    x = _in_kernel_layout(x)
    n, c, spatial, cpg = _sizes(x, num_groups)
    weight, bias, scale, shift = map(_contiguous, (weight, bias, scale, shift))
    y = torch.empty_like(x)  # keeps x's layout
    mean = torch.empty(n * num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_c, block_hw, num_warps = _blocks(cpg, spatial)
    _group_norm_act_fwd_kernel[(n * num_groups,)](
        x, _or(weight, x), _or(bias, x), _or(scale, x), _or(shift, x), y, mean, rstd, c, spatial, num_groups, cpg,
        *_strides(x), eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, SILU=silu, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )
    return y, mean, rstd


def group_norm_act_bwd(grad_y, x, num_groups, mean, rstd, weight=None, bias=None, scale=None, shift=None,
                       silu=True, needs=(True, False, False, False)):
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift), the VJP of group_norm_act_fwd.

    `needs` says which of weight, bias, scale, shift want a gradient; the others come back as None and, when
    none is wanted, the per-channel sums they derive from are not even stored.
    """
    x = _in_kernel_layout(x)
    grad_y = _in_kernel_layout(grad_y, like=x)
    n, c, spatial, cpg = _sizes(x, num_groups)
    weight, bias, scale, shift = map(_contiguous, (weight, bias, scale, shift))
    grad_x = torch.empty_like(x)
    store_sums = any(needs)
    sums = torch.empty((2, n, c) if store_sums else (2, 1), dtype=torch.float32, device=x.device)
    block_c, block_hw, num_warps = _blocks(cpg, spatial)
    _group_norm_act_bwd_kernel[(n * num_groups,)](
        x, _or(weight, x), _or(bias, x), _or(scale, x), _or(shift, x), mean, rstd, grad_y, grad_x, sums[0], sums[1],
        c, spatial, num_groups, cpg, *_strides(x), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu, STORE_SUMS=store_sums,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )
    if not store_sums:
        return grad_x, None, None, None, None
    return (grad_x,) + _parameter_grads(sums[0], sums[1], weight, bias, scale, shift, needs)


def _parameter_grads(sum_dz, sum_dz_xhat, weight, bias, scale, shift, needs):
    """From A = sum dz, Bc = sum dz * x_hat per (sample, channel): grad_shift = A, grad_scale = w Bc + b A,
    grad_weight = sum_n (1 + scale) Bc, grad_bias = sum_n (1 + scale) A. O(N * C), so plain torch."""
    gain = 1.0 if scale is None else 1.0 + scale.float()
    w = 1.0 if weight is None else weight.float()
    b = 0.0 if bias is None else bias.float()
    grads = (
        (gain * sum_dz_xhat).sum(0) if needs[0] else None,
        (gain * sum_dz).sum(0) if needs[1] else None,
        w * sum_dz_xhat + b * sum_dz if needs[2] else None,
        sum_dz.clone() if needs[3] else None,
    )
    return tuple(None if g is None else g.to(param.dtype) for g, param in zip(grads, (weight, bias, scale, shift)))


def _or(t, fallback):
    """A tensor to pass where a kernel argument is absent (its constexpr flag keeps it unread)."""
    return fallback if t is None else t
