"""PSNR of a model's one-step denoised estimate x0_hat(x_t) on CIFAR-10 test images, at several t.

    python python/evaluate_denoiser.py --data ../shared/data --n-images 1000

Compares the shipped default DDPM++ (or --weights FILE) with the exact score of a Gaussian fitted to the
training set (the Wiener filter), so the figure says how much the learned model adds.
"""
import argparse

import torch

from rdp_core.data import load_cifar10
from rdp_core.models import GaussianEpsModel
from rdp_core.models.default import DEFAULT_WEIGHTS, load_trained
from rdp_core.train import denoising_psnr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--times", default="0.05,0.1,0.2")
    args = parser.parse_args()
    images, _ = load_cifar10("test", root=args.data, dtype=torch.float32, limit=args.n_images)
    train_images, _ = load_cifar10("train", root=args.data, dtype=torch.float32)
    models = {"ddpm++": load_trained(args.weights), "gaussian": GaussianEpsModel.fit(train_images * 2 - 1)}
    print(f"one-step denoising PSNR (dB) on {len(images)} CIFAR-10 test images")
    for t in (float(v) for v in args.times.split(",")):
        row = {name: denoising_psnr(model, images, t) for name, model in models.items()}
        print(f"t = {t:<5}  " + "  ".join(f"{name}: {psnr:6.2f}" for name, psnr in row.items()))


if __name__ == "__main__":
    main()
