"""CUDA-graph-captured reverse sampling: all steps of a purification replayed as one graph.

DiffPure-style purification calls the score model 100 times with small kernels, so on a GPU the host's
launch overhead, not the arithmetic, sets the pace. Here the whole reverse solve is captured once per
(model, solver grid, shape, dtype, device) and replayed: the solver's coefficients are Python floats fixed at
construction (baked into the graph), the start state and every step's noise are copied into static buffers
before each replay, and the noise still comes from the caller's StepNoise, so a graphed purification equals
the eager one for the same generator. Capture is preceded by a warm-up on a side stream, which runs
Triton's JIT and autotuning and cuDNN's algorithm choice outside the capture.

Used by `purify` on CUDA for results that need no graph (grad="none" or "bpda", or under no_grad), without
guidance; `graphs=False` or RDP_CORE_DISABLE_GRAPHS=1 turns it off. Graphs live as long as their model.
"""
import os
import weakref

import torch

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
    """One captured reverse solve from a state shaped like `example`; call it with (x_t, noise)."""

    def __init__(self, model, reverse, example):
        self.num_steps = reverse.num_steps
        self.start = torch.empty_like(example)
        self.noise = (torch.empty((self.num_steps, *example.shape), dtype=example.dtype, device=example.device)
                      if reverse.stochastic else None)
        self._model, self._reverse = model, reverse
        with torch.no_grad():
            self.start.copy_(example)
            if self.noise is not None:
                self.noise.normal_()
            side = torch.cuda.Stream(example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._solve()
            torch.cuda.current_stream(example.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._solve()

    def _solve(self):
        x = self.start
        for i in range(self.num_steps):
            x = self._reverse.step(self._model, x, i, self._static_noise)
        return x

    def _static_noise(self, i):
        return self.noise[i]

    def __call__(self, x_t, noise):
        """The solve from x_t with noise(i) at step i: a fresh tensor (the graph's output buffer is reused)."""
        with torch.no_grad():
            self.start.copy_(x_t)
            if self.noise is not None:
                for i in range(self.num_steps):
                    self.noise[i].copy_(noise(i))
            self.graph.replay()
            return self.out.clone()


def graphed_solve(model, reverse, x_t):
    """The cached GraphedSolve for this model, solver grid and state, captured on first use."""
    key = (type(reverse).__name__, tuple(reverse.model_times), reverse.start_alpha_bar,
           tuple(tuple(c) for c in getattr(reverse, "_coefs", ())), id(getattr(reverse, "_schedule", None)),
           getattr(reverse, "clip_denoised", None), tuple(x_t.shape), x_t.dtype, x_t.device)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = GraphedSolve(model, reverse, x_t)
    return per_model[key]


def cached_graphs(model):
    """How many graphs are cached for `model` (for tests and memory accounting)."""
    return len(_CACHE.get(model, {}))
