"""Seconds for one AGDM-guided adjoint gradient (shipped models, t* = 0.1), batch 4.

    RDP_CORE_BACKEND=auto python bench/agdm_gradient_backends.py [--steps 100] [--repeats 1]
    RDP_CORE_BACKEND=torch python bench/agdm_gradient_backends.py [--steps 100] [--repeats 1]

the engine's CPU ops against stock torch ops on the gradient whose cost is a second-order backward: one
untimed warm-up gradient, then `repeats` timed ones (all printed, and the fastest).
"""
import argparse
import time

import torch

import rdp_core

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=None, help="reverse steps (default: dt = 1e-3, 100 at t* = 0.1)")
parser.add_argument("--repeats", type=int, default=1)
args = parser.parse_args()

x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def gradient():
    leaf = x.clone().requires_grad_(True)
    out = rdp_core.purify(leaf, 0.1, guidance="agdm", grad="adjoint", steps=args.steps,
                          generator=torch.Generator().manual_seed(2))
    return torch.autograd.grad((out * w).sum(), leaf)[0]


gradient()  # loads the models, warms up
seconds = []
for _ in range(args.repeats):
    start = time.perf_counter()
    g = gradient()
    seconds.append(time.perf_counter() - start)
print(f"best {min(seconds):.2f} s of {[round(s, 2) for s in seconds]}, |g| = {g.norm():.6g}")
