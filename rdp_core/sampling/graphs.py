"""CUDA-graph-captured reverse sampling: all steps of a purification replayed as one graph.

DiffPure-style purification calls the score model 100 times with small kernels, so on a GPU the host's
launch overhead, not the arithmetic, sets the pace. Here the whole reverse solve is captured once per
(model, solver grid, guidance, shape, dtype, device) and replayed: the solver's coefficients are Python floats
fixed at construction (baked into the graph), the start state, every step's noise and the guidance's
reference tensors (what it reads of the input) are copied into static buffers before each replay, and the
noise still comes from the caller's StepNoise, so a graphed purification equals the eager one for the same
generator. Capture is preceded by a warm-up on a side stream, which runs Triton's JIT and autotuning and
cuDNN's algorithm choice outside the capture. A guided step computes its guidance gradient with autograd;
that backward pass is captured with the rest.

Used by `purify` on CUDA for results that need no graph (grad="none" or "bpda", or under no_grad);
`graphs=False` or RDP_CORE_DISABLE_GRAPHS=1 turns it off. Guided solves are captured only on request
(graphs=True) until the GPU tests of tests/sampling/test_graphs.py have passed on a GPU. Graphs live as
long as their model.
"""
import os
import weakref

import torch

from rdp_core.sampling.noise import guidance_draw, guidance_step

_CACHE = weakref.WeakKeyDictionary()  # model -> {key: GraphedSolve}
WARMUP_RUNS = 2


def graphs_wanted(x, graphs):
    """Whether a purification of `x` runs graphed: `graphs` True, False or None (on CUDA unless disabled)."""
    if graphs is None:
        return x.is_cuda and os.environ.get("RDP_CORE_DISABLE_GRAPHS", "0") in ("", "0")
    if graphs and not x.is_cuda:
        raise ValueError(f"graphs=True needs CUDA tensors, got a tensor on {x.device}")
    return bool(graphs)


class GraphedSolve:
    """One captured reverse solve from a state shaped like `example`; call it with (x_t, noise, reference).

    step(state, i, noise, reference) -> state is one solver step (guided or not), run eagerly and under capture
    alike; reference: example tensors shaped like the guidance's reference (empty without guidance).
    """

    def __init__(self, step, num_steps, example, stochastic, guided, reference=()):
        self._allocate(step, num_steps, example, stochastic, guided, reference)
        self._capture(example.device)

    def _allocate(self, step, num_steps, example, stochastic, guided, reference):
        """Static buffers, filled with stand-in values for the warm-up and the capture."""
        self._step, self.num_steps = step, num_steps
        per_step = (num_steps, *example.shape)
        self.start = example.detach().clone()
        self.noise = torch.randn(per_step, dtype=example.dtype, device=example.device) if stochastic else None
        self.guidance_noise = torch.randn(per_step, dtype=example.dtype, device=example.device) if guided else None
        self.reference = tuple(r.detach().clone() for r in reference)

    def _capture(self, device):
        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._solve()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._solve()
        self._step = None  # replays need no Python: drop the closure, which holds the model (the cache's key)

    def _solve(self):
        x = self.start
        for i in range(self.num_steps):
            x = self._step(x, i, self._static_noise, self.reference)
        return x

    def _static_noise(self, index):
        if index >= 0:
            return self.noise[index]
        return self.guidance_noise[guidance_step(index)]

    def __call__(self, x_t, noise, reference=()):
        """The solve from x_t with noise(i) at step i: a fresh tensor (the graph's output buffer is reused)."""
        with torch.no_grad():
            self.start.copy_(x_t)
            for buffer, value in zip(self.reference, reference):
                buffer.copy_(value)
            for i in range(self.num_steps):
                if self.noise is not None:
                    self.noise[i].copy_(noise(i))
                if self.guidance_noise is not None:
                    self.guidance_noise[i].copy_(noise(guidance_draw(i)))
            self.graph.replay()
            return self.out.clone()


def graphed_solve(model, reverse, step, x_t, guidance=None, reference=()):
    """The cached GraphedSolve for this model, solver grid, guidance and state, captured on first use.

    step(state, i, noise, reference): the solver step with `model` and `guidance` folded in."""
    key = (type(reverse).__name__, tuple(reverse.model_times), reverse.start_alpha_bar,
           tuple(tuple(c) for c in getattr(reverse, "_coefs", ())), id(getattr(reverse, "_schedule", None)),
           getattr(reverse, "clip_denoised", None), tuple(x_t.shape), x_t.dtype, x_t.device,
           None if guidance is None else guidance.graph_key(),
           tuple((tuple(r.shape), r.dtype) for r in reference))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = GraphedSolve(step, reverse.num_steps, x_t, reverse.stochastic, guidance is not None,
                                      reference)
    return per_model[key]


def cached_graphs(model):
    """How many graphs are cached for `model` (for tests and memory accounting)."""
    return len(_CACHE.get(model, {}))
