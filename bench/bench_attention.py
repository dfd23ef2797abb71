"""Attention, providers side by side per shape and pass (forward, forward+backward).

    pytest bench/bench_attention.py --benchmark-only --benchmark-group-by=group

CPU (always runs): torch's scaled_dot_product_attention, what a user would pick, against our cpp backend, in
float32. GPU (skipped without CUDA): eager math attention, torch SDPA (flash / memory-efficient kernels),
torch.compile of the eager math, and our triton backend, in fp16. Shapes are the UNets': DDPM++'s one head
of 256 channels at 16x16, ADM's heads of 64 channels at 16x16 and 32x32. extra_info holds TFLOP/s counting the
matrix products only (forward 4 * B * H * N^2 * D, backward 2.5 times that, as FlashAttention counts).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.ops.attention import attention, attention_reference

CPU_SHAPES = [(8, 1, 256, 256), (8, 4, 256, 64), (2, 4, 1024, 64)]
GPU_SHAPES = [(32, 1, 256, 256), (32, 4, 256, 64), (16, 4, 1024, 64), (32, 2, 256, 512)]
PASSES = ["fwd", "fwd+bwd"]
GRAPH_CALLS = 20  # on a GPU each round replays a CUDA graph of this many calls: kernel time, not launch overhead


def _math_sdpa(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


@functools.lru_cache(maxsize=None)
def _compiled_eager():
    torch._dynamo.config.recompile_limit = 256  # one compile per shape and dtype; past 8 dynamo silently runs eager
    return torch.compile(lambda q, k, v: (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v,
                         dynamic=False)


CPU_PROVIDERS = {
    "torch-sdpa": F.scaled_dot_product_attention,
    "rdp-cpp": functools.partial(attention, backend="cpp"),
}
GPU_PROVIDERS = {
    "torch-eager-math": _math_sdpa,
    "torch-sdpa": F.scaled_dot_product_attention,
    "torch-compile": lambda q, k, v: _compiled_eager()(q, k, v),
    "rdp-triton": functools.partial(attention, backend="triton"),
}


def _inputs(shape, device, dtype, requires_grad):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(requires_grad) for _ in range(4)]


def _step(fn, q, k, v, grad_out, pass_):
    """One timed call: the forward alone under no_grad, or forward then backward to q, k, v."""
    if pass_ == "fwd":
        with torch.no_grad():
            return fn(q, k, v)
    return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


def _run(timed, benchmark, fn, shape, device, dtype, pass_, provider):
    name = "x".join(map(str, shape))
    benchmark.group = f"attention-{pass_}-{device}-{str(dtype).removeprefix('torch.')}-{name}"
    q, k, v, grad_out = _inputs(shape, device, dtype, requires_grad=pass_ != "fwd")
    seconds = timed(lambda: _step(fn, q, k, v, grad_out, pass_), torch.device(device), graph_calls=GRAPH_CALLS,
                    shape=list(shape), provider=provider, dtype=str(dtype), **{"pass": pass_})
    if seconds is not None:  # None under --benchmark-disable
        b, h, n, d = shape
        flops = 4 * b * h * n * n * d * (1.0 if pass_ == "fwd" else 3.5)
        benchmark.extra_info["TFLOP/s"] = flops / seconds / 1e12


@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_cpu(timed, benchmark, shape, pass_, provider):
    if provider == "rdp-cpp" and _backend.cpp_extension() is None:
        pytest.skip("rdp_core._C was not built")
    _run(timed, benchmark, CPU_PROVIDERS[provider], shape, "cpu", torch.float32, pass_, provider)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_gpu(timed, benchmark, shape, pass_, provider):
    _run(timed, benchmark, GPU_PROVIDERS[provider], shape, "cuda", torch.float16, pass_, provider)


def test_reference_is_what_the_providers_compute():
    """The bench compares like with like: every CPU provider computes the reference function."""
    q, k, v, _ = _inputs((1, 2, 40, 16), "cpu", torch.float32, requires_grad=False)
    for fn in CPU_PROVIDERS.values():
        if fn is not F.scaled_dot_product_attention and _backend.cpp_extension() is None:
            continue
        torch.testing.assert_close(fn(q, k, v), attention_reference(q, k, v), atol=1e-5, rtol=1e-4)
