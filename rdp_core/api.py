"""The public entry points: `purify` and the `Purifier` module.

Purification (DiffPure, Nie et al. 2022): map images from [0, 1] to [-1, 1], diffuse them in closed form
to t*, run a reverse solver with an epsilon model back to t = 0, and map back to [0, 1]. The result is
differentiable with respect to the images, exactly (attacks need the gradient; see `grad` in `purify`);
randomness comes from one seed drawn from the caller's generator, so the same seed gives the same output.
`eot_gradient` averages the gradient of a loss over several independent purifications (EOT).
"""
import copy
import functools
import warnings

import torch
from torch import nn

from rdp_core.attacks.eot import eot_loss_gradient
from rdp_core.checks import check_images
from rdp_core.models.default import default_eps_model_for, load_default_eps_model, warn_beyond_trained_range
from rdp_core.sampling import DIFFUSION_DRAW, VP, StepNoise, make_solver
from rdp_core.guidance import GuidedEps, cached_auxiliary, make_guidance
from rdp_core.sampling.adjoint import checkpoint_units, checkpointed_solve, progress_range, warn_if_trainable
from rdp_core.sampling.graphs import graphed_adjoint_solve, graphed_solve, graphs_wanted
from rdp_core.sampling.precision import with_precision

GRAD_MODES = ("adjoint", "autograd", "bpda", "none")


def purify(x, t_star=0.1, *, model=None, solver="sde", steps=None, generator=None, clip=True, progress=False,
           grad="adjoint", checkpoint_every=None, checkpoint_blocks=False, schedule=VP, guidance=None,
           guidance_options=None, graphs=None, precision="fp32", **solver_options):
    """Purified copy of the images `x` (float, NCHW, values in [0, 1]): same shape, dtype and device.

    t_star: diffusion time in (0, 1] (0.1 is DiffPure's CIFAR-10 setting).
    model: epsilon model `model(x_t, t)` on x's device (see rdp_core.sampling.schedule for the convention);
        None uses the shipped default, a DDPM++ trained on CIFAR-10 for t <= 0.3 (32x32 RGB images only).
    solver, steps, solver_options: see rdp_core.sampling.solvers (default: Euler-Maruyama, dt = 1e-3).
    generator: torch.Generator the noise seed is drawn from (torch's global RNG when None).
    clip: clamp the result to [0, 1]; the gradient of the clamp is exact (zero where it saturates).
    progress: show a progress bar over the reverse steps.
    grad: how gradients flow back to x (only matters when x requires grad):
        "adjoint"  the exact gradient of the computed purification at the memory of one step's graph plus
                   kept states, by the checkpointed adjoint (rdp_core.sampling.adjoint); checkpoint_every
                   sets its spacing k (default: every state while they fit its budget, else up to sqrt(steps));
                   checkpoint_blocks=True keeps only the inputs of the model's blocks in each step's graph and
                   recomputes them (2.4x less peak memory on the CPU bench for one more forward per step,
                   unguided; DDPM++ and ADM models, or any whose blocks set checkpoint_unit = True).
        "autograd" the same exact gradient by plain autograd through the unrolled loop (memory grows with
                   steps; for checking and for gradients to the score model's weights).
        "bpda"     the identity (Athalye et al.'s BPDA): purified values forward, d out / d x = I backward.
        "none"     no graph at all: the result does not require grad.
    guidance: None (plain purification), "gdmp" (pixel distance to the input, GDMP), "agdm" (the paper's
        adversarial guidance with the shipped auxiliary network) or a rdp_core.guidance.Guidance; its
        options (scale, schedule, on, layer, lam, ...) in guidance_options. Every solver and every grad mode
        takes it; the adjoint and autograd differentiate through it, including its reading of x at every step.
    graphs: replay the reverse solve as captured CUDA graphs (rdp_core.sampling.graphs). None: no-grad solves,
        guided or not, on CUDA, unless RDP_CORE_DISABLE_GRAPHS=1; True: also the adjoint's forward and backward
        (grad="adjoint"), not yet verified on a GPU with guidance. Same result, same gradient (bit for bit
        under deterministic cuDNN; cuDNN's atomic-accumulating algorithms make eager differ from itself too).
    precision: "fp32", or "bf16" / "fp16" for the score model's convolutions and matmuls (autocast) with the
        sampler's state in float32 (rdp_core.sampling.precision).
    """
    check_images(x)
    check_grad_mode(grad)
    check_block_checkpointing(checkpoint_blocks, grad, graphs)
    reverse = make_solver(solver, t_star, steps, schedule, **solver_options)
    if model is None:
        model = default_eps_model_for(x)
    warn_beyond_trained_range(model, t_star, stacklevel=2)
    check_model_device(model, x)
    check_model_mode(model)
    model = with_precision(model, precision)
    guide = make_guidance(guidance, x.device, **(guidance_options or {}))
    if guide is not None and torch.is_inference_mode_enabled():
        raise ValueError("guided purification takes a gradient of its objective at every step, which "
                         "torch.inference_mode() forbids: call it under torch.no_grad() instead")
    if checkpoint_blocks and getattr(guide, "uses_x0", False):
        warnings.warn("checkpoint_blocks=True with guidance on x0_hat saves little: the guidance gradient's own "
                      "graph keeps the recomputed blocks for the second-order terms (AGDM on the CPU: 6% less "
                      "peak memory for about 3x the time; see the README)", stacklevel=2)
    # No-grad solves are graphed by default on CUDA (guided ones bit for bit equal to eager on an H200); the
    # adjoint on request only, until its guided GPU test has passed (rdp_core.sampling.graphs).
    graphed = graphs_wanted(x, graphs)
    run = functools.partial(_purified, model=model, reverse=reverse, schedule=schedule, generator=generator,
                            clip=clip, progress=progress, guidance=guide, graphs=graphed,
                            graphed_adjoint=graphed and graphs is True,
                            checkpoint_blocks_of=model if checkpoint_blocks else None)
    if grad in ("bpda", "none") or not torch.is_grad_enabled():
        with torch.no_grad():
            out = run(x.detach(), grad="autograd", checkpoint_every=None)
        return _Identity.apply(x, out) if grad == "bpda" and x.requires_grad else out
    return run(x, grad=grad, checkpoint_every=checkpoint_every)


class _Identity(torch.autograd.Function):
    """BPDA's straight-through estimator: `out`'s values exactly (x + (out - x).detach() rounds them, up to an
    ulp in float32 and 5e-4 in float16), the identity as the gradient with respect to x."""

    @staticmethod
    def forward(ctx, x, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _purified(x, *, model, reverse, schedule, generator, clip, progress, grad, checkpoint_every, guidance, graphs,
              graphed_adjoint, checkpoint_blocks_of):
    x_in, x_t, noise = _diffused_state(x, reverse, schedule, generator)
    reference = guidance.prepare(x_in) if guidance is not None else ()

    def step(state, i, step_noise, reference):
        """One reverse step, guided or not; eager, under the adjoint and under CUDA-graph capture alike."""
        eps_model = model if guidance is None else GuidedEps(model, guidance, reference, step_noise, i, schedule)
        return reverse.step(eps_model, state, i, step_noise)

    if grad == "adjoint" and (x_t.requires_grad or any(r.requires_grad for r in reference)):
        warn_if_trainable(model)
        if graphed_adjoint:
            x_0 = graphed_adjoint_solve(model, reverse, step, x_t, noise, guidance, reference, checkpoint_every)
        else:
            x_0 = checkpointed_solve(lambda state, i, *context: step(state, i, noise, context), x_t,
                                     reverse.num_steps, context=reference, every=checkpoint_every, progress=progress,
                                     checkpoint_blocks_of=checkpoint_blocks_of)
    elif graphs and not torch.is_grad_enabled():
        x_0 = graphed_solve(model, reverse, step, x_t, guidance, reference)(x_t, noise, reference)
    else:
        x_0 = x_t
        for i in progress_range(reverse.num_steps, progress, type(reverse).__name__):
            x_0 = step(x_0, i, noise, reference)
    out = (x_0 + 1.0) * 0.5
    if clip:
        out = out.clamp(0.0, 1.0)
    return out.to(x.dtype)


def diffuse(x, t_star=0.1, *, solver="sde", steps=None, generator=None, schedule=VP, **solver_options):
    """The state `purify` starts its reverse process from, mapped back to image scale ((x_t + 1) / 2).

    Given a generator in the same state, it is exactly the purification's diffused image (for display).
    """
    check_images(x)
    reverse = make_solver(solver, t_star, steps, schedule, **solver_options)
    _, x_t, _ = _diffused_state(x, reverse, schedule, generator)
    return ((x_t + 1.0) * 0.5).to(x.dtype)


def _diffused_state(x, reverse, schedule, generator):
    """(x mapped to [-1, 1], that diffused to the solver's start, the noise source); float32 states (float64
    when given)."""
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x0 = x.to(state_dtype) * 2.0 - 1.0
    noise = StepNoise.like(x0, generator)
    return x0, schedule.diffuse(x0, noise(DIFFUSION_DRAW), reverse.start_alpha_bar), noise


class Purifier(nn.Module):
    """classifier(purify(x)) as an nn.Module, for attack libraries; inputs are images in [0, 1].

    Each forward draws a fresh noise seed from `generator` (or torch's global RNG), so repeated calls are
    independent purifications, as EOT needs, and the whole sequence replays from the generator's seed.
    """

    def __init__(self, classifier, model=None, t_star=0.1, *, solver="sde", steps=None, generator=None, clip=True,
                 grad="adjoint", checkpoint_every=None, checkpoint_blocks=False, schedule=VP, guidance=None,
                 guidance_options=None, graphs=None, precision="fp32", **solver_options):
        super().__init__()
        if model is None:
            model = load_default_eps_model()
        # Reject a bad configuration now, not at the first call.
        make_solver(solver, t_star, steps, schedule, **solver_options)
        check_grad_mode(grad)
        check_block_checkpointing(checkpoint_blocks, grad, graphs)
        if checkpoint_blocks:
            checkpoint_units(model)  # a model without blocks to recompute is an error now, not at the first gradient
        guidance_device = _model_device(model) or torch.device("cpu")
        options = dict(guidance_options or {})
        if guidance == "agdm" and options.get("network") is None:
            # A copy of its own: the Purifier registers the network as a submodule, and purifier.double() or
            # .to(...) must not change the process-wide cached one that purify(guidance="agdm") uses.
            options["network"] = copy.deepcopy(cached_auxiliary(str(guidance_device)))
        self.guidance = make_guidance(guidance, guidance_device, **options)
        # Registered as a submodule, so that moving the Purifier moves the auxiliary network too.
        self.guidance_network = getattr(self.guidance, "network", None)
        self.graphs = graphs
        with_precision(model, precision)  # rejects an unknown precision now
        self.precision = precision
        self.grad = grad
        self.checkpoint_every = checkpoint_every
        self.checkpoint_blocks = checkpoint_blocks
        self.classifier = classifier
        self.model = model
        self.t_star = t_star
        self.solver = solver
        self.steps = steps
        self.generator = generator
        self.clip = clip
        self.schedule = schedule
        self.solver_options = solver_options

    def purify(self, x, generator=None):
        return purify(x, self.t_star, model=self.model, solver=self.solver, steps=self.steps,
                      generator=generator or self.generator, clip=self.clip, grad=self.grad,
                      checkpoint_every=self.checkpoint_every, checkpoint_blocks=self.checkpoint_blocks,
                      schedule=self.schedule, guidance=self.guidance, graphs=self.graphs, precision=self.precision,
                      **self.solver_options)

    def train(self, mode=True):
        """Sets the classifier's mode; the score model and the guidance network stay in eval mode (their
        dropout and BatchNorm are not part of the defense, attack libraries call train() on the models they
        wrap, and the adjoint's gradient needs each step to compute the same function twice)."""
        super().train(mode)
        for part in (self.model, self.guidance_network):
            if isinstance(part, nn.Module):
                part.eval()
        return self

    def forward(self, x, generator=None):
        """Logits of the purified images; `generator` (optional) replaces the module's for this call."""
        return self.classifier(self.purify(x, generator))


def eot_gradient(purifier, x, y, draws=8, loss=None, seed=None):
    """The gradient of a loss averaged over `draws` independent purifications of each image (EOT), in one call.

    The batch is repeated `draws` times and purified once: every copy gets its own noise. Returns
    (gradient, mean loss), both per image: gradient has x's shape and is the mean of the copies' gradients;
    loss (default: cross-entropy of the logits against y) must map (logits, labels) to per-sample losses.
    seed: fixed noise for replay (the same seed gives the same gradient); None draws from the purifier's
    generator. Memory and time scale with draws * len(x): split large batches (or see rdp_core.attacks).
    """
    check_images(x)
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    grad, losses, _ = eot_loss_gradient(lambda copies: purifier(copies, generator=generator), x, y, draws, loss)
    return grad, losses.mean(0)


def check_grad_mode(grad):
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")


def check_block_checkpointing(checkpoint_blocks, grad, graphs):
    if checkpoint_blocks not in (True, False):
        raise ValueError(f"checkpoint_blocks must be True or False, got {checkpoint_blocks!r}")
    if checkpoint_blocks and grad != "adjoint":
        raise ValueError(f"checkpoint_blocks=True is part of the adjoint backward; it needs grad='adjoint', got "
                         f"grad={grad!r}")
    if checkpoint_blocks and graphs is True:
        raise ValueError("checkpoint_blocks=True does not run inside the adjoint's CUDA graphs (graphs=True) yet; "
                         "use one or the other")


def _model_device(model):
    """The device of the model's first parameter (or buffer); None for a plain function or an empty module."""
    if not isinstance(model, nn.Module):
        return None
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def check_model_mode(model):
    """ValueError when the score model has dropout or batch norm in training mode: every purification, and the
    adjoint's recomputation of each step, would then draw other dropout masks (or batch statistics), so no
    two runs compute the same function and the adjoint's gradient is not that of the forward's."""
    if not isinstance(model, nn.Module):
        return
    stochastic = [name or type(model).__name__ for name, m in model.named_modules() if m.training and (
        isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0))]
    if stochastic:
        raise ValueError(f"the score model is in training mode ({len(stochastic)} dropout or batch-norm modules, "
                         f"e.g. {stochastic[0]}): purification needs model.eval(), or each call and the adjoint's "
                         "recomputation would compute a different function")


def check_model_device(model, x):
    """ValueError when the model's parameters or buffers live on another device than `x`."""
    device = _model_device(model)
    if device is not None and device != x.device:
        raise ValueError(f"model is on {device} but the images are on {x.device}; move one to the other")
