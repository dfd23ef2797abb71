"""3x3 convolutions (stride 1, padding 1) on the CPU, providers side by side per shape and pass.

    pytest bench/bench_conv3x3.py --benchmark-only --benchmark-group-by=group

Providers, float32, 2-D images of shape (N, C, H, W) convolved to K channels:

- torch-nchw: F.conv2d on contiguous NCHW tensors, what a model written in plain torch runs.
- torch-channels-last: F.conv2d on channels-last tensors (oneDNN's native layout, the engine's model layout).
- rdp-winograd: the Winograd F(4x4, 3x3) kernel of rdp_core._C on channels-last tensors, called directly
  whatever conv3x3's dispatch would choose, so that the shapes where dispatch keeps the direct convolution
  (fewer than 64 input channels) show why.

Shapes: the DDPM++ CIFAR-10 model's at batch 8 (bench_model.py's batch), and the default model's (nf 32) at
batch 64 (an attack's 16 images times 4 EOT draws). Passes: the forward under no_grad, and forward+backward to
the input (what an attack's gradient costs). extra_info holds the effective GFLOP/s: the direct
convolution's 2 * N * H * W * K * C * 9 multiply-adds per second, for every provider.
"""
import pytest
import torch

from rdp_core import _backend
from rdp_core.ops.conv3x3 import WinogradFilters, _winograd, conv3x3_torch

# (N, C, H, W, K)
SHAPES = [(8, 128, 32, 32, 128), (8, 256, 16, 16, 256), (8, 384, 16, 16, 256), (8, 512, 8, 8, 256),
          (64, 32, 32, 32, 32), (64, 64, 16, 16, 64), (64, 128, 8, 8, 64)]
PASSES = ["fwd", "fwd+bwd"]
PROVIDERS = ["torch-nchw", "torch-channels-last", "rdp-winograd"]


class _WinogradConv(torch.autograd.Function):
    """The cpp backend's forward and input backward without dispatch (the bench's direct call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, filters):
        ctx.filters, ctx.weight = filters, weight
        return _winograd(x, filters.get(weight), bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        return _winograd(grad_y, ctx.filters.get(ctx.weight, adjoint=True)), None, None, None


def _tensors(shape, provider, requires_grad):
    n, c, h, w, k = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=gen)
    grad_out = torch.randn(n, k, h, w, generator=gen)
    if provider != "torch-nchw":
        x, weight, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight, grad_out))
    return x.requires_grad_(requires_grad), weight, bias, grad_out


def _conv(provider):
    if provider == "rdp-winograd":
        filters = WinogradFilters()
        return lambda x, weight, bias: _WinogradConv.apply(x, weight, bias, filters)
    return conv3x3_torch


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv3x3_cpu(timed, benchmark, shape, pass_, provider):
    if provider == "rdp-winograd" and _backend.cpp_extension() is None:
        pytest.skip("rdp_core._C was not built")
    benchmark.group = f"conv3x3-{pass_}-cpu-float32-{'x'.join(map(str, shape))}"
    x, weight, bias, grad_out = _tensors(shape, provider, requires_grad=pass_ != "fwd")
    conv = _conv(provider)

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                return conv(x, weight, bias)
        return torch.autograd.grad(conv(x, weight, bias), x, grad_out)

    seconds = timed(step, torch.device("cpu"), shape=list(shape), provider=provider, **{"pass": pass_})
    if seconds is not None:
        n, c, h, w, k = shape
        flops = 2 * n * h * w * k * c * 9 * (1 if pass_ == "fwd" else 2)
        benchmark.extra_info["GFLOP/s"] = flops / seconds / 1e9


@pytest.mark.skipif(_backend.cpp_extension() is None, reason="rdp_core._C was not built")
def test_providers_compute_the_same_convolution():
    """The bench compares like with like: every provider computes conv3x3, forward and input gradient."""
    shape = (2, 64, 9, 7, 32)
    results = []
    for provider in PROVIDERS:
        x, weight, bias, grad_out = _tensors(shape, provider, requires_grad=True)
        y = _conv(provider)(x, weight, bias)
        results.append((y, *torch.autograd.grad(y, x, grad_out)))
    for y, grad_x in results[1:]:
        torch.testing.assert_close(y, results[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad_x, results[0][1], atol=1e-4, rtol=1e-4)
