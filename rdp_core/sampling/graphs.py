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

The exact gradient an attack takes (grad="adjoint") is graphed too, as two graphs: GraphedAdjoint captures
the checkpointed adjoint's forward and its backward (segment recomputation and per-step vector-Jacobian
products), running the same functions as the eager adjoint (rdp_core.sampling.adjoint).

Used by `purify` on CUDA for results that need no graph (grad="none" or "bpda", or under no_grad);
`graphs=False` or RDP_CORE_DISABLE_GRAPHS=1 turns it off. Guided no-grad solves are graphed too (on an
H200 they equalled eager bit for bit under deterministic cuDNN); the adjoint is captured only on request
(graphs=True) until its guided GPU test in tests/sampling/test_graphs.py has passed; on the CPU those tests
run everything but the capture itself. Graphs live as long as their model, and no longer than its
parameters and buffers stay where and as they were at capture (moving them, or a tracked in-place edit such
as load_state_dict, drops its graphs; AGDM's auxiliary network's are part of the key).
"""
import itertools
import os
import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from rdp_core import _backend
from rdp_core.sampling.adjoint import (adjoint_from_checkpoints, default_checkpoint_every,
                                       solve_keeping_checkpoints)
from rdp_core.sampling.noise import guidance_draw, guidance_step
from rdp_core.sampling.precision import tensor_version

_CACHE = weakref.WeakKeyDictionary()  # model -> (its tensors' addresses, {key: GraphedSolve or GraphedAdjoint})
WARMUP_RUNS = 2


def graphs_wanted(x, graphs):
    """Whether a purification of `x` runs graphed: `graphs` True, False or None (on CUDA unless disabled)."""
    if graphs is None:
        return x.is_cuda and os.environ.get("RDP_CORE_DISABLE_GRAPHS", "0") in ("", "0")
    if graphs and not x.is_cuda:
        raise ValueError(f"graphs=True needs CUDA tensors, got a tensor on {x.device}")
    return bool(graphs)


def capture(fn, device):
    """(graph, outputs): fn() -- a tuple of tensors -- run WARMUP_RUNS times on a side stream (Triton JIT and
    autotuning, cuDNN's algorithm choice), then captured; each graph.replay() recomputes the outputs in place.
    fn may run autograd inside (a guided step's guidance gradient, the adjoint's vector-Jacobian products)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class _StaticInputs:
    """The buffers a captured solve reads: start state, each step's diffusion and guidance noise, and the
    guidance's reference tensors; filled with stand-in values for the capture, loaded before each replay."""

    def __init__(self, num_steps, example, stochastic, guided, reference):
        per_step = (num_steps, *example.shape)
        self.num_steps = num_steps
        self.start = example.detach().clone()
        self.noise = torch.randn(per_step, dtype=example.dtype, device=example.device) if stochastic else None
        self.guidance_noise = torch.randn(per_step, dtype=example.dtype, device=example.device) if guided else None
        self.guidance_draws = False  # set by the capture when the objective reads its noise (GDMP on x_t does)
        self.reference = tuple(r.detach().clone() for r in reference)

    def noise_at(self, index):
        """The StepNoise-style draw `index` from the buffers (step i >= 0, guidance draws below -1)."""
        if index >= 0:
            return self.noise[index]
        self.guidance_draws = True
        return self.guidance_noise[guidance_step(index)]

    def load(self, x_t, noise, reference):
        with torch.no_grad():
            self.start.copy_(x_t)
            for buffer, value in zip(self.reference, reference):
                buffer.copy_(value)
            for i in range(self.num_steps):
                if self.noise is not None:
                    self.noise[i].copy_(noise(i))
                if self.guidance_draws:  # an objective that never draws would only make each load slower
                    self.guidance_noise[i].copy_(noise(guidance_draw(i)))


class GraphedSolve:
    """One captured reverse solve from a state shaped like `example`; call it with (x_t, noise, reference).

    step(state, i, noise, reference) -> state is one solver step (guided or not), run eagerly and under capture
    alike; reference: example tensors shaped like the guidance's reference (empty without guidance).
    """

    def __init__(self, step, num_steps, example, stochastic, guided, reference=()):
        self.inputs = _StaticInputs(num_steps, example, stochastic, guided, reference)

        def solve():
            with torch.no_grad():
                x = self.inputs.start
                for i in range(num_steps):
                    x = step(x, i, self.inputs.noise_at, self.inputs.reference)
                return (x,)

        # The graph needs no Python once captured; nothing here keeps `step`, which holds the model (the key).
        self.graph, (self.out,) = capture(solve, example.device)

    def __call__(self, x_t, noise, reference=()):
        """The solve from x_t with noise(i) at step i: a fresh tensor (the graph's output buffer is reused)."""
        self.inputs.load(x_t, noise, reference)
        self.graph.replay()
        return self.out.clone()


class GraphedAdjoint:
    """The checkpointed adjoint of one reverse solve (rdp_core.sampling.adjoint) as two captured graphs.

    The forward graph runs the solve and keeps every k-th state; the backward graph recomputes each segment
    from its checkpoint and chains the steps' vector-Jacobian products to the start state and to the
    reference tensors that require grad (needs_reference_grad). Both run the very functions of the eager
    adjoint, so the gradient is the same exact one. The checkpoints are copied out after each forward and
    back in before the backward, and the noise is reloaded from the caller's StepNoise, so any number of
    purifications may run between a forward and its backward.
    """

    def __init__(self, step, num_steps, every, example, stochastic, guided, reference, needs_reference_grad):
        self.inputs = _StaticInputs(num_steps, example, stochastic, guided, reference)
        self.needs = tuple(needs_reference_grad)

        def static_step(x, i, *context):
            return step(x, i, self.inputs.noise_at, context)

        def forward():
            out, checkpoints = solve_keeping_checkpoints(static_step, self.inputs.start, num_steps, every,
                                                         self.inputs.reference)
            return (out, *checkpoints)

        self.forward_graph, (self.out, *self.checkpoints) = capture(forward, example.device)
        self.saved = [c.detach().clone() for c in self.checkpoints]  # the backward's own checkpoint buffers
        self.grad_out = torch.zeros_like(example)
        self.context = [r.requires_grad_(need) for r, need in zip(self.inputs.reference, self.needs)]

        def backward():
            grad_x, grad_context = adjoint_from_checkpoints(static_step, self.saved, num_steps, every, self.context,
                                                            self.grad_out)
            # A reference tensor that requires grad but that the guidance never reads (AGDM's features with
            # latent=False) gets None: a zero keeps the captured outputs in step with `needs`.
            return (grad_x, *(torch.zeros_like(c) if g is None else g
                              for c, g, need in zip(self.context, grad_context, self.needs) if need))

        self.backward_graph, (self.grad_x, *self.grad_context) = capture(backward, example.device)

    def forward(self, x_t, noise, reference):
        """(final state, checkpoints): fresh tensors the caller keeps for `backward`."""
        self.inputs.load(x_t, noise, reference)
        self.forward_graph.replay()
        return self.out.clone(), [c.clone() for c in self.checkpoints]

    def backward(self, checkpoints, noise, reference, grad_out):
        """(grad of x_t, [grad of each reference tensor, None where not needed]) for the forward that returned
        `checkpoints` with this noise and reference."""
        with torch.no_grad():
            self.inputs.load(checkpoints[0], noise, reference)
            for buffer, value in zip(self.saved, checkpoints):
                buffer.copy_(value)
            self.grad_out.copy_(grad_out)
        self.backward_graph.replay()
        grads = iter(self.grad_context)
        return self.grad_x.clone(), [next(grads).clone() if need else None for need in self.needs]


class _GraphedAdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs, noise, x, *reference):
        out, checkpoints = graphs.forward(x, noise, reference)
        ctx.graphs, ctx.noise, ctx.num_reference = graphs, noise, len(reference)
        ctx.save_for_backward(*reference, *checkpoints)
        return out

    @staticmethod
    @once_differentiable  # as the eager adjoint: a second derivative through it is an error, never a zero
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        reference, checkpoints = saved[:ctx.num_reference], saved[ctx.num_reference:]
        grad_x, grad_reference = ctx.graphs.backward(checkpoints, ctx.noise, reference, grad_out)
        return (None, None, grad_x, *grad_reference)


def _math_flags():
    """The global switches that change which kernels a capture records: a graph captured with TF32 off would
    otherwise replay IEEE float32 after the caller allowed TF32 (and the reverse), one captured before the
    caller asked for deterministic algorithms would go on replaying cuDNN's atomic-accumulating ones."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled())


def _addresses(module):
    """Where a module's parameters and buffers live, and their versions. A graph reads its weights at the
    addresses they had at capture: after `model.cpu().cuda()` or `param.data = ...` it would replay freed
    memory, silently. The versions count tracked in-place changes (load_state_dict, optimizer steps): a
    bf16 wrapper's graph reads weights it cast at capture (rdp_core.sampling.precision), so after such a change
    it is captured again."""
    if not isinstance(module, nn.Module):
        return ()
    return tuple((t.data_ptr(), tensor_version(t)) for t in itertools.chain(module.parameters(), module.buffers()))


def _graphs_of(model):
    """The graphs cached for `model`; all dropped (with their memory) once its tensors have moved."""
    addresses = _addresses(model)
    cached = _CACHE.get(model)
    if cached is None or cached[0] != addresses:
        cached = _CACHE[model] = (addresses, {})
    return cached[1]


def _guidance_key(guidance):
    """guidance.graph_key(), with the addresses of the networks in it (AGDM's auxiliary network), as above."""
    if guidance is None:
        return None
    key = guidance.graph_key()
    networks = key if isinstance(key, tuple) else (key,)
    return key, tuple(_addresses(n) for n in networks if isinstance(n, nn.Module))


def _key(reverse, x_t, guidance, reference, *extra):
    # RDP_CORE_BACKEND is read at every eager op call; a graph replays the kernels of its capture's backend.
    return (_math_flags(), _backend.environment_backend(), type(reverse).__name__, tuple(reverse.model_times),
            reverse.start_alpha_bar,
            tuple(tuple(c) for c in getattr(reverse, "_coefs", ())), id(getattr(reverse, "_schedule", None)),
            getattr(reverse, "clip_denoised", None), tuple(x_t.shape), x_t.dtype, x_t.device,
            _guidance_key(guidance),
            tuple((tuple(r.shape), r.dtype) for r in reference), *extra)


def graphed_solve(model, reverse, step, x_t, guidance=None, reference=()):
    """The cached GraphedSolve for this model, solver grid, guidance and state, captured on first use.

    step(state, i, noise, reference): the solver step with `model` and `guidance` folded in."""
    per_model = _graphs_of(model)
    key = _key(reverse, x_t, guidance, reference)
    if key not in per_model:
        per_model[key] = GraphedSolve(step, reverse.num_steps, x_t, reverse.stochastic, guidance is not None,
                                      reference)
    return per_model[key]


def graphed_adjoint_solve(model, reverse, step, x_t, noise, guidance=None, reference=(), every=None):
    """The final state of the reverse solve from x_t, differentiable by the checkpointed adjoint replayed from
    cached CUDA graphs (a GraphedAdjoint per model, solver grid, guidance, state and checkpoint spacing)."""
    every = default_checkpoint_every(reverse.num_steps, x_t.numel() * x_t.element_size()) if every is None else every
    needs = tuple(r.requires_grad for r in reference)
    per_model = _graphs_of(model)
    key = _key(reverse, x_t, guidance, reference, "adjoint", every, needs)
    if key not in per_model:
        per_model[key] = GraphedAdjoint(step, reverse.num_steps, every, x_t, reverse.stochastic,
                                        guidance is not None, reference, needs)
    return _GraphedAdjointSolve.apply(per_model[key], noise, x_t, *reference)


def cached_graphs(model):
    """How many graphs are cached for `model` (for tests and memory accounting)."""
    return len(_CACHE[model][1]) if model in _CACHE else 0
