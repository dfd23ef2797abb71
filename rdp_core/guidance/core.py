"""Guidance for every reverse solver through one mechanism: a guided epsilon model.

A guidance objective g(x_t, t, x_in) (larger is better: closer to the input) shifts the score the solver
follows by scale(t) * grad_x g. With an epsilon model the score is -eps / sigma(t), so the shift is the same
as predicting

    eps_guided = eps - sigma(t) * scale(t) * grad_x g(x_t, t, x_in),

and every solver, given `GuidedEps` in place of the model, applies the guidance its own way: Euler-Maruyama
adds h * beta(t) * scale * grad g, its step's variance times the scaled gradient (classifier guidance in
its SDE form); the probability-flow solvers add half of that, as their drift carries half the score; DDPM's
mean moves by beta / sqrt(1 - beta) * scale * grad g (guided-diffusion's posterior variance times the
gradient, to first order in beta) and DDIM is guided as in Dhariwal & Nichol's Algorithm 2. For the discrete
chains sigma(t) is the continuous VP sigma at the step's time, which differs from the chain's own
sqrt(1 - alpha_bar) by 3% at t = 0.01 and under 1% from t = 0.05 on: a slightly different guidance strength,
the same mechanism.

Differentiability: the guidance gradient is computed with autograd even where sampling runs without a graph
(the adjoint's forward, BPDA). When a graph is being built (plain autograd, or the adjoint's per-step
vector-Jacobian products), it is built with create_graph=True, so attacks differentiate through the
guidance gradient itself: the second-order term in x_t and the dependence on the input x_in at every step.
Dropping either would mask gradients.
"""
import torch

from rdp_core.sampling.noise import guidance_draw
from rdp_core.sampling.schedule import VP


class Guidance:
    """Base class of a guidance objective.

    `prepare(x_in)`: what the objective needs of the input, computed once per purification as a tuple of
    tensors (the input itself, or an auxiliary network's features of it); they are the adjoint's context
    tensors, so the gradient reaches x_in through them. `objective(x_t, t, x0_hat, reference, draw)`:
    per-sample values (batch,) of g; `draw()` returns this step's own standard-normal noise (replayable).
    `scale(t)`: per-sample weights (batch,). `uses_x0`: whether the objective reads the one-step denoised
    estimate x0_hat = (x_t - sigma eps) / sqrt(alpha_bar); then grad g flows through the score model too.
    All images are in the sampler's data space [-1, 1].
    """

    uses_x0 = False

    def prepare(self, x_in):
        return (x_in,)

    def objective(self, x_t, t, x0_hat, reference, draw):
        raise NotImplementedError

    def scale(self, t):
        raise NotImplementedError

    def graph_key(self):
        """A hashable value equal for objectives that compute the same function, so that a captured CUDA graph
        (rdp_core.sampling.graphs) is reused across purifications; by default the object itself."""
        return self


def _per_sample(values, like):
    return values.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


class GuidedEps:
    """model(x_t, t) with `guidance` folded in (see the module docstring); built per step by the sampler.

    reference: guidance.prepare(x_in); noise, step: the purification's StepNoise and the step index.
    """

    def __init__(self, model, guidance, reference, noise, step, schedule=VP):
        self.model, self.guidance, self.reference = model, guidance, tuple(reference)
        self.noise, self.step, self.schedule = noise, step, schedule

    def __call__(self, x, t):
        eps, grad = self._eps_and_objective_gradient(x, t)
        return eps - _per_sample(self.schedule.sigma(t) * self.guidance.scale(t), x) * grad

    def _building_graph(self, x):
        """Whether the caller's graph runs through this step: grad mode on and something it is built for
        requires grad (the state, the input's reference, a trainable score model). Grad mode alone is not
        enough: torchattacks calls a model under grad mode on inputs that do not require grad, and building
        create_graph gradients there chained every step's double-backward graph for nothing (24 GB, then the
        OOM killer, in an AGDM AutoAttack run)."""
        if not torch.is_grad_enabled():
            return False
        weights = self.model.parameters() if isinstance(self.model, torch.nn.Module) else ()
        return (x.requires_grad or any(r.requires_grad for r in self.reference)
                or any(w.requires_grad for w in weights))

    def _eps_and_objective_gradient(self, x, t):
        building_graph = self._building_graph(x)
        with torch.enable_grad():
            x_g = x if building_graph and x.requires_grad else x.detach().requires_grad_(True)
            eps = x0_hat = None
            if self.guidance.uses_x0:
                eps = self.model(x_g, t).to(x.dtype)
                alpha_bar = _per_sample(self.schedule.alpha_bar(t), x)
                x0_hat = (x_g - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            g = self.guidance.objective(x_g, t, x0_hat, self.reference, self._draw)
            (grad,) = torch.autograd.grad(g.sum(), x_g, create_graph=building_graph)
        if eps is None:
            eps = self.model(x, t).to(x.dtype)
        if not building_graph:
            eps, grad = eps.detach(), grad.detach()
        return eps, grad

    def _draw(self):
        return self.noise(guidance_draw(self.step))
