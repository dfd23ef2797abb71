import math

import pytest
import torch

import rdp_core
from rdp_core.attacks import eot_loss_gradient, pgd_eot, predict_votes
from rdp_core.attacks.pgd import default_step_size
from rdp_core.models import GaussianEpsModel


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_breaks_an_undefended_classifier_inside_the_ball(resnet20, test_images, norm, eps):
    x, y = (t[:16] for t in test_images)
    step = 2 / 255 if norm == "linf" else 0.1
    result = pgd_eot(resnet20, x, y, norm=norm, eps=eps, iterations=10, step_size=step, eot=1,
                     generator=torch.Generator().manual_seed(0))
    delta = result.x_adv - x
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert accuracy(resnet20, x, y) > 0.8 and accuracy(resnet20, result.x_adv, y) == 0.0
    assert (size <= eps + 1e-6).all() and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert result.correct_fraction.shape == (10, 16) and result.loss.shape == (10, 16)
    assert result.correct_fraction[-1].mean() < result.correct_fraction[0].mean()


def test_default_step_is_the_literatures_in_linf_and_a_quarter_of_eps_in_l2(resnet20, test_images):
    assert default_step_size("linf", 4 / 255) == 0.007 and default_step_size("l2", 0.5) == 0.125
    with pytest.raises(ValueError, match="step_size"):
        default_step_size("l2", math.inf)
    x, y = (t[:4] for t in test_images)
    one_step = pgd_eot(resnet20, x, y, norm="l2", eps=0.5, iterations=1, eot=1, random_start=False).x_adv
    moved = (one_step - x).flatten(1).norm(dim=1)  # a little under 0.125 where [0, 1] clips a pixel
    assert (moved <= 0.125 + 1e-6).all() and (moved > 0.1).all()


def test_masked_gradient_moves_nothing(resnet20, test_images, broken_gradient):
    x, y = (t[:4] for t in test_images)
    for norm in ("linf", "l2"):
        result = pgd_eot(broken_gradient(resnet20, 0.0), x, y, norm=norm, iterations=3, eot=2, random_start=False)
        assert torch.equal(result.x_adv, x)


def test_unbounded_l2_is_limited_only_by_the_image_range(resnet20, test_images):
    x, y = (t[:4] for t in test_images)
    result = pgd_eot(resnet20, x, y, norm="l2", eps=math.inf, iterations=3, step_size=5.0, eot=1)
    assert (result.x_adv - x).flatten(1).norm(dim=1).min() > 2.0
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1


def test_eot_gradient_is_the_mean_over_draws_whatever_the_chunking(resnet20, test_images, noisy_logits):
    x, y = (t[:3] for t in test_images)
    single, single_loss, _ = eot_loss_gradient(resnet20, x, y, draws=1)
    for chunk in (None, 1, 3):  # a deterministic model: every draw is the same, so is their mean
        grad, losses, logits = eot_loss_gradient(resnet20, x, y, draws=4, chunk=chunk)
        assert losses.shape == (4, 3) and logits.shape == (4, 3, 10)
        assert torch.allclose(grad, single, rtol=1e-4, atol=1e-8) and torch.allclose(losses, single_loss.expand(4, 3))
    noisy, noisy_losses, _ = eot_loss_gradient(noisy_logits(resnet20, 2.0), x, y, draws=4, chunk=3)
    assert not torch.allclose(noisy, single, rtol=1e-2) and (noisy_losses != noisy_losses[0]).any()


def test_votes_are_independent_forwards(resnet20, test_images, noisy_logits):
    x, _ = (t[:8] for t in test_images)
    votes = predict_votes(noisy_logits(resnet20, 50.0), x, votes=5, chunk=2)
    assert votes.shape == (5, 8) and (votes != votes[0]).any()
    assert torch.equal(predict_votes(resnet20, x, votes=3), resnet20(x).argmax(1).expand(3, 8))


def test_pgd_eot_through_the_purifier_uses_its_exact_gradient(resnet20, test_images, data_root):
    """The full-gradient attack lowers the purified classifier's accuracy where BPDA's identity does less."""
    x, y = (t[:8] for t in test_images)
    from rdp_core.data import load_cifar10

    train, _ = load_cifar10("train", root=data_root, dtype=torch.float32, limit=5000)
    eps_model = GaussianEpsModel.fit(train * 2 - 1)
    purifier = rdp_core.Purifier(resnet20, eps_model, t_star=0.05, steps=5, generator=torch.Generator().manual_seed(1))
    result = pgd_eot(purifier, x, y, eps=16 / 255, iterations=6, step_size=4 / 255, eot=2,
                     generator=torch.Generator().manual_seed(0))
    assert result.correct_fraction[-1].mean() < result.correct_fraction[0].mean()


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="l1"), "norm"), (dict(eps=0.0), "eps"), (dict(iterations=0), "iterations"),
    (dict(step_size=-1.0), "step_size"), (dict(eot=0), "draws"),
])
def test_bad_attack_settings_are_clear_errors(resnet20, test_images, kwargs, message):
    x, y = (t[:2] for t in test_images)
    with pytest.raises(ValueError, match=message):
        pgd_eot(resnet20, x, y, **{"iterations": 1, **kwargs})


def test_bad_images_and_labels_are_clear_errors(resnet20, test_images):
    x, y = (t[:2] for t in test_images)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd_eot(resnet20, x * 2, y, iterations=1)
    with pytest.raises(ValueError, match="labels"):
        pgd_eot(resnet20, x, y[:1], iterations=1)
    with pytest.raises(ValueError, match="labels"):
        pgd_eot(resnet20, x, y.float(), iterations=1)
