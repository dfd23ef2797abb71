"""One whole DDPM++ CIFAR-10 forward (score_sde's config: nf 128, 4 res blocks, 61.8M parameters) per backend.

    pytest bench/bench_model.py --benchmark-only --benchmark-group-by=group

Random weights (the time does not depend on their values), eval mode, no gradients, batch 8 on the CPU
and 64 on a GPU. Providers, side by side, each on its own copy of one model:

- torch-eager: the modules with RDP_CORE_BACKEND=torch (stock F.group_norm, F.silu and torch's
  scaled_dot_product_attention) in NCHW memory: what the model costs written in plain torch.
- torch-eager-channels-last (CPU): the same stock ops on a channels-last model, the layout change alone.
- rdp: the engine's path: backend="auto" (the C++ ops on the CPU, the Triton kernels on a GPU) and the
  model in rdp_core.models.engine_layout (channels-last on the CPU), as the default model is loaded.
- rdp-bf16 (CPU): the same under bfloat16 autocast, what purify(..., precision="bf16") runs; a different
  (less precise) result, so not a substitute for the float32 rows.
- rdp-channels-last (GPU only): rdp with the model in channels-last memory, which the GPU's engine_layout
  does not choose yet: cuDNN's NHWC convolutions and the Triton norms reading NHWC in place.
- torch-compile (GPU only): torch.compile of the torch-eager model, the alternative a GPU user would pick.

extra_info holds the images per second.
"""
import contextlib
import copy
import functools

import pytest
import torch

from rdp_core.models.layout import engine_layout
from rdp_core.models.ncsnpp import CIFAR10_DDPMPP, NCSNpp

CPU_BATCH, GPU_BATCH = 8, 64
PROVIDERS = ["torch-eager", "torch-eager-channels-last", "rdp", "rdp-bf16", "rdp-channels-last", "torch-compile"]
CPU_ONLY, GPU_ONLY = ("torch-eager-channels-last", "rdp-bf16"), ("rdp-channels-last", "torch-compile")


@functools.lru_cache(maxsize=None)
def _model(device):
    torch.manual_seed(0)
    model = NCSNpp(CIFAR10_DDPMPP).eval().requires_grad_(False)
    for p in model.parameters():  # score_sde zero-initialises each block's last conv: make every layer count
        p.add_(torch.randn_like(p) * 0.02)
    return model.to(device)


@functools.lru_cache(maxsize=None)
def _provider_model(device, provider):
    if provider == "torch-eager":
        return _model(device)
    if provider == "torch-compile":
        return torch.compile(_model(device))
    if provider in ("torch-eager-channels-last", "rdp-channels-last"):
        return copy.deepcopy(_model(device)).to(memory_format=torch.channels_last)
    return engine_layout(copy.deepcopy(_model(device)))  # rdp, rdp-bf16


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("device", _devices())
def test_ddpmpp_cifar10_forward(timed, benchmark, monkeypatch, device, provider):
    if provider in GPU_ONLY and device == "cpu":
        pytest.skip("torch.compile is compared on the GPU only (its CPU inductor build takes minutes here)"
                    if provider == "torch-compile" else "on the CPU the rdp row is already channels-last")
    if provider in CPU_ONLY and device != "cpu":
        pytest.skip("a CPU-only provider (the GPU rows are torch-eager, rdp, rdp-channels-last and torch-compile)")
    if not provider.startswith("rdp"):
        monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    device = torch.device(device)
    batch = CPU_BATCH if device.type == "cpu" else GPU_BATCH
    benchmark.group = f"ddpmpp-cifar10-forward-{device.type}-batch{batch}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    t = (torch.rand(batch, generator=gen) * 100).to(device)
    model = _provider_model(device, provider)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16) if provider == "rdp-bf16" else contextlib.nullcontext()
    with torch.no_grad(), bf16:
        model(x, t)  # warm-up: kernel compilation, allocator, oneDNN primitive caches
        seconds = timed(lambda: model(x, t), device, provider=provider, batch=batch)
    if seconds is not None:
        benchmark.extra_info["images/s"] = batch / seconds
