"""Purification throughput at t* = 0.1 (100 Euler-Maruyama steps), providers side by side.

    pytest bench/bench_purify.py --benchmark-only --benchmark-group-by=group

Providers, on one model object and one batch of images:

- torchsde-fp32: torchsde.sdeint the way DiffPure calls it (bench/diffpure_sde.py), eager, torch's default
  precision flags (under which cuDNN convolutions run in TF32): what a user would otherwise run.
- rdp-eager-fp32: `purify(grad="none", graphs=False)` in IEEE float32 (no TF32 anywhere).
- rdp-graphed-fp32: the same, replayed as a CUDA graph (rdp_core.sampling.graphs).
- rdp-graphed-tf32: graphed, TF32 allowed in convolutions and matmuls.
- rdp-graphed-bf16: graphed, `precision="bf16"` (model under autocast, sampler state in float32).
- rdp-graphed-bf16-cl (GPU): the same with the model's weights, and so its activations, in channels-last
  memory: cuDNN's convolutions without their NCHW<->NHWC transposes, the Triton norms reading NHWC in place.
- rdp-graphed-bf16-autocast (GPU): graphed, the model under plain autocast, which casts every weight at every
  forward: what precision="bf16" ran before it kept its weight casts (rdp_core.sampling.precision).

GPU (skipped without CUDA): the DDPM++ CIFAR-10 config (61.8M parameters, random weights: the time does
not depend on them) at batch 1, 64 and 256. CPU (always): the default model's size at batch 4, torchsde
against rdp eager. extra_info holds images/s, the model's FLOPs per image and forward (counted by
torch.utils.flop_counter) and, on a GPU, the achieved model TFLOP/s and its fraction of the measured bf16
matmul ceiling.
"""
import contextlib
import copy
import functools
import os
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rdp_core
from diffpure_sde import torchsde_purify
from rdp_core.models.ncsnpp import CIFAR10_DDPMPP, NCSNpp, ScoreSDEEpsModel
from rdp_core.train import CPU_MODEL

T_STAR, STEPS = 0.1, 100
GPU_PROVIDERS = ["torchsde-fp32", "rdp-eager-fp32", "rdp-graphed-fp32", "rdp-graphed-tf32", "rdp-graphed-bf16",
                 "rdp-graphed-bf16-cl", "rdp-graphed-bf16-autocast"]
CPU_PROVIDERS = ["torchsde-fp32", "rdp-eager-fp32"]


@functools.lru_cache(maxsize=None)
def _model(device):
    torch.manual_seed(0)
    net = NCSNpp(CPU_MODEL if device == "cpu" else CIFAR10_DDPMPP)
    with torch.no_grad():
        for p in net.parameters():  # score_sde zero-initialises each block's last conv: make every layer count
            p.add_(torch.randn_like(p) * 0.02)
    return ScoreSDEEpsModel(net).eval().requires_grad_(False).to(device)


@functools.lru_cache(maxsize=None)
def _channels_last_model(device):
    """_model(device) in channels-last memory, as a separate object (CUDA graphs are cached per model)."""
    return copy.deepcopy(_model(device)).to(memory_format=torch.channels_last)


class _AutocastEveryCall(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x, t).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _autocast_every_call_model(device):
    return _AutocastEveryCall(_model(device))


# Suffixes that run the provider they follow on another model object (CUDA graphs are cached per model).
_MODEL_VARIANTS = {"-cl": _channels_last_model, "-autocast": _autocast_every_call_model}


@contextlib.contextmanager
def _tf32(allowed):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _runner(provider, model, x):
    if provider == "torchsde-fp32":
        torchsde = pytest.importorskip("torchsde", reason="pip install torchsde to compare with DiffPure's sampler")
        return lambda: torchsde_purify(torchsde, model, x, T_STAR)
    graphs = None if x.is_cuda and "graphed" in provider else False
    # A model that runs its own autocast is given as it is: with_precision would keep its weight casts.
    precision = "bf16" if provider.endswith("bf16") and not isinstance(model, _AutocastEveryCall) else "fp32"
    tf32 = provider.endswith(("tf32", "bf16"))

    def run():
        with _tf32(tf32) if x.is_cuda else contextlib.nullcontext():
            return rdp_core.purify(x, T_STAR, model=model, grad="none", graphs=graphs, precision=precision,
                                   generator=torch.Generator().manual_seed(1))

    return run


@functools.lru_cache(maxsize=None)
def _flops_per_image(device):
    # FlopCounterMode sees aten ops only, not the compiled kernels (the CPU Winograd convolutions, the Triton
    # attention): count on stock torch ops, which do the same products.
    model, x = _model(device), torch.rand(2, 3, 32, 32, device=device)
    with mock.patch.dict(os.environ, {"RDP_CORE_BACKEND": "torch"}), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        model(x, torch.full((2,), T_STAR, device=device))
    return counter.get_total_flops() / 2


@functools.lru_cache(maxsize=None)
def _bf16_matmul_tflops(device):
    """The measured bf16 matmul ceiling: an 8192^3 product on random data, median of 10 after warm-up."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def _bench(timed, benchmark, device, provider, batch):
    device = torch.device(device)
    benchmark.group = f"purify-t0.1-sde{STEPS}-{device.type}-batch{batch}"
    variant = next((suffix for suffix in _MODEL_VARIANTS if provider.endswith(suffix)), "")
    model = _MODEL_VARIANTS.get(variant, _model)(str(device))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    run = _runner(provider.removesuffix(variant), model, x)
    run()  # warm-up: graph capture, Triton autotuning, cuDNN algorithm choice
    seconds = timed(run, device, provider=provider, batch=batch)
    if seconds is None:
        return
    flops = _flops_per_image(str(device))
    benchmark.extra_info.update({"images/s": batch / seconds, "model GFLOP per image and forward": flops / 1e9})
    if device.type == "cuda":
        achieved = flops * batch * STEPS / seconds / 1e12
        ceiling = _bf16_matmul_tflops(device)
        benchmark.extra_info.update({"model TFLOP/s": achieved, "bf16 matmul TFLOP/s": ceiling,
                                     "fraction of bf16 ceiling": achieved / ceiling})


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_purify_throughput_cpu(timed, benchmark, provider):
    _bench(timed, benchmark, "cpu", provider, batch=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_purify_throughput_gpu(timed, benchmark, batch, provider):
    _bench(timed, benchmark, "cuda", provider, batch)
