"""Softmax attention over the tokens of a feature map, the self-attention of the diffusion UNets.

Layout (batch, heads, tokens, head_dim). `attention_reference` is the readable definition the backends are
tested against; the public `attention` dispatches like every op (rdp_core._backend). Until the fused
kernels land (kernels issue) the only backend is "torch", torch's scaled_dot_product_attention, which
computes the same function without materialising the score matrix where it can.
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


def attention(q, k, v, backend="auto"):
    """softmax(q k^T / sqrt(head_dim)) v for q, k, v of shape (batch, heads, tokens, head_dim)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: expected q, k, v of one shape (batch, heads, tokens, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _backend.select("attention", q, backend, implemented=("torch",))
    return F.scaled_dot_product_attention(q, k, v)
