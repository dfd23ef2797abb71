"""Seconds for one AGDM-guided adjoint gradient (shipped models, t* = 0.1, 100 steps), batch 4.

    RDP_CORE_BACKEND=auto python bench/agdm_gradient_backends.py; RDP_CORE_BACKEND=torch python bench/agdm_gradient_backends.py

the engine's CPU ops against stock torch ops on the gradient whose cost is a second-order backward.
"""
import time
import torch
import rdp_core

x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def gradient():
    leaf = x.clone().requires_grad_(True)
    out = rdp_core.purify(leaf, 0.1, guidance="agdm", grad="adjoint", generator=torch.Generator().manual_seed(2))
    return torch.autograd.grad((out * w).sum(), leaf)[0]


gradient()  # loads the models, warms up
start = time.perf_counter()
g = gradient()
print(f"{time.perf_counter() - start:.2f} s, |g| = {g.norm():.6g}")
