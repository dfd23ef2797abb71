"""Guided purification: the mechanism, the objectives, and exact gradients through them."""
import pytest
import torch

import rdp_core
from rdp_core.guidance import (AdversarialGuidance, GuidedEps, PixelGuidance, guidance_draw, make_guidance,
                               ssim)
from rdp_core.models.classifiers import CifarResNet
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp, ScoreSDEEpsModel
from rdp_core.sampling import DIFFUSION_DRAW, VP, StepNoise
from tiny_models import TinyBlockEps, TinyEps, assert_relative_close, images, input_gradient


def auxiliary_network(seed=0):
    torch.manual_seed(seed)
    network = CifarResNet(8).double()
    for module in network.modules():  # random BatchNorm statistics, so eval mode is not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return network.eval().requires_grad_(False)


GUIDANCES = {
    "gdmp-mse-x_t": lambda: PixelGuidance(scale=30.0),
    "gdmp-ssim-x0": lambda: PixelGuidance(distance="ssim", on="x0", scale=3.0, schedule="constant"),
    "agdm-x0": lambda: AdversarialGuidance(auxiliary_network(), layer="layer2", lam=0.5, scale=20.0),
    "agdm-x_t-classifier-only": lambda: AdversarialGuidance(auxiliary_network(), latent=False, on="x_t", scale=20.0),
}


def rgb_images(n=2, seed=1):
    return images(n=n, seed=seed, channels=3, size=8)


@pytest.mark.parametrize("solver, t_star, steps", [("sde", 0.05, 6), ("ode-heun", 0.05, 4), ("ddpm", 0.03, 5),
                                                   ("ddim", 0.03, 5)])
@pytest.mark.parametrize("name", list(GUIDANCES))
def test_guided_adjoint_equals_unrolled_autograd_in_float64(name, solver, t_star, steps):
    x, model, guidance = rgb_images(), TinyEps(channels=3), GUIDANCES[name]()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    args = dict(t_star=t_star, model=model, solver=solver, steps=steps, clip=False, guidance=guidance)
    out_autograd, grad_autograd = input_gradient(x, weights, grad="autograd", **args)
    out_adjoint, grad_adjoint = input_gradient(x, weights, grad="adjoint", checkpoint_every=2, **args)
    assert torch.equal(out_adjoint, out_autograd)
    assert_relative_close(grad_adjoint, grad_autograd, 1e-10)


@pytest.mark.filterwarnings("ignore:checkpoint_blocks=True with guidance on x0_hat saves little")
@pytest.mark.parametrize("solver, t_star, steps", [("sde", 0.05, 6), ("ddim", 0.03, 5)])
@pytest.mark.parametrize("name", ["gdmp-ssim-x0", "agdm-x0"])
def test_guided_adjoint_with_block_checkpointing_equals_unrolled_autograd(name, solver, t_star, steps):
    # Guidance on x0_hat differentiates the score model's blocks twice; the recomputed blocks must too.
    x, model = rgb_images(), TinyBlockEps(channels=3)
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    args = dict(t_star=t_star, model=model, solver=solver, steps=steps, clip=False)
    _, grad_autograd = input_gradient(x, weights, grad="autograd", guidance=GUIDANCES[name](), **args)
    _, grad_blocks = input_gradient(x, weights, grad="adjoint", checkpoint_blocks=True, guidance=GUIDANCES[name](),
                                    **args)
    assert_relative_close(grad_blocks, grad_autograd, 1e-10)


def test_block_checkpointing_with_guidance_through_the_score_model_is_warned_about():
    x = rgb_images().requires_grad_(True)
    model = TinyBlockEps(channels=3)
    with pytest.warns(UserWarning, match="saves little"):
        rdp_core.purify(x, 0.05, model=model, steps=2, guidance=GUIDANCES["agdm-x0"](), checkpoint_blocks=True)


@pytest.mark.parametrize("name", ["gdmp-mse-x_t", "agdm-x0"])
def test_gradient_includes_the_guidance_reading_the_input(name):
    # The input enters twice: through the diffused start state and through the guidance at every step. An
    # attack that saw only the first would see a different (weaker) gradient.
    x, model, guidance = rgb_images(), TinyEps(channels=3), GUIDANCES[name]()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    args = dict(t_star=0.05, model=model, steps=6, clip=False)
    _, full = input_gradient(x, weights, grad="adjoint", guidance=guidance, **args)

    class DetachedReference(type(guidance)):
        def prepare(self, x_in):
            return tuple(r.detach() for r in super().prepare(x_in))

    guidance.__class__ = DetachedReference
    _, start_only = input_gradient(x, weights, grad="autograd", guidance=guidance, **args)
    assert (full - start_only).norm() > 1e-3 * full.norm()


@pytest.mark.parametrize("name", ["gdmp-mse-x_t", "agdm-x0"])
@pytest.mark.parametrize("grad", ["adjoint", "autograd"])
def test_grad_mode_without_anything_requiring_grad_builds_no_graph(name, grad):
    # torchattacks calls its model under grad mode on inputs that do not require grad. The guidance gradient
    # must not then be built with create_graph: its graph would chain through every step (an AGDM AutoAttack
    # run went to 24 GB and was killed). The values are the same either way.
    x, model, guidance = rgb_images(), TinyEps(channels=3), GUIDANCES[name]()
    args = dict(t_star=0.05, model=model, steps=4, guidance=guidance, grad=grad)
    out = rdp_core.purify(x, generator=torch.Generator().manual_seed(3), **args)
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, rdp_core.purify(x, generator=torch.Generator().manual_seed(3), **args),
                                   atol=0, rtol=0)


def test_agdm_adjoint_through_a_unet_with_attention_on_the_torch_backend(monkeypatch):
    # AGDM's guidance gradient runs through the UNet's attention and the adjoint differentiates it again, so
    # every attention backend needs exact second derivatives (stock SDPA's CPU flash kernel has none).
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    torch.manual_seed(0)
    unet = NCSNpp(DDPMppConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0))
    model = ScoreSDEEpsModel(unet).eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    guidance = AdversarialGuidance(auxiliary_network().float(), layer="layer2", lam=0.5, scale=20.0)
    args = dict(t_star=0.01, model=model, solver="ode-heun", steps=2, guidance=guidance)
    _, unrolled = input_gradient(x, weights, grad="autograd", **args)
    _, adjoint = input_gradient(x, weights, grad="adjoint", **args)
    assert_relative_close(adjoint, unrolled, 1e-4)


def test_guided_gradient_matches_central_finite_differences():
    x, model = rgb_images(n=1), TinyEps(channels=3)
    guidance = AdversarialGuidance(auxiliary_network(), layer="layer1", lam=1.0, scale=20.0)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def loss(images):
        out = rdp_core.purify(images, 0.05, model=model, steps=5, clip=False, guidance=guidance,
                              generator=torch.Generator().manual_seed(3))
        return (out * weights).sum()

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    h = 1e-6  # small: the auxiliary network's ReLUs and argmax label make the map only piecewise smooth
    with torch.no_grad():
        numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert abs((grad * direction).sum().item() - numeric.item()) < 1e-6 * abs(numeric.item())


def test_guided_eps_is_the_score_shifted_by_the_scaled_objective_gradient():
    # MSE on x_t with a constant scale a: eps - sigma * a * grad(-mean((x - x_in_t)^2)) = eps - sigma a 2 (x_in_t - x) / D
    x_in, model = rgb_images() * 2 - 1, TinyEps(channels=3)
    noise = StepNoise(x_in.shape, seed=7, dtype=torch.float64)
    guidance = PixelGuidance(scale=5.0, schedule="constant")
    x = torch.randn(x_in.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    t = torch.full((len(x),), 0.04, dtype=torch.float64)
    alpha_bar, sigma = VP.alpha_bar(t).view(-1, 1, 1, 1), VP.sigma(t).view(-1, 1, 1, 1)
    target = alpha_bar.sqrt() * x_in + (1 - alpha_bar).sqrt() * noise(guidance_draw(3))
    expected = model(x, t) - sigma * 5.0 * 2 * (target - x) / x[0].numel()
    with torch.no_grad():
        actual = GuidedEps(model, guidance, guidance.prepare(x_in), noise, 3)(x, t)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert guidance_draw(3) != DIFFUSION_DRAW and guidance_draw(3) < 0


def test_pixel_guidance_pulls_the_purified_image_towards_the_input():
    x, model = rgb_images(n=4), TinyEps(channels=3)
    distances = {}
    for scale in (0.0, 300.0):
        out = rdp_core.purify(x, 0.2, model=model, steps=20, clip=False, grad="none", guidance="gdmp",
                              guidance_options={"scale": scale}, generator=torch.Generator().manual_seed(1))
        distances[scale] = (out - x).pow(2).mean().item()
    assert distances[300.0] < 0.8 * distances[0.0]


def test_zero_scale_is_plain_purification():
    x, model = rgb_images(), TinyEps(channels=3)
    args = dict(model=model, steps=6, grad="none", generator=torch.Generator().manual_seed(1))
    plain = rdp_core.purify(x, 0.05, **args)
    args["generator"] = torch.Generator().manual_seed(1)
    guided = rdp_core.purify(x, 0.05, guidance="gdmp", guidance_options={"scale": 0.0}, **args)
    torch.testing.assert_close(guided, plain, rtol=0, atol=1e-15)


def test_purifier_takes_guidance_and_moves_its_network():
    network = auxiliary_network().float()
    purifier = rdp_core.Purifier(torch.nn.Flatten(), TinyEps(channels=3).float(), 0.05, steps=3, guidance="agdm",
                                 guidance_options={"network": network})
    assert purifier.guidance_network is network
    assert not purifier.train().guidance_network.training  # attack libraries call train(): BatchNorm stays put
    assert purifier(rgb_images().float()).shape == (2, 3 * 8 * 8)



def test_a_purifier_with_the_shipped_network_owns_a_copy_of_it():
    # purifier.double() moves the Purifier's network; the process-wide cached one that purify(guidance="agdm")
    # uses must stay as it was.
    from rdp_core.guidance import cached_auxiliary

    shared = cached_auxiliary("cpu")
    purifier = rdp_core.Purifier(torch.nn.Flatten(), TinyEps(channels=3).float(), 0.05, steps=3, guidance="agdm")
    assert purifier.guidance_network is not shared
    purifier.double()
    assert next(shared.parameters()).dtype == torch.float32


def test_guidance_under_inference_mode_is_explained():
    with torch.inference_mode(), pytest.raises(ValueError, match="torch.no_grad"):
        rdp_core.purify(rgb_images().float(), 0.05, model=TinyEps(channels=3).float(), steps=2, guidance="gdmp")


def test_bad_guidance_is_explained():
    with pytest.raises(ValueError, match="guidance must be None"):
        make_guidance("pixel")
    with pytest.raises(ValueError, match="need guidance="):
        make_guidance(None, scale=3.0)
    with pytest.raises(ValueError, match="schedule"):
        PixelGuidance(schedule="linear")
    with pytest.raises(ValueError, match="scale"):
        PixelGuidance(scale=-1.0)
    with pytest.raises(ValueError, match="'x_t' or"):
        PixelGuidance(on="x_0")
    with pytest.raises(ValueError, match="frozen"):
        AdversarialGuidance(CifarResNet(8))
    with pytest.raises(ValueError, match="no objective"):
        AdversarialGuidance(auxiliary_network(), latent=False, lam=0.0)
    with pytest.raises(ValueError, match="layer"):
        auxiliary_network().representation(rgb_images(), "layer4")


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = rgb_images(n=2, seed=3)
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))
    noisy = a + 0.1 * torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (ssim(a, noisy) < 0.99).all()


def test_representation_is_one_forward_of_the_classifier():
    network, x = auxiliary_network(), rgb_images()
    features, logits = network.representation(x, "layer3")
    torch.testing.assert_close(logits, network(x))
    assert features.shape == (2, 64, 2, 2)


def test_adversarial_objective_is_the_squared_latent_norm_plus_the_weighted_log_probability():
    # The formula: g = -||f_L(x) - f_L(x_in)||^2 + lam * log p_f(y_hat | x). A mean in place of the
    # norm (what an earlier version computed) makes the latent term 64 to 4096 times weaker at CIFAR layers.
    network, x_in, x = auxiliary_network(), rgb_images(seed=1) * 2 - 1, rgb_images(seed=2) * 2 - 1
    guidance = AdversarialGuidance(network, layer="layer2", lam=0.5)
    reference = guidance.prepare(x_in)
    g = guidance.objective(None, None, x, reference, draw=None)
    features_in, logits_in = network.representation((x_in + 1) / 2, "layer2")
    features, logits = network.representation((x + 1) / 2, "layer2")
    y_hat = logits_in.argmax(1)
    expected = torch.stack([-(features[i] - features_in[i]).square().sum()
                            + 0.5 * torch.log_softmax(logits[i], 0)[y_hat[i]] for i in range(len(x))])
    torch.testing.assert_close(g, expected)
