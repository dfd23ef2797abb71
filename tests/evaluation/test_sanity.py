"""The evaluator's sanity checks pass on an honest attack and fail on deliberately masked gradients."""
import pytest
import torch

from rdp_core.evaluation import EvalConfig, evaluate


@pytest.fixture(scope="module")
def half_wrong(resnet20, test_images):
    """20 test images, alternately one that ResNet-20 gets wrong and one it gets right: room to rise and fall."""
    x, y = test_images
    with torch.no_grad():
        right = resnet20(x).argmax(1) == y
    index = torch.stack([(~right).nonzero().flatten()[:10], right.nonzero().flatten()[:10]], 1).flatten()
    return x[index], y[index]


def checks(classifier, images, tmp_path, **config):
    settings = dict(defense="none", n_images=20, iterations=8, sanity_images=8, sanity_iterations=8,
                    eps=(2 / 255, 8 / 255))
    summary = evaluate(EvalConfig(**{**settings, **config}), classifier, out_dir=tmp_path, images=images[0],
                       labels=images[1], progress=False)
    return {c["name"]: c["status"] for c in summary["sanity"]}


def test_an_honest_attack_passes_every_check(resnet20, half_wrong, tmp_path):
    assert checks(resnet20, half_wrong, tmp_path) == {"undefended": "pass", "unbounded": "pass", "eps": "pass",
                                                     "iterations": "pass", "attacked": "not run"}


def test_a_zero_gradient_fails_the_about_zero_checks(resnet20, half_wrong, tmp_path, broken_gradient):
    status = checks(broken_gradient(resnet20, 0.0), half_wrong, tmp_path)
    assert status["undefended"] == "FAIL" and status["unbounded"] == "FAIL"


def test_a_reversed_gradient_fails_the_eps_and_iteration_checks(resnet20, half_wrong, tmp_path, broken_gradient):
    # Small steps so that the attack, walking the wrong way, keeps fixing mistakes across its iterations.
    # (At 0.001 most mistakes are fixed within the first quarter: 4 rises, 0 falls, which the exact sign test
    # rightly calls insignificant, p = 0.0625.)
    status = checks(broken_gradient(resnet20, -1.0), half_wrong, tmp_path, step_size=0.0005)
    assert status["eps"] == "FAIL" and status["iterations"] == "FAIL"


def test_the_sign_test_is_exact():
    from rdp_core.evaluation.summary import sign_test_p

    # 3 rises and no fall is p = 1/8 (a normal approximation without continuity correction called it
    # significant), 5 to 0 is 1/32; falls never make a rise significant.
    assert sign_test_p(3, 0) == 0.125 and sign_test_p(5, 0) == 1 / 32 and sign_test_p(6, 1) == 8 / 128
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(0, 7) == 1.0
