"""Exact gradients of a reverse solve at the memory of one step's graph: the checkpointed adjoint.

Plain autograd through a 100-step purification keeps every step's activations of the score model (tens of
GB for DDPM++ at batch 64). Here the forward runs the solver without a graph and keeps only every k-th
state; the noise is not kept at all, since `StepNoise(i)` replays any step's draw exactly. The backward
walks the segments from the last to the first: it recomputes a segment's states from its checkpoint (without
a graph), then steps back through them, building one step's graph at a time and taking its vector-Jacobian
product with respect to the state and to the context tensors (see below) only. Memory: steps / k
checkpoints, k recomputed states and one step's graph; time: (k - 1) / k extra forwards per step.

k is chosen from a memory budget for the kept states (STATE_MEMORY_BUDGET): a state is one image batch, tiny
beside one step's graph of the score model (100 states of a batch of 64 CIFAR-10 images take 79 MB, one
DDPM++ step's graph about 3 GB), so k = 1 -- every state kept, nothing recomputed, a fifth less work per
gradient -- whenever it fits, and a larger k, down to the sqrt(steps) minimum of memory, only when it does not.

The result is the exact gradient of the computed map, not an approximation of the continuous adjoint ODE:
each VJP is autograd's, evaluated at the same states with the same noise as the forward (recomputation
repeats the forward's arithmetic; kernels that are nondeterministic across runs, such as some GPU atomics,
would make it exact only up to their own run-to-run rounding).

Block checkpointing (`checkpoint_blocks_of=model`) lowers the rest, one step's graph, at the price of one more
forward per step: while a step's VJP is taken, every block of the model that declares itself a checkpoint
unit (a class attribute `checkpoint_unit = True`: the residual and attention blocks of DDPM++ and ADM) keeps
only its inputs and is recomputed, by torch.utils.checkpoint, when the backward reaches it. The arithmetic is
the same, so the gradient is too (bit for bit wherever the kernels are deterministic).

Context tensors are inputs that every step reads besides the state, such as the input image that guidance
compares against: their gradient is accumulated over all steps, so a dependency on them is never dropped.
The model's weights are not differentiated (attacks need input gradients only; skipping weight gradients is
where the time saving over torchsde's adjoint comes from); a model with trainable weights gets a warning.
"""
import contextlib
import functools
import math
import warnings

import torch
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable


STATE_MEMORY_BUDGET = 512 * 2**20  # bytes of solver states the adjoint may keep


def sqrt_checkpoint_every(num_steps):
    """k = ceil(sqrt(steps)): steps / k checkpoints plus k recomputed states, the minimum of their sum."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def default_checkpoint_every(num_steps, state_bytes, budget=None):
    """The smallest spacing k whose peak of kept states -- ceil(steps / k) checkpoints plus the k - 1 states a
    segment recomputes -- fits `budget` bytes (default STATE_MEMORY_BUDGET), each state `state_bytes`; the
    sqrt(steps) spacing, which needs the fewest, when none fits. Smaller k means fewer recomputed steps."""
    budget = STATE_MEMORY_BUDGET if budget is None else budget
    least_memory = sqrt_checkpoint_every(num_steps)
    for every in range(1, least_memory):
        if (math.ceil(num_steps / every) + every - 1) * state_bytes <= budget:
            return every
    return least_memory


def checkpointed_solve(step, x, num_steps, context=(), every=None, progress=False, checkpoint_blocks_of=None):
    """Runs `x <- step(x, i, *context)` for i = 0 .. num_steps - 1; the backward is the checkpointed adjoint.

    step: a pure function of the state, the step index and the context tensors (its randomness must be
        replayable, e.g. drawn from a StepNoise); it is called again during the backward.
    every: checkpoint spacing k (default `default_checkpoint_every(num_steps, bytes of x)`).
    checkpoint_blocks_of: a module `step` calls (the score model) whose checkpoint-unit blocks are recomputed
        inside each step's VJP instead of kept (see the module docstring); None keeps one step's whole graph.
    Returns the final state; gradients flow to `x` and to every context tensor that requires grad.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    every = default_checkpoint_every(num_steps, x.numel() * x.element_size()) if every is None else every
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint spacing must be a positive integer, got {every!r}")
    backward_scope = contextlib.nullcontext
    if checkpoint_blocks_of is not None:
        backward_scope = functools.partial(recomputed_blocks, checkpoint_units(checkpoint_blocks_of))
    return _CheckpointedSolve.apply(step, num_steps, every, progress, backward_scope, x, *context)


class _CheckpointedSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, num_steps, every, progress, backward_scope, x, *context):
        ctx.step, ctx.num_steps, ctx.every, ctx.backward_scope = step, num_steps, every, backward_scope
        x, checkpoints = solve_keeping_checkpoints(step, x, num_steps, every, context, progress)
        ctx.save_for_backward(*context, *checkpoints)
        ctx.num_context = len(context)
        return x

    @staticmethod
    @once_differentiable  # a second derivative through the adjoint is an error, never a silent zero
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        context, checkpoints = saved[:ctx.num_context], saved[ctx.num_context:]
        context = [c.detach().requires_grad_(need) for c, need in zip(context, ctx.needs_input_grad[6:])]
        with ctx.backward_scope():
            grad_x, grad_context = adjoint_from_checkpoints(ctx.step, checkpoints, ctx.num_steps, ctx.every,
                                                            context, grad_out)
        return (None, None, None, None, None, grad_x, *grad_context)


def checkpoint_units(model):
    """The outermost submodules of `model` whose class sets `checkpoint_unit = True`; a ValueError if none."""
    units, inside = [], set()
    for name, module in model.named_modules():
        if getattr(type(module), "checkpoint_unit", False) and not any(name.startswith(p) for p in inside):
            units.append(module)
            inside.add(name + ".")
    if not units:
        raise ValueError(f"block checkpointing needs blocks to recompute, and {type(model).__name__} has no "
                         "submodule whose class sets checkpoint_unit = True (the DDPM++ and ADM blocks do): set it "
                         "on your model's residual blocks, or leave block checkpointing off")
    return units


@contextlib.contextmanager
def recomputed_blocks(modules):
    """While inside, each module's forward keeps only its inputs for the backward and is rerun when the backward
    reaches it (torch.utils.checkpoint, non-reentrant: it also recomputes under create_graph)."""
    patched = [module.__dict__.get("forward") for module in modules]  # an instance's own forward, if it has one
    for module in modules:
        module.forward = functools.partial(_checkpointed_call, module.forward)
    try:
        yield
    finally:
        for module, own in zip(modules, patched):
            if own is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own


def _checkpointed_call(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def solve_keeping_checkpoints(step, x, num_steps, every, context=(), progress=False):
    """(final state, [the state before step 0, every, 2 every, ...]): the adjoint's forward, without a graph."""
    checkpoints = []
    with torch.no_grad():
        for i in progress_range(num_steps, progress, "reverse"):
            if i % every == 0:
                checkpoints.append(x)
            x = step(x, i, *context)
    return x, checkpoints


def adjoint_from_checkpoints(step, checkpoints, num_steps, every, context, grad_out):
    """(grad of the start state, [grad of each context tensor that requires grad, else None]) given grad_out, the
    gradient of the final state: the segments in reverse, each recomputed from its checkpoint, one step's
    vector-Jacobian product at a time."""
    grad_context = [None] * len(context)
    grad_x = grad_out
    for segment in reversed(range(len(checkpoints))):
        first = segment * every
        states = _replay(step, checkpoints[segment], first, min(first + every, num_steps), context)
        for offset in reversed(range(len(states))):
            grad_x, grads = _step_vjp(step, states[offset], first + offset, context, grad_x)
            grad_context = [_add(total, g) for total, g in zip(grad_context, grads)]
    return grad_x, grad_context


def _replay(step, x, first, stop, context):
    """The states before steps first .. stop - 1, recomputed from the checkpoint `x` (the state before `first`)."""
    states = [x]
    with torch.no_grad():
        for i in range(first, stop - 1):
            states.append(step(states[-1], i, *context))
    return states


def _step_vjp(step, x, i, context, grad_next):
    """(d step(x, i) / d x)^T grad_next and the same for each context tensor that requires grad."""
    wanted = [c for c in context if c.requires_grad]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = step(x, i, *context)
        grads = torch.autograd.grad(out, [x, *wanted], grad_next, allow_unused=True)
    grad_x = torch.zeros_like(x) if grads[0] is None else grads[0]
    rest = iter(grads[1:])
    return grad_x, [next(rest) if c.requires_grad else None for c in context]


def _add(total, g):
    if g is None:
        return total
    return g if total is None else total + g


def progress_range(num_steps, progress, desc):
    """range(num_steps), with a progress bar named `desc` when `progress`."""
    if not progress:
        return range(num_steps)
    from tqdm.auto import tqdm

    return tqdm(range(num_steps), desc=desc, unit="step", leave=False)


def warn_if_trainable(model):
    """The adjoint returns no weight gradients; say so once when the model has weights that want them."""
    if isinstance(model, torch.nn.Module) and any(p.requires_grad for p in model.parameters()):
        warnings.warn("grad='adjoint' differentiates with respect to the images only: the score model's "
                      "weights get no gradient (freeze them with model.requires_grad_(False) to silence this; "
                      "use grad='autograd' to train through purification)", stacklevel=3)
