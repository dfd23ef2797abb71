"""Peak memory and seconds of one AGDM-guided adjoint gradient, with and without block checkpointing (CPU).

    python bench/agdm_block_checkpointing.py [--steps 20]

Shipped default model and auxiliary network, t* = 0.1, batch 4 of random images. Peak: live CPU tensor bytes
(rdp_core._backend.peak_cpu_tensor_bytes) of one extra, untimed call after a warm-up gradient; the no-grad
AGDM purification is the reference. Says whether checkpoint_blocks=True pays with guidance on x0_hat.
"""
import argparse
import time
import warnings

import torch

import rdp_core
from rdp_core._backend import peak_cpu_tensor_bytes

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()
warnings.filterwarnings("ignore", message="checkpoint_blocks=True with guidance")

x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
options = dict(t_star=0.1, guidance="agdm", steps=args.steps)


def gradient(blocks):
    leaf = x.clone().requires_grad_(True)
    out = rdp_core.purify(leaf, grad="adjoint", checkpoint_blocks=blocks, generator=torch.Generator().manual_seed(2),
                          **options)
    return torch.autograd.grad((out * w).sum(), leaf)[0]


def no_grad_purification():
    with torch.no_grad():
        return rdp_core.purify(x, generator=torch.Generator().manual_seed(2), **options)


gradient(False)
no_grad_purification()
print(f"no-grad purification: peak {peak_cpu_tensor_bytes(no_grad_purification) / 2**20:.1f} MiB")
results = {}
for blocks in (False, True):
    start = time.perf_counter()
    results[blocks] = gradient(blocks)
    seconds = time.perf_counter() - start
    peak = peak_cpu_tensor_bytes(lambda: gradient(blocks)) / 2**20
    print(f"checkpoint_blocks={blocks}: {seconds:.2f} s, peak {peak:.1f} MiB")
print("gradients equal:", torch.equal(results[False], results[True]))
