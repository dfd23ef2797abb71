"""The public entry points: `purify` and the `Purifier` module.

Purification (DiffPure, Nie et al. 2022): map images from [0, 1] to [-1, 1], diffuse them in closed form
to t*, run a reverse solver with an epsilon model back to t = 0, and map back to [0, 1]. Everything is
differentiable with plain autograd (attacks need the gradient); randomness comes from one seed drawn from
the caller's generator, so the same seed gives the same output.
"""
import torch
from torch import nn

from rdp_core.models.default import default_eps_model_for, load_default_eps_model
from rdp_core.sampling import DIFFUSION_DRAW, VP, StepNoise, make_solver

# How far outside [0, 1] an input may stray (rounding of attack iterates) before it is an error.
RANGE_TOLERANCE = 1e-3


def purify(x, t_star=0.1, *, model=None, solver="sde", steps=None, generator=None, clip=True, progress=False,
           schedule=VP, **solver_options):
    """Purified copy of the images `x` (float, NCHW, values in [0, 1]): same shape, dtype and device.

    t_star: diffusion time in (0, 1] (0.1 is DiffPure's CIFAR-10 setting).
    model: epsilon model `model(x_t, t)` on x's device (see rdp_core.sampling.schedule for the convention);
        None uses the shipped default, a DDPM++ trained on CIFAR-10 for t <= 0.3 (32x32 RGB images only).
    solver, steps, solver_options: see rdp_core.sampling.solvers (default: Euler-Maruyama, dt = 1e-3).
    generator: torch.Generator the noise seed is drawn from (torch's global RNG when None).
    clip: clamp the result to [0, 1]; the gradient of the clamp is exact (zero where it saturates).
    progress: show a progress bar over the reverse steps.
    """
    check_images(x)
    reverse = make_solver(solver, t_star, steps, schedule, **solver_options)
    if model is None:
        model = default_eps_model_for(x, t_star)
    check_model_device(model, x)
    x_t, noise = _diffused_state(x, reverse, schedule, generator)
    out = (reverse.sample(model, x_t, noise, progress=progress) + 1.0) * 0.5
    if clip:
        out = out.clamp(0.0, 1.0)
    return out.to(x.dtype)


def diffuse(x, t_star=0.1, *, solver="sde", steps=None, generator=None, schedule=VP, **solver_options):
    """The state `purify` starts its reverse process from, mapped back to image scale ((x_t + 1) / 2).

    Given a generator in the same state, it is exactly the purification's diffused image (for display).
    """
    check_images(x)
    reverse = make_solver(solver, t_star, steps, schedule, **solver_options)
    x_t, _ = _diffused_state(x, reverse, schedule, generator)
    return ((x_t + 1.0) * 0.5).to(x.dtype)


def _diffused_state(x, reverse, schedule, generator):
    """x mapped to [-1, 1] and diffused to the solver's start; the state is float32 (float64 when given)."""
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x0 = x.to(state_dtype) * 2.0 - 1.0
    noise = StepNoise.like(x0, generator)
    return schedule.diffuse(x0, noise(DIFFUSION_DRAW), reverse.start_alpha_bar), noise


class Purifier(nn.Module):
    """classifier(purify(x)) as an nn.Module, for attack libraries; inputs are images in [0, 1].

    Each forward draws a fresh noise seed from `generator` (or torch's global RNG), so repeated calls are
    independent purifications, as EOT needs, and the whole sequence replays from the generator's seed.
    """

    def __init__(self, classifier, model=None, t_star=0.1, *, solver="sde", steps=None, generator=None, clip=True,
                 schedule=VP, **solver_options):
        super().__init__()
        if model is None:
            model = load_default_eps_model()
        # Reject a bad configuration now, not at the first call.
        make_solver(solver, t_star, steps, schedule, **solver_options)
        self.classifier = classifier
        self.model = model
        self.t_star = t_star
        self.solver = solver
        self.steps = steps
        self.generator = generator
        self.clip = clip
        self.schedule = schedule
        self.solver_options = solver_options

    def purify(self, x):
        return purify(x, self.t_star, model=self.model, solver=self.solver, steps=self.steps,
                      generator=self.generator, clip=self.clip, schedule=self.schedule, **self.solver_options)

    def forward(self, x):
        return self.classifier(self.purify(x))


def check_images(x):
    """ValueError unless `x` is a finite floating NCHW batch with values in [0, 1] (within RANGE_TOLERANCE)."""
    if not torch.is_tensor(x):
        raise ValueError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        hint = " (convert uint8 pixels with x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"expected a floating-point tensor with values in [0, 1], got dtype {x.dtype}{hint}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf; expected finite values in [0, 1]")
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"expected images with values in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(map [-1, 1] data with (x + 1) / 2, or uint8 pixels with x.float() / 255)"
        )


def check_model_device(model, x):
    """ValueError when the model's parameters or buffers live on another device than `x`."""
    if not isinstance(model, nn.Module):
        return
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    if tensor is not None and tensor.device != x.device:
        raise ValueError(f"model is on {tensor.device} but the images are on {x.device}; move one to the other")
