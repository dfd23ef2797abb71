"""Flash attention in Triton: softmax(q k^T / sqrt(head_dim)) v without materialising the score matrix.

Tensors are (batch, heads, tokens, head_dim) with any strides (the UNets hand over transposed NCHW views);
every kernel takes all four strides of each tensor, so nothing is copied. fp32, fp16 and bf16 inputs; scores,
softmax statistics and accumulators are fp32 whatever the input, and fp32 inputs multiply in IEEE fp32 (never
TF32, whose 10-bit mantissa would be the largest error here).

Forward: one program per (query block, batch * head) walks the key blocks with an online softmax and saves the
row logsumexp (base 2, of the scores already multiplied by log2(e) / sqrt(head_dim)). Backward
(FlashAttention-2): delta = rowsum(dO * O) first, then one kernel per key block for dK and dV and one per
query block for dQ, both recomputing the probabilities tile by tile from the saved logsumexp. Two kernels
instead of one with atomics keep dQ deterministic.

Bounds masks only where a tile is partial: at the UNet shapes every tile is full and the kernels compile
without masked loads, stores or score selects (triton.heuristics flags; the interpreter tests cover both).

Head dims up to 512 (DDPM++ has one head of 256 channels, larger configs 512). The whole head_dim stays in one
tile: tiling over it would recompute every score tile once per head_dim chunk. Instead the query/key block
sizes shrink as head_dim grows so that the q, k, v tiles (shared memory, fp16: block * head_dim * 2 bytes
each, times the pipeline stages) and the fp32 accumulators (registers) fit an SM: 64 x 32 tiles at 256,
32 x 32 (forward) and 16-row key blocks (backward, which holds both dK and dV) at 512.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

# Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported) runs one fixed configuration: it
# checks indexing and masking on the CPU, where autotuning would only multiply the run time.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634

# Which tiles need no bounds masks: at the UNet shapes (64, 256, 1024 tokens; head_dim 64, 256 or 512) every
# tile is full, and the masked loads, stores and score selects then compile away.
_EVEN = {
    "EVEN_M": lambda a: a["tokens"] % a["BLOCK_M"] == 0,
    "EVEN_MD": lambda a: a["tokens"] % a["BLOCK_M"] == 0 and a["head_dim"] == a["BLOCK_D"],
    "EVEN_ND": lambda a: a["tokens"] % a["BLOCK_N"] == 0 and a["head_dim"] == a["BLOCK_D"],
    # Scores of padded query rows or key columns must be masked out (positive flags: plain constexpr ifs).
    "MASK_KEYS": lambda a: a["tokens"] % a["BLOCK_N"] != 0,
    "MASK_SCORES": lambda a: a["tokens"] % a["BLOCK_M"] != 0 or a["tokens"] % a["BLOCK_N"] != 0,
}


@triton.jit
def _load(pointers, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(pointers)
    else:
        return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _store(pointers, value, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(pointers, value)
    else:
        tl.store(pointers, value, mask=mask)


@triton.heuristics(_EVEN)
@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE,
                          sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                          heads, tokens, head_dim, qk_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr, EVEN_M: tl.constexpr,
                          EVEN_MD: tl.constexpr, EVEN_ND: tl.constexpr, MASK_KEYS: tl.constexpr,
                          MASK_SCORES: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h = pid_bh // heads, pid_bh % heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < tokens, offs_d < head_dim
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask_md, EVEN_MD)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, tokens, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < tokens
        # K^T tile (head_dim x keys): loaded transposed through its strides, no tl.trans needed.
        kt = _load(k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask_d[:, None] & mask_n[None, :], EVEN_ND)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK_KEYS:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has at least one real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask_n[:, None] & mask_d[None, :], EVEN_ND)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, acc.to(O.dtype.element_ty), mask_md,
           EVEN_MD)
    _store(LSE + pid_bh * tokens + offs_m, m_i + tl.log2(l_i), mask_m, EVEN_M)


@triton.jit
def _attention_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, heads, tokens, head_dim,
                                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[i] = sum_d dO[i, d] * O[i, d] in fp32: the row term of the softmax backward."""
    pid_bh = tl.program_id(1)
    b, h = pid_bh // heads, pid_bh % heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < tokens
    mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
    tl.store(DELTA + pid_bh * tokens + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask_m)


@triton.heuristics(_EVEN)
@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                               sgb, sgh, sgn, sgd,
                               heads, tokens, head_dim, qk_scale, sm_scale,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr, EVEN_M: tl.constexpr,
                               EVEN_MD: tl.constexpr, EVEN_ND: tl.constexpr, MASK_KEYS: tl.constexpr,
                               MASK_SCORES: tl.constexpr):
    """dK, dV of one key block, over all query blocks; works in the transposed orientation (keys x queries).
    dK and dV share the strides (sgb, ...), being allocated alike."""
    pid_bh = tl.program_id(1)
    b, h = pid_bh // heads, pid_bh % heads
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n, mask_d = offs_n < tokens, offs_d < head_dim
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = _load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask_nd, EVEN_ND)
    v = _load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask_nd, EVEN_ND)
    q_base, do_base = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, tokens, BLOCK_M):
        rows = start + offs_m
        mask_m = rows < tokens
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = _load(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd, mask_md, EVEN_MD)
        do = _load(do_base + rows[:, None] * sdn + offs_d[None, :] * sdd, mask_md, EVEN_MD)
        lse = _load(LSE + pid_bh * tokens + rows, mask_m, EVEN_M)
        delta = _load(DELTA + pid_bh * tokens + rows, mask_m, EVEN_M)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.exp2(st - lse[None, :])
        if MASK_SCORES:
            pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    out = b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd
    _store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask_nd, EVEN_ND)
    _store(DV + out, dv.to(DV.dtype.element_ty), mask_nd, EVEN_ND)


@triton.heuristics(_EVEN)
@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                             sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                             sgb, sgh, sgn, sgd,
                             heads, tokens, head_dim, qk_scale, sm_scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, EVEN_M: tl.constexpr,
                             EVEN_MD: tl.constexpr, EVEN_ND: tl.constexpr, MASK_KEYS: tl.constexpr,
                             MASK_SCORES: tl.constexpr):
    """dQ of one query block, over all key blocks."""
    pid_bh = tl.program_id(1)
    b, h = pid_bh // heads, pid_bh % heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < tokens, offs_d < head_dim
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask_md, EVEN_MD)
    do = _load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask_md, EVEN_MD)
    lse = _load(LSE + pid_bh * tokens + offs_m, mask_m, EVEN_M)
    delta = _load(DELTA + pid_bh * tokens + offs_m, mask_m, EVEN_M)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, tokens, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < tokens
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = _load(k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask_dn, EVEN_ND)
        vt = _load(v_base + cols[None, :] * svn + offs_d[:, None] * svd, mask_dn, EVEN_ND)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK_SCORES:
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    _store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd,
           (dq * sm_scale).to(DQ.dtype.element_ty), mask_md, EVEN_MD)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per padded head_dim for the GPU autotuner; see the module
# docstring for why the blocks shrink with head_dim. Forward and dQ hold one [BLOCK_M, head_dim] fp32
# accumulator, dK/dV two [BLOCK_N, head_dim] ones. Each list ends with a small config that fits even fp32 tiles
# (twice the shared memory of fp16) at its head_dim; the autotuner drops candidates that run out of resources.
_CONFIGS = {
    "fwd": {
        64: ((128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2)),
        128: ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (32, 32, 4, 2)),
        256: ((64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 16, 4, 1)),
        512: ((32, 32, 8, 1), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)),
    },
    "dkdv": {
        64: ((32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2)),
        128: ((32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 32, 4, 1)),
        256: ((32, 32, 8, 1), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 1)),
        512: ((16, 16, 8, 1), (32, 16, 8, 1), (16, 16, 4, 1)),
    },
    "dq": {
        64: ((128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)),
        128: ((64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 1)),
        256: ((32, 32, 8, 1), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)),
        512: ((16, 16, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)),
    },
}
_KERNELS = {"fwd": _attention_fwd_kernel, "dkdv": _attention_bwd_dkdv_kernel, "dq": _attention_bwd_dq_kernel}
_INTERPRETER_BLOCKS = (32, 32)  # several blocks even on the small test shapes, so masking is exercised


def _block_d(head_dim):
    if head_dim > 512:
        raise ValueError(f"attention kernels take head_dim <= 512, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


@functools.lru_cache(maxsize=None)
def _tuned(name, block_d):
    """Kernel `name` autotuned over its candidate configs for this padded head_dim (GPU only)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _CONFIGS[name][max(64, block_d)]]
    return triton.autotune(configs=configs, key=["tokens", "head_dim"])(_KERNELS[name])


def _autotuning():
    """False under RDP_CORE_TRITON_AUTOTUNE=0: each kernel then runs the last (smallest) candidate of its list,
    which fits every dtype at its head_dim, compiled once instead of up to four times. For correctness runs in
    a short GPU session (bench/gpu_check.sh's tests step); never for timings."""
    return os.environ.get("RDP_CORE_TRITON_AUTOTUNE", "1") != "0"


def _launch(name, grid, args, block_d, precision):
    """Runs kernel `name` on `grid(meta)`: the fixed interpreter blocks, the autotuned GPU configs, or the
    smallest GPU config when autotuning is off."""
    if _INTERPRETER:
        block_m, block_n = _INTERPRETER_BLOCKS
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        _KERNELS[name][grid(meta)](*args, BLOCK_D=block_d, PRECISION=precision, **meta)
    elif not _autotuning():
        block_m, block_n, warps, stages = _CONFIGS[name][max(64, block_d)][-1]
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        _KERNELS[name][grid(meta)](*args, BLOCK_D=block_d, PRECISION=precision, num_warps=warps, num_stages=stages,
                                   **meta)
    else:
        _tuned(name, block_d)[grid](*args, BLOCK_D=block_d, PRECISION=precision)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def _check(*tensors):
    q = tensors[0]
    for t in tensors:
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError("attention kernels: expected tensors of one shape, dtype and device")
    if q.dim() != 4 or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention kernels: expected (batch, heads, tokens, head_dim) fp32/fp16/bf16 tensors, "
                         f"got {q.dtype} of shape {tuple(q.shape)}")


def attention_fwd(q, k, v):
    """(out, lse): out = softmax(q k^T / sqrt(head_dim)) v (contiguous, q's dtype) and the fp32 (batch * heads,
    tokens) base-2 row logsumexp of the log2(e)-scaled scores, for attention_bwd."""
    _check(q, k, v)
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch * heads, tokens, dtype=torch.float32, device=q.device)
    qk_scale = _LOG2E / math.sqrt(head_dim)
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, tokens, head_dim,
            qk_scale)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)

    _launch("fwd", grid, args, _block_d(head_dim), _precision(q.dtype))
    return out, lse


def attention_bwd(q, k, v, out, lse, grad_out):
    """(dq, dk, dv), contiguous in q's dtype: the vector-Jacobian product of attention with grad_out, given
    attention_fwd's out and lse."""
    _check(q, k, v, out, grad_out)
    batch, heads, tokens, head_dim = q.shape
    block_d = _block_d(head_dim)
    delta = torch.empty_like(lse)
    _attention_bwd_preprocess_kernel[(triton.cdiv(tokens, 32), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, tokens, head_dim, BLOCK_M=32, BLOCK_D=block_d)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    scales = (_LOG2E / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride())
    common = (heads, tokens, head_dim, *scales)
    precision = _precision(q.dtype)
    _launch("dkdv",
            lambda meta: (triton.cdiv(tokens, meta["BLOCK_N"]), batch * heads),
            (q, k, v, grad_out, lse, delta, dk, dv, *strides, *common), block_d, precision)
    _launch("dq",
            lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads),
            (q, k, v, grad_out, lse, delta, dq, *strides, *common), block_d, precision)
    return dq, dk, dv
