"""One whole DDPM++ CIFAR-10 forward (score_sde's config: nf 128, 4 res blocks, 61.8M parameters) per backend.

    pytest bench/bench_model.py --benchmark-only --benchmark-group-by=group

Random weights (the time does not depend on their values), eval mode, no gradients, batch 8 on the CPU
and 64 on a GPU. Providers, side by side on one model object:

- torch-eager: the same modules with RDP_CORE_BACKEND=torch, i.e. stock F.group_norm, F.silu and torch's
  scaled_dot_product_attention: what the model costs written in plain torch.
- rdp: backend="auto", the engine's path (the C++ ops on the CPU, the Triton kernels on a GPU).
- torch-compile (GPU only): torch.compile of the torch-eager model, the alternative a GPU user would pick.

extra_info holds the images per second.
"""
import functools

import pytest
import torch

from rdp_core.models.ncsnpp import CIFAR10_DDPMPP, NCSNpp

CPU_BATCH, GPU_BATCH = 8, 64
PROVIDERS = ["torch-eager", "rdp", "torch-compile"]


@functools.lru_cache(maxsize=None)
def _model(device):
    torch.manual_seed(0)
    model = NCSNpp(CIFAR10_DDPMPP).eval().requires_grad_(False)
    for p in model.parameters():  # score_sde zero-initialises each block's last conv: make every layer count
        p.add_(torch.randn_like(p) * 0.02)
    return model.to(device)


@functools.lru_cache(maxsize=None)
def _compiled(device):
    return torch.compile(_model(device))


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("device", _devices())
def test_ddpmpp_cifar10_forward(timed, benchmark, monkeypatch, device, provider):
    if provider == "torch-compile" and device == "cpu":
        pytest.skip("torch.compile is compared on the GPU only (its CPU inductor build takes minutes here)")
    if provider != "rdp":
        monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    device = torch.device(device)
    batch = CPU_BATCH if device.type == "cpu" else GPU_BATCH
    benchmark.group = f"ddpmpp-cifar10-forward-{device.type}-batch{batch}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    t = (torch.rand(batch, generator=gen) * 100).to(device)
    model = _compiled(device) if provider == "torch-compile" else _model(device)
    with torch.no_grad():
        model(x, t)  # warm-up: kernel compilation, allocator, oneDNN primitive caches
        seconds = timed(lambda: model(x, t), device, provider=provider, batch=batch)
    if seconds is not None:
        benchmark.extra_info["images/s"] = batch / seconds

