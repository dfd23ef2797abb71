"""Guided purification: GDMP's pixel-distance guidance and the paper's adversarial guidance (AGDM).

`purify(x, t_star, guidance="agdm")` (or "gdmp", or any `Guidance` instance) steers every reverse solver
through `GuidedEps` (see rdp_core.guidance.core for the mechanism and its gradients); the objectives are in
rdp_core.guidance.objectives; the auxiliary network of AGDM is trained by rdp_core.guidance.trades
(`rdp-core train-guidance`) and shipped in rdp_core/weights.
"""
from rdp_core.guidance.core import Guidance, GuidedEps, guidance_draw
from rdp_core.guidance.objectives import GDMP_CIFAR10_SCALE, AdversarialGuidance, PixelGuidance, ssim
from rdp_core.guidance.auxiliary import DEFAULT_AUXILIARY, cached_auxiliary, load_auxiliary

GUIDANCES = ("gdmp", "agdm")

__all__ = ["Guidance", "GuidedEps", "guidance_draw", "PixelGuidance", "AdversarialGuidance", "ssim",
           "GDMP_CIFAR10_SCALE", "GUIDANCES", "make_guidance", "load_auxiliary", "DEFAULT_AUXILIARY"]


def make_guidance(guidance, device="cpu", **options):
    """None, a Guidance instance (returned as is), or a name: "gdmp" or "agdm" (with the shipped auxiliary
    network on `device`), built with `options` (see PixelGuidance and AdversarialGuidance)."""
    if guidance is None or isinstance(guidance, Guidance):
        if options:
            raise ValueError(f"guidance options {sorted(options)} need guidance='gdmp' or 'agdm'")
        return guidance
    if guidance == "gdmp":
        return PixelGuidance(**options)
    if guidance == "agdm":
        network = options.pop("network", None) or cached_auxiliary(str(device))
        return AdversarialGuidance(network, **options)
    raise ValueError(f"guidance must be None, one of {GUIDANCES} or a Guidance instance, got {guidance!r}")
