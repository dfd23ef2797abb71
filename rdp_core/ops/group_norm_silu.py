"""GroupNorm, optionally with guided-diffusion's scale-shift FiLM and a SiLU: the norms of DDPM++ and ADM.

    group_norm_act(x, G, weight, bias, eps, scale, shift, activation)
        = act((group_norm(x, G) * weight + bias) * (1 + scale) + shift)

weight and bias are per channel (C,); scale and shift per sample and channel ((N, C) or (N, C, 1, ...), as
ADM's time embedding gives them); act is SiLU (activation="silu") or none (activation=None). Thin wrappers:
`group_norm_silu` (the pre-activation of every residual block) and `group_norm` (attention's plain norm).

`group_norm_act_torch` is the readable reference the backends are tested against; the "torch" backend (the
fallback) is `group_norm_act_eager`, the same function from stock F.group_norm and F.silu. The compiled
backends fuse the whole expression into one pass that reads each group once and, in the backward, one that
reads x and grad_y twice: "cpp" (rdp_core._C, float32 CPU tensors) and "triton" (rdp_core.kernels, CUDA
tensors in float32, float16 or bfloat16). Statistics are float32 or wider whatever the input dtype, and the
result has the input's dtype (guided-diffusion's GroupNorm32 behaviour, which ADM's fp16 inference relies
on).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from rdp_core import _backend

ACTIVATIONS = ("silu", None)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def group_norm_act_torch(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, activation="silu"):
    """The definition, in float32 or wider; differentiable by autograd to any order."""
    n, c = x.shape[:2]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    groups = x.to(compute_dtype).reshape(n, num_groups, math.prod(x.shape[1:]) // num_groups)
    mean = groups.mean(dim=-1, keepdim=True)
    variance = (groups - mean).square().mean(dim=-1, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(variance + eps)).reshape(x.shape)
    trailing = (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute_dtype).reshape((1, c) + trailing)
    if bias is not None:
        y = y + bias.to(compute_dtype).reshape((1, c) + trailing)
    if scale is not None:
        y = y * (1 + scale.to(compute_dtype).reshape((n, c) + trailing))
    if shift is not None:
        y = y + shift.to(compute_dtype).reshape((n, c) + trailing)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)


def group_norm_act_eager(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, activation="silu"):
    """The same function from stock torch ops (F.group_norm, F.silu), as a model written without rdp_core
    computes it: the "torch" backend, and the baseline the fused kernels are measured against."""
    n, c = x.shape[:2]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    weight, bias = (None if t is None else t.to(compute_dtype) for t in (weight, bias))
    y = F.group_norm(x.to(compute_dtype), num_groups, weight, bias, eps)
    trailing = (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.to(compute_dtype).reshape((n, c) + trailing))
    if shift is not None:
        y = y + shift.to(compute_dtype).reshape((n, c) + trailing)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)


def group_norm_silu_torch(x, num_groups, weight=None, bias=None, eps=1e-5):
    """silu(group_norm(x) * weight + bias), the reference of `group_norm_silu`."""
    return group_norm_act_torch(x, num_groups, weight, bias, eps, activation="silu")


def _stored_channels_last(x):
    """True for a 4-D x in channels-last memory that is not also plain contiguous: the C++ kernels then read it
    in place as (N, H, W, C) instead of copying it to NCHW (a channels-last model would pay a copy per norm)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _cpp_layout(x):
    """x in the memory layout the C++ kernels read (contiguous NCHW, or channels-last kept as it is), the numpy
    view to hand them for any tensor of that layout, and the kernels' channels_last flag."""
    if _stored_channels_last(x):
        return x.detach(), lambda t: t.permute(0, 2, 3, 1).numpy(), True
    return x.detach().contiguous(), lambda t: t.numpy(), False


def _cpp_forward(x, num_groups, eps, activation, params):
    x_c, view, channels_last = _cpp_layout(x)
    y = torch.empty_like(x_c)  # keeps x_c's layout
    mean = torch.empty(x_c.shape[0] * num_groups, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _backend.cpp_extension().group_norm_act_fwd(
        view(x_c), *map(_numpy_or_none, params), view(y), mean.numpy(), rstd.numpy(), num_groups, eps,
        activation == "silu", channels_last,
    )
    return y, mean, rstd


def _cpp_backward(grad_y, x, num_groups, mean, rstd, activation, params, needs):
    x_c, view, channels_last = _cpp_layout(x)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad_x = torch.empty_like(x_c)
    grads = [torch.empty_like(p, memory_format=torch.contiguous_format) if need else None
             for p, need in zip(params, needs)]
    _backend.cpp_extension().group_norm_act_bwd(
        view(x_c), *map(_numpy_or_none, params), mean.numpy(), rstd.numpy(), view(grad_y), view(grad_x),
        *map(_numpy_or_none, grads), num_groups, activation == "silu", channels_last,
    )
    return (grad_x, *grads)


def _triton_forward(x, num_groups, eps, activation, params):
    from rdp_core.kernels import group_norm_silu as kernels  # lazily: importing triton is slow

    detached = (None if p is None else p.detach() for p in params)
    return kernels.group_norm_act_fwd(x.detach(), num_groups, *detached, eps=eps, silu=activation == "silu")


def _triton_backward(grad_y, x, num_groups, mean, rstd, activation, params, needs):
    from rdp_core.kernels import group_norm_silu as kernels

    return kernels.group_norm_act_bwd(grad_y, x.detach(), num_groups, mean, rstd, *params,
                                      silu=activation == "silu", needs=needs)


def _numpy_or_none(t):
    return None if t is None else t.detach().contiguous().numpy()


def _forward(ctx, kernel, x, weight, bias, scale, shift, num_groups, eps, activation):
    params = (weight, bias, scale, shift)
    y, mean, rstd = kernel(x, num_groups, eps, activation, params)
    ctx.save_for_backward(x, mean, rstd, *params)
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation
    return y


def _backward(ctx, kernel, grad_y):
    """The VJP of the fused kernel; the exact differentiable VJP of the reference when it must be differentiable.

    Grad mode is on inside a backward only under create_graph=True (Hessian-vector products, gradient
    penalties, the adjoint's second-order terms); the kernel's VJP is not itself differentiable, so then the
    same function is recomputed from stock ops on the saved inputs (not on copies) and differentiated with
    create_graph, which keeps second derivatives exact instead of silently dropping them. Stock ops rather than
    the elementwise reference: aten's group norm backward is itself differentiable and its graph is a few
    nodes, not dozens (an AGDM adjoint gradient, whose every step differentiates the score model twice, is 4%
    faster for it; tests compare against the reference).
    """
    x, mean, rstd, *params = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():
        grads = _differentiable_vjp(ctx, grad_y, x, params, needs)
    else:
        grads = kernel(grad_y, x, ctx.num_groups, mean, rstd, ctx.activation, params, needs[1:])
    return (*grads, None, None, None)  # autograd drops the ones no input asked for (grad_x is always computed)


def _differentiable_vjp(ctx, grad_y, x, params, needs):
    with torch.enable_grad():
        y = group_norm_act_eager(x, ctx.num_groups, *params[:2], ctx.eps, *params[2:], ctx.activation)
    inputs = (x, *params)
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    return [next(grads) if need else None for need in needs]


class _GroupNormActCpp(torch.autograd.Function):
    """Forward and backward on rdp_core._C (float32 CPU tensors)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation):
        return _forward(ctx, _cpp_forward, x, weight, bias, scale, shift, num_groups, eps, activation)

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, _cpp_backward, grad_y)


class _GroupNormActTriton(torch.autograd.Function):
    """Forward and backward on the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation):
        return _forward(ctx, _triton_forward, x, weight, bias, scale, shift, num_groups, eps, activation)

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, _triton_backward, grad_y)


_FUNCTIONS = {"cpp": _GroupNormActCpp, "triton": _GroupNormActTriton}
_FORWARDS = {"cpp": _cpp_forward, "triton": _triton_forward}


def group_norm_act(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, activation="silu",
                   backend="auto"):
    """act((group_norm(x, num_groups) * weight + bias) * (1 + scale) + shift) on the backend `backend`.

    x: (N, C, *spatial); weight, bias: (C,) or None; scale, shift: (N, C) or (N, C, 1, ...) or None (ADM's
    scale-shift norm); activation: "silu" or None. backend: "auto", "torch", "cpp" or "triton" (see
    rdp_core._backend); a compiled backend that cannot take these tensors is a ValueError when asked for by
    name, and "auto" then uses the torch reference. The result has x's shape and dtype.
    """
    scale, shift = _check_arguments(x, num_groups, weight, bias, scale, shift, activation)
    tensors = (x, weight, bias, scale, shift)
    implemented = ("torch",) + tuple(b for b in ("cpp", "triton") if _fits(b, tensors))
    if backend in _FUNCTIONS and backend not in implemented:
        raise ValueError(f"group_norm_act: the {backend} backend takes {_FITS_DESCRIPTION[backend]}, got x "
                         f"{x.dtype} of shape {tuple(x.shape)} with parameters of dtypes "
                         f"{[t.dtype for t in tensors[1:] if t is not None]}")
    chosen = _backend.select("group_norm_act", x, backend, implemented)
    if chosen == "torch":
        return group_norm_act_eager(x, num_groups, weight, bias, eps, scale, shift, activation)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # Purification without gradients: the kernel alone, without autograd.Function's per-call overhead.
        with _backend.profiled(f"rdp_core::group_norm_act_{chosen}"):
            return _FORWARDS[chosen](x, num_groups, eps, activation, tensors[1:])[0]
    return _FUNCTIONS[chosen].apply(x, weight, bias, scale, shift, num_groups, eps, activation)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, backend="auto"):
    """silu(group_norm(x, num_groups, weight, bias, eps)); see `group_norm_act`."""
    return group_norm_act(x, num_groups, weight, bias, eps, activation="silu", backend=backend)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, backend="auto"):
    """F.group_norm on rdp_core's backends, statistics in float32 whatever x's dtype; see `group_norm_act`."""
    return group_norm_act(x, num_groups, weight, bias, eps, activation=None, backend=backend)


_FITS_DESCRIPTION = {
    "cpp": "non-empty float32 CPU tensors",
    "triton": "non-empty float32, float16 or bfloat16 tensors",
}


def _fits(backend, tensors):
    """Whether the compiled `backend` implements the op for these dtypes; the device is _backend's concern."""
    dtypes = (torch.float32,) if backend == "cpp" else _TRITON_DTYPES
    present = [t for t in tensors if t is not None]
    return tensors[0].numel() > 0 and all(t.dtype in dtypes for t in present)


def _check_arguments(x, num_groups, weight, bias, scale, shift, activation):
    """Raises ValueError on inconsistent arguments; returns scale and shift as (N, C) views."""
    if x.dim() < 2:
        raise ValueError(f"group_norm_act: expected input of shape (N, C, ...), got shape {tuple(x.shape)}")
    n, channels = x.shape[:2]
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(f"group_norm_act: {channels} channels cannot be split into {num_groups} equal groups")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"group_norm_act: {name} must have shape ({channels},), got {tuple(t.shape)}")
    return tuple(_per_sample_channel(name, t, n, channels) for name, t in (("scale", scale), ("shift", shift)))


def _per_sample_channel(name, t, n, channels):
    if t is None:
        return None
    if tuple(t.shape[:2]) != (n, channels) or any(size != 1 for size in t.shape[2:]):
        raise ValueError(f"group_norm_act: {name} must have shape ({n}, {channels}) or ({n}, {channels}, 1, ...), "
                         f"got {tuple(t.shape)}")
    return t.reshape(n, channels)


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm followed by `activation` ("silu" or None) in one op, on rdp_core's dispatched backends.

    Same parameters as nn.GroupNorm (`weight`, `bias`), so checkpoint keys stay. forward(x, scale=None,
    shift=None) also takes ADM's per-sample scale and shift, applied between the norm and the activation.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None,
                 activation="silu", backend="auto"):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNormAct: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.backend = backend

    def forward(self, x, scale=None, shift=None):
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, self.activation,
                              self.backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


class GroupNormSiLU(GroupNormAct):
    """nn.GroupNorm followed by SiLU in one op; same parameters (`weight`, `bias`), so checkpoint keys stay."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, backend="auto"):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, activation="silu", backend=backend)
