"""PGD with expectation over transformation (Madry et al. 2018; Athalye et al. 2018), l_inf and l_2.

Each iteration averages the loss gradient over `eot` independent forwards of the model (for a `Purifier`,
independent purifications with exact full gradients), steps along its sign (l_inf) or its direction (l_2),
and projects back onto the eps-ball around the input and onto [0, 1]. The attack returns the final iterate,
as the diffusion-purification literature evaluates it, and a per-iteration trace of how often the EOT
forwards still classified each iterate correctly: the evaluator's "more iterations must not help the
defense" check reads it. A zero gradient moves nothing (sign(0) = 0, and an l_2 step of a zero gradient is
zero), so a defense that masks its gradient shows up as an attack that does not move.
"""
import math
from dataclasses import dataclass

import torch

from rdp_core.attacks.eot import eot_loss_gradient
from rdp_core.checks import check_images, check_labels

NORMS = ("linf", "l2")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}
LINF_STEP = 0.007  # the diffusion-purification literature's l_inf step, about a quarter of 8/255


def default_step_size(norm, eps):
    """The step PGD takes when none is given: 0.007 in l_inf, as robust evaluations of diffusion
    purification use; eps / 4 in l_2, the same fraction of the radius, so that a short attack still crosses
    the ball (l_inf's fixed step would move an l_2 attack 0.07 in 10 iterations, a seventh of eps 0.5)."""
    if norm == "linf":
        return LINF_STEP
    if not math.isfinite(eps):
        raise ValueError("an unbounded l_2 attack has no radius to take its step from: give step_size")
    return eps / 4


@dataclass
class PGDResult:
    x_adv: torch.Tensor  # the final iterate, same shape as the input
    correct_fraction: torch.Tensor  # (iterations, n): share of the EOT forwards right about each iterate
    loss: torch.Tensor  # (iterations, n): mean EOT loss at each iterate (before its step)


def pgd_eot(model, x, y, *, norm="linf", eps=None, iterations=200, step_size=None, eot=20, eot_chunk=None,
            random_start=True, loss=None, generator=None, progress=False):
    """PGD-EOT against `model` (images in [0, 1] -> logits) from the images `x` with true labels `y`.

    Defaults are those of robust evaluations of diffusion purification: 200 iterations, 20 EOT samples,
    eps 8/255 (l_inf) or 0.5 (l_2), step 0.007 (l_inf) or eps / 4 (l_2; see default_step_size). eps may be
    math.inf (unbounded: only [0, 1] constrains; an unbounded l_2 attack needs its step_size).
    eot_chunk: at most this many EOT copies per forward. loss: (logits, labels) -> per-sample loss to
    ascend (default cross-entropy). generator: draws the random start. Returns a PGDResult.
    """
    check_images(x)
    check_labels(y, x)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be positive (math.inf for an unbounded attack), got {eps}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    step_size = default_step_size(norm, eps) if step_size is None else step_size
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    x = x.detach()
    x_adv = _random_start(x, norm, eps, generator) if random_start and math.isfinite(eps) else x.clone()
    correct, losses = [], []
    for _ in _iterations(iterations, progress, correct):
        grad, draw_losses, logits = eot_loss_gradient(model, x_adv, y, eot, loss, eot_chunk)
        correct.append((logits.argmax(-1) == y).float().mean(0))
        losses.append(draw_losses.mean(0))
        x_adv = project(x_adv + step_size * _ascent_direction(grad, norm), x, norm, eps)
    return PGDResult(x_adv, torch.stack(correct), torch.stack(losses))


def project(x_adv, x, norm, eps):
    """x_adv moved onto the eps-ball of `norm` around x, then into [0, 1] (which keeps it in the ball)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif math.isfinite(eps):
        norms = _per_sample_norm(delta)
        delta = delta * (eps / norms.clamp_min(eps)).reshape(-1, *[1] * (x.dim() - 1))
    return (x + delta).clamp(0.0, 1.0).detach()


def _ascent_direction(grad, norm):
    if norm == "linf":
        return grad.sign()
    norms = _per_sample_norm(grad).reshape(-1, *[1] * (grad.dim() - 1))
    return torch.where(norms > 0, grad / norms.clamp_min(1e-30), torch.zeros_like(grad))


def _per_sample_norm(t):
    return t.flatten(1).norm(dim=1)


def _random_start(x, norm, eps, generator):
    """A uniform point of the l_inf ball, or a random direction at a uniform radius in the l_2 ball."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_sample_norm(direction).reshape(-1, *[1] * (x.dim() - 1))
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) * eps
        delta = direction * radius.reshape(-1, *[1] * (x.dim() - 1))
    return project(x + delta, x, norm, eps)


def _iterations(count, progress, correct):
    if not progress:
        yield from range(count)
        return
    from tqdm.auto import tqdm

    with tqdm(range(count), desc="PGD-EOT", unit="it", leave=False) as bar:
        for i in bar:
            yield i
            bar.set_postfix(correct=f"{float(correct[-1].mean()):.3f}")
