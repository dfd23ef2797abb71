"""GroupNorm+SiLU (and ADM's scale-shift variant), providers side by side per shape and pass.

    pytest bench/bench_group_norm_silu.py --benchmark-only --benchmark-group-by=group

CPU (always runs, float32): the forward against stock torch eager, its two halves and our torch reference;
forward+backward (the gradient to x only, as an attack takes it: frozen weights) of eager against our cpp
backend. GPU (skipped without CUDA): torch eager, torch.compile of eager and our triton backend, forward and
forward+backward, fp16 and fp32, plain GroupNorm+SiLU and the scale-shift variant. extra_info holds GB/s over
the minimal traffic (forward: read x, write y; backward adds: read x and grad_y, write grad_x) and, on the
GPU, that figure as a fraction of the device's measured copy bandwidth.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.ops import group_norm_act, group_norm_silu, group_norm_silu_torch

CPU_SHAPES = [(16, 128, 32, 32), (8, 256, 16, 16), (8, 512, 8, 8)]
# DDPM++ levels at batch 32, and ADM's 512 channels at 64x64 (16 channels of 4096 pixels per group).
GPU_SHAPES = [(32, 128, 32, 32), (32, 256, 16, 16), (32, 512, 8, 8), (8, 512, 64, 64)]
# On a GPU each round replays a CUDA graph of this many calls: the kernels' time, not the host's launch overhead
# (eager per-call latency at these shapes is 40-600 us of mostly host work, see bench/RESULTS.md).
GRAPH_CALLS = 20
PROVIDERS = {
    "torch-eager": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)),
    # The two halves of eager alone, to tell its arithmetic from the cost of its intermediate buffer.
    "torch-group_norm-only": lambda x, w, b: F.group_norm(x, 32, w, b),
    "torch-silu-only": lambda x, w, b: F.silu(x),
    "rdp-torch-reference": lambda x, w, b: group_norm_silu_torch(x, 32, w, b),
    "rdp-cpp": lambda x, w, b: group_norm_silu(x, 32, w, b, backend="cpp"),
}


def _shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_group_norm_silu_forward_cpu(timed, benchmark, shape, provider):
    if provider == "rdp-cpp" and _backend.cpp_extension() is None:
        pytest.skip("rdp_core._C was not built")
    benchmark.group = f"group_norm_silu-fwd-cpu-{_shape_id(shape)}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    fn = PROVIDERS[provider]
    with torch.no_grad():
        seconds = timed(lambda: fn(x, w, b), x.device, shape=list(shape), provider=provider)
    if seconds is not None:  # None under --benchmark-disable
        moved = 2 * x.numel() * x.element_size()  # one read, one write
        benchmark.extra_info["GB/s"] = moved / seconds / 1e9


# --- forward+backward and the GPU -------------------------------------------------------------------------------


def _eager(x, w, b, scale, shift):
    """What a user writes: ADM's ResBlock for the scale-shift variant, F.silu(F.group_norm(...)) otherwise."""
    y = F.group_norm(x, 32, w.to(x.dtype), b.to(x.dtype))  # stock group_norm wants the weights in x's dtype
    if scale is not None:
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y)


@functools.lru_cache(maxsize=None)
def _compiled_eager():
    torch._dynamo.config.recompile_limit = 256  # one compile per shape and dtype; past 8 dynamo silently runs eager
    return torch.compile(_eager, dynamic=False)


PASS_PROVIDERS = {
    "torch-eager": _eager,
    "torch-compile": lambda *args: _compiled_eager()(*args),
    "rdp-cpp": lambda x, w, b, scale, shift: group_norm_act(x, 32, w, b, 1e-5, scale, shift, backend="cpp"),
    "rdp-triton": lambda x, w, b, scale, shift: group_norm_act(x, 32, w, b, 1e-5, scale, shift, backend="triton"),
}


def _inputs(shape, device, dtype, scale_shift, requires_grad):
    gen = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(requires_grad)
    w, b = (torch.randn(c, generator=gen).to(device) for _ in range(2))  # float32, as in the models
    scale, shift = ((torch.randn(n, c, generator=gen) * 0.1).to(device, dtype) for _ in range(2)) if scale_shift \
        else (None, None)
    return x, w, b, scale, shift, torch.randn(shape, generator=gen).to(device, dtype)


def _step(fn, x, w, b, scale, shift, grad_y, pass_):
    """One timed call: the forward alone under no_grad, or forward then the backward to x (frozen weights)."""
    if pass_ == "fwd":
        with torch.no_grad():
            return fn(x, w, b, scale, shift)
    return torch.autograd.grad(fn(x, w, b, scale, shift), x, grad_y)


@functools.lru_cache(maxsize=None)
def _copy_bandwidth(device):
    """Measured device-to-device copy bandwidth in GB/s (read + write), the ceiling for these memory-bound ops."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    return 20 * 2 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9


def _run(timed, benchmark, provider, shape, device, dtype, pass_, variant):
    benchmark.group = f"group_norm_{variant}-{pass_}-{device}-{str(dtype).removeprefix('torch.')}-{_shape_id(shape)}"
    x, w, b, scale, shift, grad_y = _inputs(shape, device, dtype, variant == "scale_shift_silu", pass_ != "fwd")
    fn = PASS_PROVIDERS[provider]
    seconds = timed(lambda: _step(fn, x, w, b, scale, shift, grad_y, pass_), torch.device(device),
                    graph_calls=GRAPH_CALLS, shape=list(shape), provider=provider, dtype=str(dtype), variant=variant,
                    **{"pass": pass_})
    if seconds is not None:  # None under --benchmark-disable
        moved = (2 if pass_ == "fwd" else 5) * x.numel() * x.element_size()
        gbps = moved / seconds / 1e9
        benchmark.extra_info["GB/s"] = gbps
        if device == "cuda":
            benchmark.extra_info["copy GB/s"] = _copy_bandwidth(torch.device(device))
            benchmark.extra_info["fraction of copy bandwidth"] = gbps / benchmark.extra_info["copy GB/s"]


@pytest.mark.parametrize("provider", ["torch-eager", "rdp-cpp"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_group_norm_silu_fwd_bwd_cpu(timed, benchmark, shape, provider):
    if provider == "rdp-cpp" and _backend.cpp_extension() is None:
        pytest.skip("rdp_core._C was not built")
    _run(timed, benchmark, provider, shape, "cpu", torch.float32, "fwd+bwd", "silu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["torch-eager", "torch-compile", "rdp-triton"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("variant", ["silu", "scale_shift_silu"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_id)
def test_group_norm_gpu(timed, benchmark, shape, variant, dtype, pass_, provider):
    _run(timed, benchmark, provider, shape, "cuda", dtype, pass_, variant)
