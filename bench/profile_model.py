"""Where the time of one DDPM++ CIFAR-10 forward goes, per backend: the share of each kind of op.

    python bench/profile_model.py [--device cpu|cuda] [--batch 8] [--precision fp32|bf16]
        [--providers torch-eager,rdp] [--top 0]

The models of bench/bench_model.py (score_sde's config, random weights, eval, no gradients), profiled
once per provider (torch-eager in NCHW, torch-eager-channels-last, rdp in the engine's layout,
rdp-channels-last) after a
warm-up, in float32 or in bf16: torch's providers under autocast, rdp's as purify(..., precision="bf16") runs
them (autocast, with the weights it casts kept between calls: rdp_core.sampling.precision). It says how much of a
forward each kind of op takes and, with --top K, the K kernels that take the most time, by name. Last, it
prints how far each provider's output is from the first one's (the Winograd convolutions round differently
from the direct ones), relative to the output's largest magnitude.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from rdp_core.sampling.precision import with_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import _provider_model  # noqa: E402  (the benchmark's models, layouts included)

KINDS = {  # first match wins; names are torch's and rdp_core's autograd.Function / op names
    "convolution": ("conv",),
    "matmul (attention projections, time embedding)": ("bmm", "mm", "matmul", "addmm", "einsum"),
    "group norm (+ FiLM, SiLU)": ("group_norm", "groupnorm", "silu"),
    "attention": ("attention", "softmax"),
}


def kind_of(name):
    lowered = name.lower()
    for kind, keys in KINDS.items():
        if any(key in lowered for key in keys):
            return kind
    return "other (adds, copies, resampling, ...)"


def profile_forward(model, x, t, device, precision, engine):
    """(ops, kernels, output) of one profiled forward: the self time (microseconds, by name) of every op and of
    every kernel. On a GPU an op's self device time is that of the kernels it launched, which are listed again
    as kernels: summing both would count every kernel twice, so kinds are read from the ops and the top list
    from the kernels. On the CPU both are the ops' self CPU time. engine: bf16 as purify runs it."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if precision == "bf16" and engine:
        model = with_precision(model, "bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and not engine)
    with torch.no_grad(), autocast:
        # Warm-up: Triton compilation and autotuning, cuDNN algorithm choice, the allocator, and the bf16
        # wrapper's two first calls (it records which weights autocast casts, then casts them once).
        for _ in range(2):
            model(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            out = model(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
    ops, kernels = {}, {}
    for event in prof.key_averages():
        if device.type == "cuda":
            time_us = event.self_device_time_total
            times = ops if event.device_type == DeviceType.CPU else kernels
        else:
            time_us, times = event.self_cpu_time_total, ops
        if time_us > 0:
            times[event.key] = times.get(event.key, 0.0) + time_us
    return ops, (kernels if device.type == "cuda" else ops), out


def report(provider, backend, ops, kernels, top):
    """Prints the shares per kind of op and the `top` most expensive kernels (ops on the CPU)."""
    total = sum(ops.values())
    shares = {}
    for name, time_us in ops.items():
        shares[kind_of(name)] = shares.get(kind_of(name), 0.0) + time_us
    print(f"\n{provider} (backend {backend}): {total / 1e3:.2f} ms of op self time")
    for kind, time_us in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"  {kind:<50} {time_us / 1e3:9.2f} ms  {100 * time_us / total:5.1f}%")
    for name, time_us in sorted(kernels.items(), key=lambda item: -item[1])[:top]:
        print(f"    {time_us / 1e3:8.3f} ms {100 * time_us / total:5.1f}%  {name[:110]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--providers", default="torch-eager,rdp",
                        help="comma-separated, from torch-eager, torch-eager-channels-last, rdp, rdp-channels-last")
    parser.add_argument("--top", type=int, default=0, help="also list the K most expensive kernels (ops on the CPU)")
    args = parser.parse_args()
    backends = {"torch-eager": "torch", "torch-eager-channels-last": "torch", "rdp": "auto",
                "rdp-channels-last": "auto"}
    providers = args.providers.split(",")
    unknown = sorted(set(providers) - set(backends))
    if unknown:
        parser.error(f"unknown providers {unknown}; expected some of {sorted(backends)}")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    t = (torch.rand(args.batch, generator=gen) * 100).to(device)
    print(f"DDPM++ CIFAR-10 forward, batch {args.batch}, {args.precision}, {device.type}, "
          f"{torch.get_num_threads()} threads")
    outputs = {}
    for provider in providers:
        os.environ["RDP_CORE_BACKEND"] = backends[provider]
        ops, kernels, out = profile_forward(_provider_model(device, provider), x, t, device, args.precision,
                                            engine=provider.startswith("rdp"))
        outputs[provider] = out.double()
        report(provider, backends[provider], ops, kernels, args.top)
    first, *others = providers
    for provider in others:
        difference = ((outputs[provider] - outputs[first]).abs().max() / outputs[first].abs().max()).item()
        print(f"\nmax |{provider} - {first}| / max |{first}| = {difference:.2g}")


if __name__ == "__main__":
    main()
