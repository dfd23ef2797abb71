"""Where the time of one DDPM++ CIFAR-10 forward goes, per backend: the share of each kind of op.

    python bench/profile_model.py [--device cpu|cuda] [--batch 8]

The models of bench/bench_model.py (score_sde's config, random weights, eval, no gradients), profiled
once per provider (torch-eager in NCHW, rdp in the engine's layout) after a warm-up. It says how much of a
forward each kind of op takes. Last, it prints how far the rdp forward's output is from torch-eager's (the
Winograd convolutions round differently from the direct ones), relative to the output's largest magnitude.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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


def profile_forward(model, x, t, device):
    """The time per kind of op (microseconds) and the output of one profiled forward."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        model(x, t)
        with profile(activities=activities) as prof:
            out = model(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
    shares = {}
    for event in prof.key_averages():
        time_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        shares[kind_of(event.key)] = shares.get(kind_of(event.key), 0.0) + time_us
    return shares, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    t = (torch.rand(args.batch, generator=gen) * 100).to(device)
    print(f"DDPM++ CIFAR-10 forward, batch {args.batch}, {device.type}, {torch.get_num_threads()} threads")
    outputs = []
    for provider, backend in (("torch-eager", "torch"), ("rdp", "auto")):
        os.environ["RDP_CORE_BACKEND"] = backend
        shares, out = profile_forward(_provider_model(device, provider), x, t, device)
        outputs.append(out.double())
        total = sum(shares.values())
        print(f"\n{provider} (backend {backend}): {total / 1e3:.1f} ms of op self time")
        for kind, time_us in sorted(shares.items(), key=lambda item: -item[1]):
            print(f"  {kind:<50} {time_us / 1e3:9.1f} ms  {100 * time_us / total:5.1f}%")
    eager, rdp = outputs
    difference = ((rdp - eager).abs().max() / eager.abs().max()).item()
    print(f"\nmax |rdp - torch-eager| / max |torch-eager| = {difference:.2g}")


if __name__ == "__main__":
    main()
