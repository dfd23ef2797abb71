"""Solvers against closed forms: for Gaussian data the exact epsilon model is known (GaussianEpsModel).

* The reverse SDE / ancestral chains, started from the exact marginal at t*, must return samples with the
  data mean and covariance (up to sampling error of the Monte-Carlo estimate and discretisation error).
* The probability-flow ODE of Gaussian data is linear with a closed-form flow map: in the eigenbasis of
  the covariance, (x_t - sqrt(ab_t) mu) / sqrt(ab_t lambda + 1 - ab_t) is constant along trajectories. So
  the ODE solvers (and DDIM, a discretisation of the same ODE) are checked sample by sample.
"""
import math

import pytest
import torch

from rdp_core.models import GaussianEpsModel
from rdp_core.sampling import VP, ProbabilityFlowEuler, ProbabilityFlowHeun, StepNoise, make_solver, uniform_times

F64 = torch.float64


@pytest.fixture(scope="module")
def gaussian():
    gen = torch.Generator().manual_seed(1234)
    a = torch.randn(3, 3, generator=gen, dtype=F64) * 0.4
    cov = a @ a.T + 0.02 * torch.eye(3, dtype=F64)
    mean = torch.tensor([0.3, -0.4, 0.1], dtype=F64)
    return mean, cov, GaussianEpsModel.from_covariance(mean, cov)


def marginal_samples(mean, cov, alpha_bar, n, seed):
    """Exact samples of the VP marginal N(sqrt(ab) mu, ab cov + (1 - ab) I)."""
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(alpha_bar * cov + (1 - alpha_bar) * torch.eye(len(mean), dtype=F64))
    return math.sqrt(alpha_bar) * mean + torch.randn(n, len(mean), generator=gen, dtype=F64) @ chol.T


def exact_flow_to_zero(x_t, mean, cov, alpha_bar):
    eigvals, eigvecs = torch.linalg.eigh(cov)
    coords = (x_t - math.sqrt(alpha_bar) * mean) @ eigvecs
    coords = coords * torch.sqrt(eigvals / (alpha_bar * eigvals + 1 - alpha_bar))
    return mean + coords @ eigvecs.T


N_SAMPLES = 40_000


@pytest.mark.parametrize(
    "name, t_star, options",
    [
        ("sde", 0.1, {}),
        ("sde", 1.0, {}),  # from (almost) pure noise: the sampler generates the data distribution
        ("ddpm", 0.1, dict(clip_denoised=False)),
        ("ddpm", 1.0, dict(clip_denoised=False)),
        ("ddim", 0.3, dict(clip_denoised=False, eta=1.0)),
    ],
)
def test_stochastic_solvers_return_the_data_distribution(gaussian, name, t_star, options):
    mean, cov, model = gaussian
    solver = make_solver(name, t_star, **options)
    x_t = marginal_samples(mean, cov, solver.start_alpha_bar, N_SAMPLES, seed=1)
    out = solver.sample(model, x_t, StepNoise(x_t.shape, seed=2, dtype=F64))
    # Standard errors at n = 40k: mean <= ~0.004, covariance entries <= ~0.004; discretisation adds less.
    assert (out.mean(0) - mean).abs().max() < 0.015
    assert (torch.cov(out.T) - cov).abs().max() < 0.02


def test_stochastic_check_detects_a_wrong_score(gaussian):
    # The statistical criterion above must be able to fail: a model with a mean off by 0.1 is caught.
    mean, cov, _ = gaussian
    wrong = GaussianEpsModel.from_covariance(mean + 0.1, cov)
    solver = make_solver("sde", 0.1)
    x_t = marginal_samples(mean, cov, solver.start_alpha_bar, N_SAMPLES, seed=1)
    out = solver.sample(wrong, x_t, StepNoise(x_t.shape, seed=2, dtype=F64))
    assert (out.mean(0) - mean).abs().max() > 0.05


@pytest.mark.parametrize(
    "name, steps, tolerance",
    [("ode-euler", 100, 3e-2), ("ode-euler", 1000, 3e-3), ("ode-heun", 100, 2e-3), ("ddim", 100, 2e-2)],
)
def test_deterministic_solvers_follow_the_exact_flow_map(gaussian, name, steps, tolerance):
    mean, cov, model = gaussian
    options = dict(clip_denoised=False) if name == "ddim" else {}
    solver = make_solver(name, 0.1, steps=steps, **options)
    x_t = marginal_samples(mean, cov, solver.start_alpha_bar, 1000, seed=3)
    error = (solver.sample(model, x_t) - exact_flow_to_zero(x_t, mean, cov, solver.start_alpha_bar)).abs().max()
    assert error < tolerance


def test_heun_converges_at_second_order(gaussian):
    # Between t = 0.5 and 0.01 (no t = 0 endpoint), halving the step must divide Heun's error by ~4.
    mean, cov, model = gaussian
    x_hi = marginal_samples(mean, cov, VP.alpha_bar(0.5), 200, seed=4)
    eigvals, eigvecs = torch.linalg.eigh(cov)

    def exact(x, t_from, t_to):
        ab_f, ab_t = VP.alpha_bar(t_from), VP.alpha_bar(t_to)
        scale = torch.sqrt((ab_t * eigvals + 1 - ab_t) / (ab_f * eigvals + 1 - ab_f))
        return math.sqrt(ab_t) * mean + ((x - math.sqrt(ab_f) * mean) @ eigvecs * scale) @ eigvecs.T

    target = exact(x_hi, 0.5, 0.01)
    errors = [
        (ProbabilityFlowHeun(uniform_times(0.5, n, t_end=0.01)).sample(model, x_hi) - target).abs().max().item()
        for n in (20, 40)
    ]
    assert 3.0 < errors[0] / errors[1] < 5.0


@pytest.mark.parametrize(
    "solver_cls, steps, tolerance", [(ProbabilityFlowHeun, 200, 1e-5), (ProbabilityFlowEuler, 2000, 2e-3)]
)
def test_ode_forward_then_backward_returns_the_input(gaussian, solver_cls, steps, tolerance):
    mean, cov, model = gaussian
    x_lo = marginal_samples(mean, cov, VP.alpha_bar(0.01), 500, seed=5)
    grid = uniform_times(0.01, steps, t_end=0.6)
    x_hi = solver_cls(grid).sample(model, x_lo)
    assert (x_hi - x_lo).abs().max() > 0.1  # it really moved
    back = solver_cls(grid[::-1]).sample(model, x_hi)
    assert (back - x_lo).abs().max() < tolerance


def test_clip_denoised_keeps_the_x0_estimate_in_range():
    # Data far outside [-1, 1]: with clipping the DDIM output stays in range, without it does not.
    mean = torch.full((2,), 3.0, dtype=F64)
    model = GaussianEpsModel.from_covariance(mean, 0.01 * torch.eye(2, dtype=F64))
    x_t = marginal_samples(mean, 0.01 * torch.eye(2, dtype=F64), VP.discrete_alpha_bars()[99].item(), 100, seed=6)
    clipped = make_solver("ddim", 0.1, steps=10).sample(model, x_t)
    raw = make_solver("ddim", 0.1, steps=10, clip_denoised=False).sample(model, x_t)
    assert clipped.abs().max() <= 1.0 + 1e-12
    assert raw.mean().item() == pytest.approx(3.0, abs=0.05)


def test_stochastic_sampling_without_noise_is_an_error(gaussian):
    with pytest.raises(ValueError, match="stochastic"):
        make_solver("sde", 0.1).sample(gaussian[2], torch.zeros(2, 3, dtype=F64))
