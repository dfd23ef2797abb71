"""The shipped default model: it loads, it is the model purify uses, and it really denoises."""
import json

import pytest
import torch

import rdp_core
from rdp_core.data import load_cifar10
from rdp_core.models.default import DEFAULT_WEIGHTS, load_default_eps_model, load_trained
from rdp_core.models.ncsnpp import ScoreSDEEpsModel
from rdp_core.train import denoising_psnr


def test_default_weights_ship_with_their_provenance():
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 8 * 2**20
    model = load_default_eps_model()
    assert isinstance(model, ScoreSDEEpsModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())  # frozen: attacks differentiate inputs only
    assert model.metadata["command"].startswith("rdp-core train-diffusion")
    assert json.loads(model.metadata["train_config"])["t_max"] == model.trained_t_max
    assert int(model.metadata["step"]) > 0


def test_purify_uses_the_default_model_when_none_is_given():
    x = torch.rand(2, 3, 32, 32)
    default = rdp_core.purify(x, model=load_default_eps_model(), steps=3, generator=torch.Generator().manual_seed(0))
    implicit = rdp_core.purify(x, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, implicit)
    assert isinstance(rdp_core.Purifier(torch.nn.Flatten()).model, ScoreSDEEpsModel)


def test_beyond_the_trained_range_purify_warns():
    with pytest.warns(RuntimeWarning, match="trained for t <="):
        rdp_core.purify(torch.rand(1, 3, 32, 32), t_star=0.9, steps=1)
    # The same checks when the default model is passed or wrapped: a Purifier used to skip both.
    purifier = rdp_core.Purifier(torch.nn.Flatten(), t_star=0.9, steps=1)
    with pytest.warns(RuntimeWarning, match="trained for t <="):
        purifier(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"takes images of shape \(N, 3, 32, 32\), got \(1, 3, 16, 16\)"):
        rdp_core.Purifier(torch.nn.Flatten(), steps=1)(torch.rand(1, 3, 16, 16))


def test_non_trained_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by rdp-core train-diffusion"):
        load_trained(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        load_trained(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("t", [0.05, 0.1, 0.3])
def test_the_default_model_really_denoises_real_test_images(data_root, t):
    # The one-step denoised estimate on CIFAR-10 test images (never seen in training) against predicting zero
    # noise, i.e. taking x_t / sqrt(alpha_bar) for the image: a model that learnt nothing is not better.
    images, _ = load_cifar10("test", root=data_root, dtype=torch.float32, limit=64)
    model = load_default_eps_model()
    zero_noise = denoising_psnr(lambda x, t: torch.zeros_like(x), images, t)
    assert denoising_psnr(model, images, t) > zero_noise + 3.0
