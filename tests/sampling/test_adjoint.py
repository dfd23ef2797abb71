"""The checkpointed adjoint gives the exact gradient of what was computed, at bounded memory."""
import math

import pytest
import torch
from torch import nn

import rdp_core
from rdp_core._backend import peak_cpu_tensor_bytes
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp, ScoreSDEEpsModel
from rdp_core.sampling import SOLVERS, StepNoise, make_solver
from rdp_core.sampling import adjoint
from rdp_core.sampling.adjoint import checkpointed_solve, default_checkpoint_every, sqrt_checkpoint_every
from tiny_models import TinyBlock, TinyBlockEps, TinyEps, assert_relative_close, images, input_gradient


SOLVER_RUNS = [("sde", 0.05, 9), ("ode", 0.05, 9), ("ode-heun", 0.05, 9), ("ddpm", 0.03, 11), ("ddim", 0.03, 11)]


def test_every_solver_is_covered():
    assert {name for name, _, _ in SOLVER_RUNS} | {"ode-euler"} == set(SOLVERS)


@pytest.mark.parametrize("solver, t_star, steps", SOLVER_RUNS)
@pytest.mark.parametrize("every", [None, 1, 4, 100])
def test_adjoint_equals_unrolled_autograd_in_float64(solver, t_star, steps, every):
    x, model = images(), TinyEps()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    args = dict(t_star=t_star, model=model, solver=solver, steps=steps, clip=False)
    out_autograd, grad_autograd = input_gradient(x, weights, grad="autograd", **args)
    out_adjoint, grad_adjoint = input_gradient(x, weights, grad="adjoint", checkpoint_every=every, **args)
    assert torch.equal(out_adjoint, out_autograd)  # the same computation, run without a graph
    assert grad_adjoint.abs().sum() > 0
    assert_relative_close(grad_adjoint, grad_autograd, 1e-10)


def test_adjoint_with_clipping_matches_autograd():
    # clip=True adds the clamp after the solve and the discrete solvers clip x0 inside every step.
    x, model = images(), TinyEps()
    weights = torch.ones_like(x)
    for solver, t_star, steps in (("sde", 0.3, 12), ("ddpm", 0.3, 12)):
        args = dict(t_star=t_star, model=model, solver=solver, steps=steps)
        _, expected = input_gradient(x, weights, grad="autograd", **args)
        _, actual = input_gradient(x, weights, grad="adjoint", **args)
        assert_relative_close(actual, expected, 1e-10)


def test_adjoint_matches_central_finite_differences_with_fixed_noise():
    x, model = images(n=2), TinyEps()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    args = dict(t_star=0.1, model=model, solver="sde", steps=20, clip=False)

    def loss(inp):
        out = rdp_core.purify(inp, generator=torch.Generator().manual_seed(3), grad="none", **args)
        return (out * weights).sum().item()

    _, grad = input_gradient(x, weights, grad="adjoint", **args)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    h = 1e-6
    finite_difference = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert finite_difference == pytest.approx((grad * direction).sum().item(), rel=1e-7)


def _guided_step(solver, model, noise, scale=0.5):
    """A solver step plus a guidance term that reads the context (the input image) through a gradient, as
    guided purification does: the adjoint must carry the second-order term d/d context of that gradient."""
    feature = nn.Conv2d(2, 3, 3, padding=1).double().requires_grad_(False)

    def step(x, i, reference):
        with torch.enable_grad():
            probe = x if x.requires_grad else x.detach().requires_grad_(True)
            distance = (torch.tanh(feature(probe)) - torch.tanh(feature(reference))).square().sum()
            (guidance,) = torch.autograd.grad(distance, probe, create_graph=torch.is_grad_enabled()
                                              and (x.requires_grad or reference.requires_grad))
        return solver.step(model, x, i, noise) - scale * guidance

    return step


def test_adjoint_carries_the_gradient_through_a_context_tensor_every_step_reads():
    solver, model = make_solver("sde", 0.05, 8), TinyEps()
    x_t = images() * 2 - 1
    noise = StepNoise(x_t.shape, seed=9, dtype=torch.float64)
    step = _guided_step(solver, model, noise)
    weights = torch.randn(x_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def gradients(run):
        state = x_t.clone().requires_grad_(True)
        reference = (images(seed=7) * 2 - 1).requires_grad_(True)
        return torch.autograd.grad((run(state, reference) * weights).sum(), (state, reference))

    def unrolled(state, reference):
        for i in range(solver.num_steps):
            state = step(state, i, reference)
        return state

    expected = gradients(unrolled)
    actual = gradients(lambda state, reference: checkpointed_solve(step, state, solver.num_steps, (reference,),
                                                                   every=3))
    assert expected[1].abs().sum() > 0  # the guidance really depends on the reference
    for a, e in zip(actual, expected):
        assert_relative_close(a, e, 1e-10)


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward while `fn` runs its forward (measured by hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_the_spacing_is_the_smallest_whose_kept_states_fit_the_budget():
    assert default_checkpoint_every(100, state_bytes=10, budget=1000) == 1  # 100 states
    assert default_checkpoint_every(100, state_bytes=10, budget=999) == 2  # 50 checkpoints + 1 recomputed
    assert default_checkpoint_every(100, state_bytes=10, budget=200) == 8  # 15 + 6 = 21 > 20 at k = 7, 13 + 7 at 8
    assert default_checkpoint_every(100, state_bytes=10, budget=1) == sqrt_checkpoint_every(100) == 10
    assert default_checkpoint_every(1, state_bytes=10**9, budget=1) == 1
    # a batch of 64 CIFAR-10 images over 100 steps fits the default budget: nothing is recomputed
    assert default_checkpoint_every(100, state_bytes=64 * 3 * 32 * 32 * 4) == 1


def test_states_that_fit_the_budget_are_all_kept_and_never_recomputed():
    calls = 0
    model = TinyEps()

    def counted(x, t):
        nonlocal calls
        calls += 1
        return model(x, t)

    x = images().requires_grad_(True)
    rdp_core.purify(x, 0.1, model=counted, steps=20, grad="adjoint").sum().backward()
    assert calls == 20 + 20  # the forward's steps, then one vector-Jacobian product per step


def test_adjoint_memory_grows_with_sqrt_steps_while_autograd_grows_linearly(monkeypatch):
    monkeypatch.setattr(adjoint, "STATE_MEMORY_BUDGET", 0)  # the fewest states: the sqrt(steps) spacing
    model, x = TinyEps(hidden=16), images(n=4)
    state_bytes = x.numel() * x.element_size()
    measured = {}
    for grad in ("autograd", "adjoint"):
        for steps in (16, 64):
            x_in = x.clone().requires_grad_(True)
            measured[grad, steps] = _saved_bytes(lambda: rdp_core.purify(x_in, 0.1, model=model, steps=steps,
                                                                         clip=False, grad=grad))
    assert measured["autograd", 64] > 3.5 * measured["autograd", 16]
    # The adjoint keeps ceil(sqrt(steps)) checkpoint states, plus what the diffusion to x_t keeps.
    for steps in (16, 64):
        checkpoints = math.ceil(steps / sqrt_checkpoint_every(steps)) * state_bytes
        assert checkpoints <= measured["adjoint", steps] <= checkpoints + 4 * state_bytes
    assert measured["adjoint", 64] < measured["autograd", 64] / 20


def test_backward_holds_one_segment_of_states_at_a_time(monkeypatch):
    monkeypatch.setattr(adjoint, "STATE_MEMORY_BUDGET", 0)
    lengths = []
    replay = adjoint._replay
    monkeypatch.setattr(adjoint, "_replay", lambda *a: lengths.append(len(out := replay(*a))) or out)
    x = images().requires_grad_(True)
    rdp_core.purify(x, 0.1, model=TinyEps(), steps=50, grad="adjoint").sum().backward()
    every = sqrt_checkpoint_every(50)
    assert max(lengths) == every and sum(lengths) == 50 and len(lengths) == math.ceil(50 / every)


@pytest.mark.parametrize("solver, t_star, steps", SOLVER_RUNS)
def test_block_checkpointing_keeps_the_exact_gradient(solver, t_star, steps):
    x, model = images(), TinyBlockEps()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    args = dict(t_star=t_star, model=model, solver=solver, steps=steps, clip=False)
    _, grad_autograd = input_gradient(x, weights, grad="autograd", **args)
    _, grad_adjoint = input_gradient(x, weights, grad="adjoint", **args)
    _, grad_blocks = input_gradient(x, weights, grad="adjoint", checkpoint_blocks=True, **args)
    assert_relative_close(grad_blocks, grad_autograd, 1e-10)
    assert torch.equal(grad_blocks, grad_adjoint)  # the same arithmetic, recomputed
    assert all("forward" not in block.__dict__ for block in model.modules())  # the class forwards are back


def test_block_checkpointing_recomputes_every_block_in_each_step_vjp(monkeypatch):
    calls = 0
    block_forward = TinyBlock.forward

    def counted(self, h, t):
        nonlocal calls
        calls += 1
        return block_forward(self, h, t)

    monkeypatch.setattr(TinyBlock, "forward", counted)
    for checkpoint_blocks, per_vjp in ((False, 1), (True, 2)):
        calls = 0
        x = images().requires_grad_(True)
        rdp_core.purify(x, 0.1, model=TinyBlockEps(), steps=10, checkpoint_blocks=checkpoint_blocks).sum().backward()
        assert calls == 2 * 10 + 2 * 10 * per_vjp  # 2 blocks: the forward's steps, then each step's VJP


def test_block_checkpointing_cuts_the_backward_peak_memory_of_ddpmpp():
    torch.manual_seed(0)
    config = DDPMppConfig(nf=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), image_size=16)
    model = ScoreSDEEpsModel(NCSNpp(config)).eval().requires_grad_(False)
    x = torch.rand(2, 3, 16, 16)

    def gradient(**options):
        leaf = x.clone().requires_grad_(True)
        out = rdp_core.purify(leaf, 0.05, model=model, steps=3, generator=torch.Generator().manual_seed(1), **options)
        return torch.autograd.grad(out.sum(), leaf)[0]

    gradient()  # lazily packed weights and caches are not the gradient's
    peaks = {blocks: peak_cpu_tensor_bytes(lambda: gradient(checkpoint_blocks=blocks)) for blocks in (False, True)}
    assert peaks[True] < 0.5 * peaks[False], peaks


def test_block_checkpointing_is_explained_where_it_cannot_run():
    x = images().requires_grad_(True)
    with pytest.raises(ValueError, match="checkpoint_unit = True"):
        rdp_core.purify(x, 0.05, model=TinyEps(), steps=3, checkpoint_blocks=True)
    with pytest.raises(ValueError, match="needs grad='adjoint'"):
        rdp_core.purify(x, 0.05, model=TinyBlockEps(), steps=3, grad="autograd", checkpoint_blocks=True)
    with pytest.raises(ValueError, match="CUDA graphs"):
        rdp_core.Purifier(nn.Identity(), TinyBlockEps(), steps=3, graphs=True, checkpoint_blocks=True)
    with pytest.raises(ValueError, match="True or False"):
        rdp_core.purify(x, 0.05, model=TinyBlockEps(), steps=3, checkpoint_blocks="yes")


def test_bpda_returns_the_purified_values_exactly_in_float16():
    # x + (out - x).detach() rounded them: by up to 5e-4 on about a sixth of the elements of float16 images.
    model, x = TinyEps(channels=3).float(), torch.rand(4, 3, 8, 8).half().requires_grad_(True)
    args = dict(t_star=0.05, model=model, steps=3)
    bpda = rdp_core.purify(x, grad="bpda", generator=torch.Generator().manual_seed(0), **args)
    plain = rdp_core.purify(x, grad="none", generator=torch.Generator().manual_seed(0), **args)
    assert bpda.requires_grad and torch.equal(bpda, plain)


def test_grad_modes():
    model, x = TinyEps(), images().requires_grad_(True)
    args = dict(t_star=0.05, model=model, steps=5, generator=torch.Generator().manual_seed(0))
    bpda = rdp_core.purify(x, grad="bpda", **dict(args, generator=torch.Generator().manual_seed(0)))
    exact = rdp_core.purify(x, grad="autograd", **args)
    assert torch.equal(bpda, exact.detach())
    weights = torch.randn_like(x)
    (grad,) = torch.autograd.grad((bpda * weights).sum(), x)
    assert torch.equal(grad, weights)  # identity backward
    assert not rdp_core.purify(x, grad="none", **args).requires_grad
    with pytest.raises(ValueError, match="grad must be one of"):
        rdp_core.purify(x, grad="exact", **args)
    with pytest.raises(ValueError, match="checkpoint spacing"):
        rdp_core.purify(x, grad="adjoint", checkpoint_every=0, **args)


def test_second_derivatives_through_the_adjoint_are_an_error_not_a_silent_zero():
    x = images().requires_grad_(True)
    out = rdp_core.purify(x, 0.05, model=TinyEps(), steps=4, grad="adjoint")
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_a_model_with_trainable_weights_is_warned_about():
    model = TinyEps().requires_grad_(True)
    with pytest.warns(UserWarning, match="weights get no gradient"):
        rdp_core.purify(images().requires_grad_(True), 0.05, model=model, steps=3, grad="adjoint")


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.fc = nn.Linear(32, 4).double()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_eot_gradient_is_the_mean_of_independent_draws_and_replays_from_a_seed():
    purifier = rdp_core.Purifier(_Classifier(), TinyEps(), t_star=0.05, steps=5)
    x, y = images(), torch.tensor([0, 1, 3])
    grad, loss = rdp_core.eot_gradient(purifier, x, y, draws=4, seed=1)
    again, _ = rdp_core.eot_gradient(purifier, x, y, draws=4, seed=1)
    assert torch.equal(grad, again) and grad.shape == x.shape and loss.shape == (3,)
    # By hand: the same repeated batch and seed, per-copy cross-entropy, gradients averaged over the draws.
    copies = x.repeat(4, 1, 1, 1).requires_grad_(True)
    logits = purifier(copies, generator=torch.Generator().manual_seed(1))
    losses = nn.functional.cross_entropy(logits, y.repeat(4), reduction="none")
    (per_copy,) = torch.autograd.grad(losses.sum(), copies)
    assert_relative_close(grad, per_copy.reshape(4, *x.shape).mean(0), 1e-12)
    draws = per_copy.reshape(4, *x.shape)
    assert not torch.equal(draws[0], draws[1])  # every copy had its own noise
    other, _ = rdp_core.eot_gradient(purifier, x, y, draws=4, seed=2)
    assert not torch.equal(grad, other)


def test_a_plain_pgd_loop_gets_the_exact_gradient_through_the_purifier_module():
    # What an attack library does: logits = module(x); loss.backward(); read x.grad.
    classifier, model, y = _Classifier(), TinyEps(), torch.tensor([0, 1, 3])
    x_adv = images()
    for _ in range(2):
        x_adv.requires_grad_(True)
        grads = {}
        for grad in ("adjoint", "autograd"):
            purifier = rdp_core.Purifier(classifier, model, t_star=0.05, steps=6, grad=grad,
                                         generator=torch.Generator().manual_seed(4))
            x_adv.grad = None
            nn.functional.cross_entropy(purifier(x_adv), y).backward()
            grads[grad] = x_adv.grad.clone()
        assert_relative_close(grads["adjoint"], grads["autograd"], 1e-10)
        x_adv = (x_adv.detach() + 0.01 * grads["adjoint"].sign()).clamp(0, 1)
