"""The guidance objectives: GDMP's pixel distance (the baseline) and the paper's adversarial guidance (AGDM).

Scale schedules (`scale(t)`, per sample):
  "gdmp"      a * sigma(t) / sqrt(alpha_bar(t)): GDMP's dynamic scale, strongest where the sample is noisiest.
  "constant"  a at every step.

GDMP (Wang et al. 2022, arXiv 2205.14969) guides with g = -MSE(x_t, x_in_t) (or SSIM), x_in_t the input
diffused to the same t with fresh noise at every step, scale sqrt(1 - alpha_bar) / (m sqrt(alpha_bar)),
m = 2 * ptb / 3 / guide_scale. Their MSE is F.mse_loss averaged over the whole batch of 100 images; here every
objective is per sample (a mean over the image's own pixels), so that one image's purification does not
depend on what else is in the batch. Their CIFAR-10 setting (guide_scale 60000, ptb 8/255, batch 100) is
a = 60000 * 3 / (2 * 8/255) / 100 = 28687.5 here, the default.
"""
import math

import torch
import torch.nn.functional as F

from rdp_core.guidance.core import Guidance
from rdp_core.sampling.schedule import VP

SCHEDULES = ("gdmp", "constant")
GDMP_CIFAR10_SCALE = 60000 * 3 / (2 * 8 / 255) / 100


class _Scaled(Guidance):
    _OPTIONS = ()  # the attributes besides scale and schedule that define the objective (see graph_key)

    def __init__(self, scale, schedule, noise_schedule=VP):
        if schedule not in SCHEDULES:
            raise ValueError(f"scale schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance scale must be a finite number >= 0, got {scale!r}")
        self.scale_value, self.schedule, self._noise_schedule = float(scale), schedule, noise_schedule

    def graph_key(self):
        # Objects, not ids, for the schedule and the network: the key keeps them alive, so an id is never reused
        # by another object while a graph that baked this one in is cached.
        return (type(self).__name__, self.scale_value, self.schedule, self._noise_schedule,
                *(getattr(self, name) for name in self._OPTIONS))

    def scale(self, t):
        if self.schedule == "constant":
            return torch.full_like(t, self.scale_value)
        return self.scale_value * self._noise_schedule.sigma(t) / self._noise_schedule.alpha_bar(t).sqrt()


def _on(on):
    if on not in ("x_t", "x0"):
        raise ValueError(f"guidance reads the sample 'x_t' or its denoised estimate 'x0', got {on!r}")
    return on


class PixelGuidance(_Scaled):
    """GDMP: g = -MSE (or SSIM) between the sample and the input, per image.

    on="x_t": the sample x_t against the input diffused to t with this step's own noise (GDMP);
    on="x0":  the one-step denoised estimate x0_hat against the input itself.
    """

    _OPTIONS = ("distance", "on")

    def __init__(self, distance="mse", on="x_t", scale=GDMP_CIFAR10_SCALE, schedule="gdmp", noise_schedule=VP):
        super().__init__(scale, schedule, noise_schedule)
        if distance not in ("mse", "ssim"):
            raise ValueError(f"GDMP distance must be 'mse' or 'ssim', got {distance!r}")
        self.distance, self.on = distance, _on(on)
        self.uses_x0 = on == "x0"

    def objective(self, x_t, t, x0_hat, reference, draw):
        (x_in,) = reference
        if self.on == "x0":
            sample, target = x0_hat, x_in
        else:
            alpha_bar = self._noise_schedule.alpha_bar(t).to(x_t.dtype).view(-1, 1, 1, 1)
            sample, target = x_t, alpha_bar.sqrt() * x_in + (1.0 - alpha_bar).sqrt() * draw()
        if self.distance == "ssim":
            # On the [-1, 1] states, as GDMP computes it. SSIM was made for non-negative intensities: with signed
            # values its luminance term can change sign (ssim(a, -a) is about 0.85), so its gradient points away
            # from the target on more pixels than on [0, 1] images; kept as GDMP defined its guidance.
            return ssim(sample, target)
        return -(sample - target).pow(2).flatten(1).mean(1)


class AdversarialGuidance(_Scaled):
    """AGDM: g = -||f_L(x) - f_L(x_in)||^2 + lam * log p_f(y_hat | x), f an adversarially trained network.

    network: a classifier with `representation(images in [0, 1], layer) -> (features, logits)`, e.g. a
        CifarResNet trained by rdp_core.guidance.trades; frozen and in eval mode.
    layer: which representation L is compared (CifarResNet: "layer1", "layer2", "layer3", "pool").
    lam: weight of the classifier term; y_hat is f's prediction on the input. latent=False drops the latent
        term (the classifier-only ablation); lam=0 leaves the latent term alone.
    on: "x0" compares the denoised estimate x0_hat (the default), "x_t" the noisy sample itself.
    The latent distance is the squared norm (the sum over the representation's elements, per image), as in the
    formula above. Its size depends on the layer, so the right scale does too: at the pooled features of the
    shipped ResNet-20 its gradient is 0.1 to 0.9 times the classifier term's (t = 0.01 to 0.09), hence the
    defaults scale 100 and lam 1; at layer3 it is about 400 times larger than at the pooled features (scale
    0.25 with lam 400 keeps the same balance). Measured by python/guidance_gradient_norms.py.
    """

    _OPTIONS = ("network", "layer", "lam", "latent", "on")

    def __init__(self, network, layer="pool", lam=1.0, latent=True, on="x0", scale=100.0, schedule="constant",
                 noise_schedule=VP):
        super().__init__(scale, schedule, noise_schedule)
        if not latent and lam == 0:
            raise ValueError("adversarial guidance with latent=False and lam=0 has no objective")
        if any(p.requires_grad for p in network.parameters()) or network.training:
            raise ValueError("the auxiliary network must be frozen and in eval mode "
                             "(network.eval().requires_grad_(False))")
        self.network, self.layer, self.lam, self.latent, self.on = network, layer, float(lam), latent, _on(on)
        self.uses_x0 = on == "x0"

    def prepare(self, x_in):
        features, logits = self.network.representation((x_in + 1.0) * 0.5, self.layer)
        return features, logits.argmax(1)

    def objective(self, x_t, t, x0_hat, reference, draw):
        features_in, y_hat = reference
        sample = x0_hat if self.on == "x0" else x_t
        features, logits = self.network.representation((sample + 1.0) * 0.5, self.layer)
        g = torch.zeros(len(sample), dtype=sample.dtype, device=sample.device)
        if self.latent:
            g = g - (features - features_in).pow(2).flatten(1).sum(1)
        if self.lam:
            g = g + self.lam * F.log_softmax(logits, dim=1).gather(1, y_hat[:, None]).squeeze(1)
        return g


def ssim(a, b, window=11, sigma=1.5, c1=0.01**2, c2=0.03**2):
    """Per-image mean structural similarity (Wang et al. 2004) with a Gaussian window, channels separately."""
    coords = torch.arange(window, dtype=a.dtype, device=a.device) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window)

    def blur(x):
        return F.conv2d(x, kernel, padding=window // 2, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
