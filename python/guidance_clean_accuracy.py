"""Clean accuracy of ResNet-56 after plain, GDMP-guided and AGDM-guided purification, same noise for all.

    python python/guidance_clean_accuracy.py --data ../shared/data --n-images 64 --agdm-scales 100,1000

No attack: a quick look at what guidance does to the images a defense must keep (the first N CIFAR-10
test images, t* = 0.1, the shipped default model and auxiliary network, one purification each with the
same seed). Robust accuracy comes from `rdp-core eval --defense agdm`.
"""
import argparse
import json

import torch

import rdp_core
from rdp_core.data import load_cifar10
from rdp_core.models import load_cifar_resnet


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--agdm-scales", default="100,1000")
    parser.add_argument("--t-star", type=float, default=0.1)
    args = parser.parse_args()
    x, y = load_cifar10("test", root=args.data, dtype=torch.float32, limit=args.n_images)
    resnet56 = load_cifar_resnet(f"{args.data}/classifiers/cifar10-resnet-akamaster/resnet56-4bfd9763.th")
    settings = {"none (input)": None, "diffpure": {}, "gdmp": {"guidance": "gdmp"}}
    for scale in args.agdm_scales.split(","):
        settings[f"agdm scale {scale}"] = {"guidance": "agdm", "guidance_options": {"scale": float(scale)}}
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
        print(f"{name:>20}: clean accuracy {100 * accuracy:.2f}%, mean |purified - input| "
              f"{results[name]['mean_abs_change']:.4f}", flush=True)
    print(json.dumps({"n_images": len(x), "t_star": args.t_star, "results": results}))


if __name__ == "__main__":
    main()
