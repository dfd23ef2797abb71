import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import rdp_core
from rdp_core.data import load_cifar10
from rdp_core.models import GaussianEpsModel


@pytest.fixture(scope="module")
def cifar_model(data_root):
    """The exact-score model of a Gaussian fitted to 10,000 CIFAR-10 training images."""
    train, _ = load_cifar10("train", root=data_root, dtype=torch.float32, limit=10_000)
    return GaussianEpsModel.fit(train * 2 - 1)


@pytest.fixture(scope="module")
def cifar_images(data_root):
    return load_cifar10("test", root=data_root, dtype=torch.float32, limit=16)


@pytest.fixture
def tiny_model():
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(256, 1, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    return GaussianEpsModel.fit(data, dtype=torch.float64)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("solver", ["sde", "ode", "ode-heun", "ddpm", "ddim"])
def test_purifies_real_cifar10_images_with_every_solver(cifar_model, cifar_images, solver):
    x, _ = cifar_images
    out = rdp_core.purify(x, 0.1, model=cifar_model, solver=solver, steps=20, generator=seeded())
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
    # The Gaussian (Wiener) prior keeps the image: close to the input, yet really changed by it.
    mse = ((out - x) ** 2).mean().item()
    assert 1e-4 < mse < 0.02


def test_purification_strength_grows_with_t_star(cifar_model, cifar_images):
    x, _ = cifar_images
    mse = [((rdp_core.purify(x, t, model=cifar_model, steps=20, generator=seeded()) - x) ** 2).mean().item()
           for t in (0.01, 0.1, 0.5)]
    assert mse[0] < mse[1] < mse[2]


def test_same_seed_same_output_and_different_seeds_differ(cifar_model, cifar_images):
    x, _ = cifar_images
    a = rdp_core.purify(x, model=cifar_model, steps=10, generator=seeded(7))
    b = rdp_core.purify(x, model=cifar_model, steps=10, generator=seeded(7))
    c = rdp_core.purify(x, model=cifar_model, steps=10, generator=seeded(8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    torch.manual_seed(3)
    d = rdp_core.purify(x, model=cifar_model, steps=10)
    torch.manual_seed(3)
    assert torch.equal(d, rdp_core.purify(x, model=cifar_model, steps=10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_keeps_the_input_dtype(tiny_model, dtype):
    x = torch.rand(3, 1, 2, 2).to(dtype)
    out = rdp_core.purify(x, model=tiny_model, steps=5, generator=seeded())
    assert out.dtype == dtype and out.shape == x.shape


def test_clip_false_returns_the_raw_sample(tiny_model):
    x = torch.ones(64, 1, 2, 2, dtype=torch.float64)
    raw = rdp_core.purify(x, 0.5, model=tiny_model, clip=False, generator=seeded())
    clipped = rdp_core.purify(x, 0.5, model=tiny_model, generator=seeded())
    assert raw.max() > 1.0 and clipped.max() <= 1.0
    assert torch.equal(clipped, raw.clamp(0, 1))


def test_purify_is_differentiable_with_exact_gradients(tiny_model):
    # The ODE purifier of a Gaussian model is smooth in x: check autograd against finite differences.
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64).mul(0.6).add(0.2).requires_grad_()
    for solver in ("ode-heun", "sde", "ddim"):
        def purified(inp, solver=solver):
            return rdp_core.purify(inp, 0.2, model=tiny_model, solver=solver, steps=10, clip=False,
                                   generator=seeded(5))
        assert torch.autograd.gradcheck(purified, (x,), eps=1e-6, atol=1e-8)


BAD_INPUTS = [
    (lambda: torch.rand(3, 32, 32), "shape \\(N, C, H, W\\)"),
    (lambda: torch.rand(0, 3, 32, 32), "non-empty"),
    (lambda: torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "x.float\\(\\) / 255"),
    (lambda: torch.full((2, 3, 32, 32), float("nan")), "NaN or Inf"),
    (lambda: torch.full((2, 3, 32, 32), float("inf")), "NaN or Inf"),
    (lambda: torch.rand(2, 3, 32, 32) * 2 - 1, "values in \\[0, 1\\]"),
    (lambda: torch.rand(2, 3, 32, 32) * 255, "values in \\[0, 1\\]"),
    (lambda: [[0.5]], "torch.Tensor"),
]


@pytest.mark.parametrize("make, message", BAD_INPUTS)
def test_bad_inputs_are_explained(cifar_model, make, message):
    with pytest.raises(ValueError, match=message):
        rdp_core.purify(make(), model=cifar_model)


def test_rounding_slightly_outside_the_range_is_accepted(tiny_model):
    x = torch.rand(2, 1, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0 + 5e-4, -5e-4
    rdp_core.purify(x, model=tiny_model, steps=2)


@pytest.mark.parametrize("t_star", [0.0, -0.1, 1.5, float("nan")])
def test_t_star_outside_0_1_is_rejected(tiny_model, t_star):
    with pytest.raises(ValueError, match="t_star"):
        rdp_core.purify(torch.rand(1, 1, 2, 2), t_star, model=tiny_model)


def test_default_model_only_takes_cifar_shapes_and_a_model_on_another_device_is_an_error(tiny_model):
    x = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="default model is a CIFAR-10 model for \\(N, 3, 32, 32\\) images"):
        rdp_core.purify(x)
    with pytest.raises(ValueError, match="model is on meta but the images are on cpu"):
        rdp_core.purify(x, model=copy.deepcopy(tiny_model).to("meta"))
    with pytest.raises(ValueError, match="shape"):
        rdp_core.purify(torch.rand(1, 3, 2, 2), model=tiny_model)


class _DropoutEps(nn.Module):
    """An epsilon model with dropout (DDPM++ has it): in training mode every call is another function."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.dropout = inner, nn.Dropout(0.1)

    def forward(self, x, t):
        return self.dropout(self.inner(x, t))


def test_a_score_model_with_dropout_in_training_mode_is_an_error(tiny_model):
    # Its dropout would draw new masks in every call and in the adjoint's recomputation of each step: a
    # silently randomised purifier and a gradient that is not that of the forward.
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    model = _DropoutEps(tiny_model).train()
    with pytest.raises(ValueError, match="training mode .*dropout.*model.eval\\(\\)"):
        rdp_core.purify(x, 0.1, model=model)
    purifier = rdp_core.Purifier(_LinearClassifier(), model, 0.1, steps=2)
    purifier.train()  # what attack libraries do: the classifier follows, the score model stays in eval mode
    assert purifier.classifier.training and not model.training
    purifier(x)
    model.dropout.p = 0.0
    rdp_core.purify(x, 0.1, model=model.train(), steps=2)  # no dropout in effect, nothing to refuse


class _LinearClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_purifier_is_a_module_computing_classifier_of_purify(tiny_model):
    classifier = _LinearClassifier()
    purifier = rdp_core.Purifier(classifier, tiny_model, t_star=0.2, generator=seeded(11))
    assert isinstance(purifier, nn.Module)
    assert purifier.classifier is classifier and purifier.model is tiny_model
    assert set(dict(purifier.named_buffers())) >= {"model.mean", "model.eigvecs"}
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    logits = purifier(x)
    replay = rdp_core.purify(x, 0.2, model=tiny_model, generator=seeded(11))  # the same first seed
    assert torch.equal(logits, classifier(replay))
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_purifier_draws_fresh_noise_per_call_and_replays_from_its_seed(tiny_model):
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    first = rdp_core.Purifier(_LinearClassifier(), tiny_model, generator=seeded(1))
    calls = [first(x) for _ in range(2)]
    assert not torch.equal(calls[0], calls[1])
    again = rdp_core.Purifier(first.classifier, tiny_model, generator=seeded(1))
    assert all(torch.equal(c, again(x)) for c in calls)


def test_purifier_rejects_a_bad_configuration_at_construction(tiny_model):
    with pytest.raises(ValueError, match="t_star"):
        rdp_core.Purifier(_LinearClassifier(), tiny_model, t_star=2.0)
    with pytest.raises(ValueError, match="unknown solver"):
        rdp_core.Purifier(_LinearClassifier(), tiny_model, solver="rk4")


def test_diffuse_returns_the_state_purify_starts_from(tiny_model):
    from rdp_core.sampling import DIFFUSION_DRAW, VP, StepNoise

    x = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    x_t = rdp_core.diffuse(x, 0.2, generator=seeded(4))
    noise = StepNoise.like(x * 2 - 1, seeded(4))(DIFFUSION_DRAW)
    torch.testing.assert_close(x_t, (VP.diffuse(x * 2 - 1, noise, VP.alpha_bar(0.2)) + 1) / 2)
    # One reverse step of an exact-score ODE from that state is what a 1-step purification returns.
    one_step = rdp_core.sampling.make_solver("ode", 0.2, steps=1).sample(tiny_model, x_t * 2 - 1)
    torch.testing.assert_close(rdp_core.purify(x, 0.2, model=tiny_model, solver="ode", steps=1, clip=False,
                                               generator=seeded(4)), (one_step + 1) / 2)


def test_import_loads_no_triton_and_touches_no_device(tmp_path):
    code = (
        "import sys, torch, rdp_core, rdp_core.ops, rdp_core.sampling, rdp_core.data, rdp_core.models\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'rdp_core._C' not in sys.modules, 'extension loaded eagerly'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # import the installed package
