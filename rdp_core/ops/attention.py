"""Softmax attention over the tokens of a feature map, the self-attention of the diffusion UNets.

Layout (batch, heads, tokens, head_dim), any strides. `attention_reference` is the readable definition the
backends are tested against; the public `attention` dispatches like every op (rdp_core._backend):
"triton" (CUDA; flash attention from rdp_core.kernels.attention, fp32/fp16/bf16, head_dim <= 512), "cpp"
(CPU float32; rdp_core._C, blocked online softmax on OpenMP threads) and "torch" (torch's
scaled_dot_product_attention, for everything else, made twice differentiable). The compiled backends read
strided views in place, so the UNets pass their transposed NCHW views without copies, and have their own
backward kernels.
"""
import math

import torch
import torch.nn.functional as F

from rdp_core import _backend


def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(head_dim)) v, in float32 or wider."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(compute) @ k.to(compute).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ v.to(compute)).to(q.dtype)


def _reference_vjp(q, k, v, grad_out, needs_input_grad):
    """The VJP by differentiable recompute of the reference on the saved inputs themselves (not copies). Used
    when the backward runs with grad enabled (create_graph=True, Hessian-vector products): the fast kernels'
    gradients are not differentiable, this one is, so second derivatives stay exact."""
    with torch.enable_grad():
        out = attention_reference(q, k, v)
    wanted = [t for t, need in zip((q, k, v), needs_input_grad) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs_input_grad)


def _keep_needed(grads, needs_input_grad):
    return tuple(g if need else None for g, need in zip(grads, needs_input_grad))


def _numpy(t):
    return t.detach().numpy()  # a zero-copy view with t's strides


def _cpp_forward(q, k, v):
    batch, heads, tokens, _ = q.shape
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(batch * heads * tokens, dtype=torch.float32)
    _backend.cpp_extension().attention_fwd(_numpy(q), _numpy(k), _numpy(v), out.numpy(), lse.numpy())
    return out, lse


def _cpp_backward(q, k, v, out, lse, grad_out):
    grads = [torch.empty(q.shape, dtype=torch.float32) for _ in range(3)]
    _backend.cpp_extension().attention_bwd(_numpy(q), _numpy(k), _numpy(v), _numpy(out), _numpy(grad_out),
                                           lse.numpy(), *(g.numpy() for g in grads))
    return grads


def _triton_forward(q, k, v):
    from rdp_core.kernels import attention as K  # imports triton: only when this backend runs

    return K.attention_fwd(q, k, v)


def _triton_backward(q, k, v, out, lse, grad_out):
    from rdp_core.kernels import attention as K

    return K.attention_bwd(q, k, v, out, lse, grad_out)


def _forward(ctx, kernel, q, k, v):
    out, lse = kernel(q, k, v)
    ctx.save_for_backward(q, k, v, out, lse)
    return out


def _backward(ctx, kernel, grad_out):
    """The kernel's VJP; under create_graph the differentiable VJP of the reference (exact second derivatives)."""
    q, k, v, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _reference_vjp(q, k, v, grad_out, ctx.needs_input_grad)
    return _keep_needed(kernel(q, k, v, out, lse, grad_out), ctx.needs_input_grad)


class _AttentionCpp(torch.autograd.Function):
    """Forward and backward on rdp_core._C (CPU float32); inputs and grad_out are read through their strides."""

    @staticmethod
    def forward(ctx, q, k, v):
        return _forward(ctx, _cpp_forward, q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, _cpp_backward, grad_out)


class _AttentionTriton(torch.autograd.Function):
    """Forward and backward on the Triton kernels (CUDA, or any device under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, q, k, v):
        return _forward(ctx, _triton_forward, q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, _triton_backward, grad_out)


class _AttentionSdpa(torch.autograd.Function):
    """torch's scaled_dot_product_attention with its own backward, made twice differentiable.

    SDPA's fused kernels (flash on the CPU and on CUDA, memory-efficient on CUDA) have no second derivative,
    and AGDM's adjoint differentiates the guidance gradient, which runs through attention. The forward keeps
    SDPA's graph on detached aliases of the inputs (the same saved tensors autograd would keep); the backward
    replays it, or under create_graph takes the reference's differentiable VJP, as the compiled backends do.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        inner = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(*inner)
        ctx.save_for_backward(q, k, v)
        ctx.inner = inner, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            return _reference_vjp(*ctx.saved_tensors, grad_out, ctx.needs_input_grad)
        inner, out = ctx.inner
        wanted = [t for t, need in zip(inner, ctx.needs_input_grad) if need]
        # retain_graph: an outer backward with retain_graph=True may call this backward again.
        grads = iter(torch.autograd.grad(out, wanted, grad_out, retain_graph=True))
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


_COMPILED = {"cpp": _AttentionCpp, "triton": _AttentionTriton}


def _unfit_reason(backend, q, k, v):
    """Why `backend` cannot take these tensors (dtype, size), or None; devices are _backend.select's business."""
    tensors = (q, k, v)
    if q.numel() == 0:
        return "takes non-empty tensors"
    if any(t.device != q.device or t.dtype != q.dtype for t in tensors):
        return "takes q, k, v of one dtype and device"
    if backend == "cpp" and q.dtype != torch.float32:
        return f"takes float32 tensors, got {q.dtype}"
    if backend == "triton":
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"takes float32, float16 or bfloat16 tensors, got {q.dtype}"
        if q.shape[-1] > 512:
            return f"takes head_dim <= 512, got {q.shape[-1]}"
    return None


def attention(q, k, v, backend="auto"):
    """softmax(q k^T / sqrt(head_dim)) v for q, k, v of shape (batch, heads, tokens, head_dim).

    backend: "auto" (triton on CUDA, cpp on CPU float32, else torch), "torch", "cpp" or "triton"; a named
    backend that cannot take these tensors is a ValueError.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: expected q, k, v of one shape (batch, heads, tokens, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if backend in _COMPILED:
        reason = _unfit_reason(backend, q, k, v)
        if reason is not None:
            raise ValueError(f"attention: the {backend} backend {reason}")
    implemented = ("torch",) + tuple(b for b in _COMPILED if _unfit_reason(b, q, k, v) is None)
    chosen = _backend.select("attention", q, backend, implemented)
    if chosen in _COMPILED:
        return _COMPILED[chosen].apply(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _AttentionSdpa.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
