"""Clean accuracy of ResNet-56 after plain, GDMP-guided and AGDM-guided purification, same noise for all.

    python python/guidance_clean_accuracy.py --data ../shared/data --n-images 64 --agdm-scales 100,1000
    python python/guidance_clean_accuracy.py --data ../shared/data --n-images 128 --agdm-scales 100 --ablation

No attack: a quick look at what guidance does to the images a defense must keep (the first N CIFAR-10
test images, t* = 0.1, the shipped default model and auxiliary network, one purification each with the
same seed). Robust accuracy comes from `rdp-core eval --defense agdm`. --ablation adds AGDM variants at the
first scale: the latent term alone (lam 0), the classifier term alone (latent off), guidance on x_t instead
of the denoised estimate, and the latent distance at layer3 instead of the pooled features (its scale divided
and lam multiplied by LAYER3_GRADIENT_RATIO, so that both terms keep their strength).
"""
import argparse
import json

import torch

import rdp_core
from rdp_core.data import load_cifar10
from rdp_core.models import load_cifar_resnet

# Median norm of the latent term's gradient at layer3 over that at the pooled features: 350x to 430x for
# t = 0.09 to 0.01 (`python python/guidance_gradient_norms.py --data ../shared/data --n-images 32`).
LAYER3_GRADIENT_RATIO = 400.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--agdm-scales", default="100,1000")
    parser.add_argument("--t-star", type=float, default=0.1)
    parser.add_argument("--ablation", action="store_true", help="add AGDM's ablation variants")
    args = parser.parse_args()
    x, y = load_cifar10("test", root=args.data, dtype=torch.float32, limit=args.n_images)
    resnet56 = load_cifar_resnet(f"{args.data}/classifiers/cifar10-resnet-akamaster/resnet56-4bfd9763.th")
    settings = {"none (input)": None, "diffpure": {}, "gdmp": {"guidance": "gdmp"}}
    scales = args.agdm_scales.split(",")
    for scale in scales:
        settings[f"agdm scale {scale}"] = {"guidance": "agdm", "guidance_options": {"scale": float(scale)}}
    if args.ablation:
        scale = float(scales[0])
        variants = {"latent only (lam 0)": {"lam": 0.0}, "classifier only": {"latent": False},
                    "on x_t": {"on": "x_t"},
                    # scale / 400 and lam 400: both terms as strong as at the pooled features
                    "layer3": {"layer": "layer3", "scale": scale / LAYER3_GRADIENT_RATIO,
                               "lam": LAYER3_GRADIENT_RATIO}}
        for name, options in variants.items():
            settings[f"agdm {name}"] = {"guidance": "agdm", "guidance_options": {"scale": scale, **options}}
    results = {}
    for name, options in settings.items():
        if options is None:
            images = x
        else:
            images = torch.cat([rdp_core.purify(xb, args.t_star, grad="none", generator=torch.Generator().manual_seed(i),
                                                **options) for i, xb in enumerate(x.split(16))])
        with torch.no_grad():
            accuracy = (resnet56(images).argmax(1) == y).float().mean().item()
        results[name] = {"clean_accuracy": accuracy, "mean_abs_change": (images - x).abs().mean().item()}
        print(f"{name:>26}: clean accuracy {100 * accuracy:.2f}%, mean |purified - input| "
              f"{results[name]['mean_abs_change']:.4f}", flush=True)
    print(json.dumps({"n_images": len(x), "t_star": args.t_star, "results": results}))


if __name__ == "__main__":
    main()
