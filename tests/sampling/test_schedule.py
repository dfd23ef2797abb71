import math

import pytest
import torch

from rdp_core.sampling import VP, VPSchedule, make_solver, respaced_indices, uniform_times, default_steps


def test_beta_is_linear_from_0_1_to_20():
    assert VP.beta(0.0) == pytest.approx(0.1)
    assert VP.beta(1.0) == pytest.approx(20.0)
    assert VP.beta(0.5) == pytest.approx(10.05)


def test_alpha_bar_solves_the_vp_ode():
    # d log alpha_bar / dt = -beta(t): checked by central differences against the closed form.
    for t in (0.01, 0.1, 0.3, 0.9):
        h = 1e-6
        slope = (VP.log_alpha_bar(t + h) - VP.log_alpha_bar(t - h)) / (2 * h)
        assert slope == pytest.approx(-VP.beta(t), rel=1e-7)
    assert VP.alpha_bar(0.0) == 1.0


def test_sigma_matches_alpha_bar_and_is_accurate_at_tiny_t():
    t = torch.tensor([1e-9, 1e-4, 0.1, 1.0], dtype=torch.float64)
    assert torch.allclose(VP.sigma(t) ** 2 + VP.alpha_bar(t), torch.ones_like(t), rtol=0, atol=1e-15)
    # At t = 1e-9, 1 - alpha_bar ~ 1e-10: a naive sqrt(1 - exp(.)) would lose most digits.
    assert VP.sigma(1e-9) == pytest.approx(math.sqrt(0.1 * 1e-9), rel=1e-6)


def test_discrete_chain_is_ddpm_and_matches_continuous_time():
    betas = VP.discrete_betas()
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    alpha_bars = VP.discrete_alpha_bars()
    assert alpha_bars[0].item() == pytest.approx(1 - 1e-4)
    times = torch.tensor([VP.discrete_time(i) for i in range(1000)], dtype=torch.float64)
    assert times[99].item() == pytest.approx(0.1)
    relative = (alpha_bars / VP.alpha_bar(times) - 1).abs()
    assert relative[:300].max() < 2e-3
    assert (alpha_bars.log() - VP.log_alpha_bar(times)).abs().max() < 0.07


def test_forward_diffusion_has_the_closed_form_moments():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.6, dtype=torch.float64)
    ab = VP.alpha_bar(0.1)
    xt = VP.diffuse(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), ab)
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.6, abs=0.004)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.01)


def test_diffpure_default_is_100_euler_maruyama_steps_of_1e_3():
    solver = make_solver("sde", 0.1)
    assert solver.num_steps == 100 == default_steps("sde", 0.1)
    assert solver.times[0] == 0.1 and solver.times[-1] == 0.0
    steps = torch.tensor(solver.times, dtype=torch.float64).diff()
    assert torch.allclose(steps, torch.full_like(steps, -1e-3), rtol=0, atol=1e-12)
    assert solver.model_times == solver.times[:-1]
    assert solver.start_alpha_bar == pytest.approx(VP.alpha_bar(0.1))


@pytest.mark.parametrize("t_star", [0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", [1, 3, 7, 100])
def test_uniform_grids_end_exactly_at_zero(t_star, steps):
    times = make_solver("sde", t_star, steps=steps).times
    assert times[0] == t_star and times[-1] == 0.0 and len(times) == steps + 1
    assert all(a > b for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("name", ["ode", "ode-euler", "ode-heun"])
def test_ode_grids_follow_steps(name):
    solver = make_solver(name, 0.3, steps=7)
    assert solver.num_steps == 7
    assert solver.times == pytest.approx(uniform_times(0.3, 7))
    assert solver.times[-1] == 0.0


def test_respacing_takes_evenly_spaced_indices_including_both_ends():
    assert respaced_indices(0.1) == list(range(99, -1, -1))
    for steps in (1, 2, 7, 10, 33, 100):
        idx = respaced_indices(0.1, steps)
        assert len(idx) == steps == len(set(idx))
        assert idx[0] == 99 and (steps == 1 or idx[-1] == 0)
        assert all(a > b for a, b in zip(idx, idx[1:]))
        gaps = [a - b for a, b in zip(idx, idx[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1
    assert respaced_indices(0.1, 10) == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_discrete_solvers_start_on_the_chain(name):
    solver = make_solver(name, 0.1, steps=10)
    assert solver.num_steps == 10
    assert solver.start_alpha_bar == pytest.approx(VP.discrete_alpha_bars()[99].item())
    assert solver.model_times[0] == pytest.approx(0.1) and solver.model_times[-1] == pytest.approx(0.001)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="sde", t_star=0.0), "t_star"),
        (dict(solver="sde", t_star=1.5), "t_star"),
        (dict(solver="sde", t_star=-0.1), "t_star"),
        (dict(solver="sde", t_star=0.1, steps=0), "steps"),
        (dict(solver="sde", t_star=0.1, steps=2.5), "steps"),
        (dict(solver="heun", t_star=0.1), "unknown solver"),
        (dict(solver="ddpm", t_star=0.1234), "multiple of 1/1000"),
        (dict(solver="ddim", t_star=0.1, steps=101), "steps must be in"),
        (dict(solver="ddim", t_star=0.1, eta=-1.0), "eta"),
        (dict(solver="ddim", t_star=0.1, eta=float("nan")), "eta"),  # NaN passed `eta < 0` and gave NaN images
        (dict(solver="ddim", t_star=0.1, eta=float("inf")), "eta"),
        (dict(solver="sde", t_star=True), "t_star"),  # a bool is not the number 1
        (dict(solver="sde", t_star=0.1, steps=True), "steps"),
        (dict(solver="sde", t_star=0.1, eta=0.5), "takes no options"),
    ],
)
def test_bad_solver_configurations_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_solver(**kwargs)


def test_a_grid_that_evaluates_the_model_at_t_0_is_rejected():
    from rdp_core.sampling import ProbabilityFlowHeun

    with pytest.raises(ValueError, match="undefined at t = 0"):
        ProbabilityFlowHeun([0.0, 0.1, 0.2])


def test_schedule_is_configurable():
    sched = VPSchedule(beta_min=0.5, beta_max=5.0)
    assert sched.alpha_bar(1.0) == pytest.approx(math.exp(-0.5 * 4.5 - 0.5))
    assert make_solver("sde", 0.2, schedule=sched).start_alpha_bar == pytest.approx(sched.alpha_bar(0.2))
