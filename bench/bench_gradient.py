"""One full gradient of a classifier loss through purification at t* = 0.1 (100 Euler-Maruyama steps).

    pytest bench/bench_gradient.py --benchmark-only --benchmark-group-by=group

Providers, side by side on one model, batch and loss:

- torchsde-adjoint: torchsde.sdeint_adjoint on the reverse VP-SDE the way DiffPure calls it (flattened state,
  time flipped to s = 1 - t from 1 - t* to 1 - 1e-5, method "euler", dt = 1e-3, a BrownianInterval, score
  model weights left trainable so the adjoint also integrates their gradients, as in DiffPure).
- autograd: plain autograd through the unrolled loop (`purify(grad="autograd")`).
- checkpoint-per-step: torch.utils.checkpoint around every step (no activations kept, every step recomputed).
- rdp-adjoint: `purify(grad="adjoint")`, the checkpointed adjoint (every state kept while they fit its budget:
  nothing recomputed).
- rdp-adjoint-sqrt-k: the same with the fewest kept states, every k = sqrt(steps)-th, each segment recomputed
  (what a memory budget too small for every state gets).
- rdp-adjoint-blocks: the same with block checkpointing (`checkpoint_blocks=True`): each step's graph keeps only
  the inputs of the score model's blocks and recomputes them (one more forward per step, for peak memory).
- rdp-adjoint-graphed (GPU only): the same adjoint replayed from CUDA graphs (`graphs=True`), timed after
  one untimed call that captures them.
- rdp-adjoint-bf16, rdp-adjoint-graphed-bf16 (GPU only): the adjoint, eager and graphed, with the score model
  in bf16 (`precision="bf16"`: autocast convolutions and matmuls, float32 state). The exact gradient of the
  bf16 purification, which is not the float32 one: compare with torchsde in float32 knowing that.
- no-grad-purify: the purification alone under no_grad, the memory reference for the others.

Models: on the CPU the default model's size (DDPM++ nf 32, 1.26M parameters) at batch 4; on a GPU the DDPM++
CIFAR-10 config (61.8M parameters) at batch 64. Random weights: the cost does not depend on their values.
The classifier is a ResNet-20. extra_info holds the peak memory (MiB): on a GPU the CUDA allocator's peak
over the timed runs (one run takes 10-30 s there, so the GPU run wants --benchmark-min-rounds=1); on the CPU
the peak of live tensor bytes from torch.profiler's memory events in one extra, untimed run. A provider that
runs out of GPU memory (plain autograd through 100 steps at batch 64) is skipped with the allocator's message.
"""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import rdp_core
from rdp_core._backend import peak_cpu_tensor_bytes
from rdp_core.models.classifiers import CifarResNet
from rdp_core.models.ncsnpp import CIFAR10_DDPMPP, NCSNpp, ScoreSDEEpsModel
from rdp_core.sampling import DIFFUSION_DRAW, VP, StepNoise, make_solver
from rdp_core.sampling.adjoint import sqrt_checkpoint_every
from rdp_core.train import CPU_MODEL
from diffpure_sde import torchsde_purify

T_STAR = 0.1
STEPS = make_solver("sde", T_STAR).num_steps  # 100: the solver's default grid at this t*
PROVIDERS = ["torchsde-adjoint", "autograd", "checkpoint-per-step", "rdp-adjoint", "rdp-adjoint-sqrt-k",
             "rdp-adjoint-blocks", "rdp-adjoint-graphed", "rdp-adjoint-bf16", "rdp-adjoint-graphed-bf16",
             "no-grad-purify"]
GPU_ONLY = {"rdp-adjoint-graphed": "CUDA graphs need a CUDA device",
            "rdp-adjoint-bf16": "bf16 autocast is the GPU's fast path, not the CPU's",
            "rdp-adjoint-graphed-bf16": "CUDA graphs need a CUDA device"}


@functools.lru_cache(maxsize=None)
def _setup(device):
    torch.manual_seed(0)
    config, batch = (CPU_MODEL, 4) if device == "cpu" else (CIFAR10_DDPMPP, 64)
    net = NCSNpp(config)
    with torch.no_grad():
        for p in net.parameters():  # score_sde zero-initialises each block's last conv: make every layer count
            p.add_(torch.randn_like(p) * 0.02)
    model = ScoreSDEEpsModel(net).eval().requires_grad_(False).to(device)
    classifier = CifarResNet(20).eval().requires_grad_(False).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return model, classifier, x, y


def _loss(classifier, purified, y):
    return F.cross_entropy(classifier(purified), y)


def _rdp(grad, **options):
    def run(model, classifier, x, y):
        x = x.clone().requires_grad_(True)
        out = rdp_core.purify(x, T_STAR, model=model, grad=grad, generator=torch.Generator().manual_seed(1),
                              **options)
        return torch.autograd.grad(_loss(classifier, out, y), x)[0]

    return run


def _checkpoint_per_step(model, classifier, x, y):
    x = x.clone().requires_grad_(True)
    solver = make_solver("sde", T_STAR)
    noise = StepNoise(x.shape, seed=1, device=x.device)
    state = VP.diffuse(x * 2 - 1, noise(DIFFUSION_DRAW), solver.start_alpha_bar)
    for i in range(solver.num_steps):
        state = checkpoint(lambda s, i=i: solver.step(model, s, i, noise), state, use_reentrant=False)
    out = ((state + 1) * 0.5).clamp(0, 1)
    return torch.autograd.grad(_loss(classifier, out, y), x)[0]


def _no_grad_purify(model, classifier, x, y):
    with torch.no_grad():
        return rdp_core.purify(x, T_STAR, model=model, grad="none", generator=torch.Generator().manual_seed(1))


def _torchsde_adjoint(model, classifier, x, y):
    torchsde = pytest.importorskip("torchsde")
    model.requires_grad_(True)  # as in DiffPure: the adjoint also integrates the weights' gradients
    try:
        x = x.clone().requires_grad_(True)
        out = torchsde_purify(torchsde, model, x, T_STAR, adjoint=True)
        return torch.autograd.grad(_loss(classifier, out, y), x)[0]
    finally:
        model.requires_grad_(False)


RUNS = {
    "torchsde-adjoint": _torchsde_adjoint,
    "autograd": _rdp("autograd"),
    "checkpoint-per-step": _checkpoint_per_step,
    "rdp-adjoint": _rdp("adjoint"),
    "rdp-adjoint-sqrt-k": _rdp("adjoint", checkpoint_every=sqrt_checkpoint_every(STEPS)),
    "rdp-adjoint-blocks": _rdp("adjoint", checkpoint_blocks=True),
    "rdp-adjoint-graphed": _rdp("adjoint", graphs=True),
    "rdp-adjoint-bf16": _rdp("adjoint", precision="bf16"),
    "rdp-adjoint-graphed-bf16": _rdp("adjoint", graphs=True, precision="bf16"),
    "no-grad-purify": _no_grad_purify,
}


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("device", _devices())
def test_input_gradient_through_purification(timed, benchmark, device, provider):
    if provider == "torchsde-adjoint":
        pytest.importorskip("torchsde", reason="pip install torchsde to compare with DiffPure's adjoint")
    if provider in GPU_ONLY and device == "cpu":
        pytest.skip(GPU_ONLY[provider])
    model, classifier, x, y = _setup(device)
    device = torch.device(device)
    benchmark.group = f"gradient-t0.1-sde100-{device.type}-batch{x.shape[0]}"
    run = functools.partial(RUNS[provider], model, classifier, x, y)
    try:
        if "graphed" in provider:
            run()  # captures the graphs: a one-off cost, not part of a gradient
        if device.type == "cuda":  # the allocator's peak over the timed runs: no extra run of 10-30 s
            with cuda_peak_memory(benchmark):
                timed(run, device, provider=provider, batch=x.shape[0])
            return
        benchmark.extra_info["peak MiB"] = peak_cpu_tensor_bytes(run) / 2**20
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} ran out of memory at batch {x.shape[0]}: {str(err).splitlines()[0]}")
    timed(run, device, provider=provider, batch=x.shape[0])


@contextlib.contextmanager
def cuda_peak_memory(benchmark):
    """Records in extra_info the CUDA allocator's peak above what was allocated on entry."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    benchmark.extra_info["peak MiB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
