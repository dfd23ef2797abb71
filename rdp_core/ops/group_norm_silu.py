"""GroupNorm followed by SiLU, the pre-activation of every DDPM++ / ADM residual block.

`group_norm_silu_torch` is the readable reference (and the fallback); the compiled CPU backend fuses the
forward, reading each group from memory once and finishing it while it is in cache. Statistics are
computed in float32 or wider whatever the input dtype.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from rdp_core import _backend


def group_norm_silu_torch(x, num_groups, weight=None, bias=None, eps=1e-5):
    """silu(group_norm(x) * weight + bias), computed in float32 or wider; differentiable by autograd."""
    n, c = x.shape[:2]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    groups = x.to(compute_dtype).reshape(n, num_groups, math.prod(x.shape[1:]) // num_groups)
    mean = groups.mean(dim=-1, keepdim=True)
    variance = (groups - mean).square().mean(dim=-1, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(variance + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute_dtype).reshape(affine_shape)
    if bias is not None:
        y = y + bias.to(compute_dtype).reshape(affine_shape)
    return F.silu(y).to(x.dtype)


class _GroupNormSiLUCpp(torch.autograd.Function):
    """Forward on rdp_core._C; backward, until the C++ backward lands (kernels issue), is the exact
    vector-Jacobian product of the torch reference, recomputed from the saved inputs."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        x_c = x.detach().contiguous()
        y = torch.empty_like(x_c)
        mean = torch.empty(x_c.shape[0] * num_groups, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _backend.cpp_extension().group_norm_silu_fwd(
            x_c.numpy(), _numpy_or_none(weight), _numpy_or_none(bias), y.numpy(), mean.numpy(), rstd.numpy(),
            num_groups, eps,
        )
        ctx.save_for_backward(x, weight, bias)
        ctx.num_groups, ctx.eps = num_groups, eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        with torch.enable_grad():
            y = group_norm_silu_torch(x, ctx.num_groups, weight, bias, ctx.eps)
        # Grad mode is on here only under create_graph=True; the VJP is then itself differentiable (on the
        # saved inputs, not on copies), so second derivatives are exact too, not silently dropped.
        wanted = [t for t, need in zip((x, weight, bias), needs) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=torch.is_grad_enabled()))
        grad_x, grad_w, grad_b = (next(grads) if need else None for need in needs)
        return grad_x, None, grad_w, grad_b, None


def _numpy_or_none(t):
    return None if t is None else t.detach().contiguous().numpy()


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, backend="auto"):
    """silu(group_norm(x, num_groups, weight, bias, eps)) on the backend `backend` ("auto", "torch", "cpp")."""
    _check_arguments(x, num_groups, weight, bias)
    implemented = ("torch", "cpp") if _fits_cpp(x, weight, bias) else ("torch",)
    if backend == "cpp" and "cpp" not in implemented:
        raise ValueError(f"group_norm_silu: the cpp backend takes non-empty float32 CPU tensors, got x {x.dtype} "
                         f"of shape {tuple(x.shape)} on {x.device}")
    chosen = _backend.select("group_norm_silu", x, backend, implemented)
    if chosen == "cpp":
        return _GroupNormSiLUCpp.apply(x, num_groups, weight, bias, eps)
    return group_norm_silu_torch(x, num_groups, weight, bias, eps)


def _fits_cpp(x, weight, bias):
    floats = all(t is None or t.dtype == torch.float32 for t in (x, weight, bias))
    return floats and x.numel() > 0


def _check_arguments(x, num_groups, weight, bias):
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: expected input of shape (N, C, ...), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(f"group_norm_silu: {channels} channels cannot be split into {num_groups} equal groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({channels},), got {tuple(t.shape)}")


class GroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU in one op; same parameters (`weight`, `bias`), so checkpoint keys stay."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, backend="auto"):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.backend = backend

    def forward(self, x):
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.backend)
