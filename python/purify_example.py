"""Embedding rdp_core in research code: purify real CIFAR-10 images and wrap a classifier as a Purifier.

    python python/purify_example.py --data ../shared/data

Uses the installed package as a user would. The epsilon model here is the exact score of a Gaussian fitted
to the training images (rdp_core.models.GaussianEpsModel); a learned DDPM++ model plugs in the same way.
"""
import argparse

import torch
from torch import nn

import rdp_core
from rdp_core.data import load_cifar10
from rdp_core.models import GaussianEpsModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder holding cifar-10-batches-py/")
    args = parser.parse_args()

    train, _ = load_cifar10("train", root=args.data, dtype=torch.float32, limit=10_000)
    model = GaussianEpsModel.fit(train * 2 - 1)  # the samplers work in [-1, 1]
    x, y = load_cifar10("test", root=args.data, dtype=torch.float32, limit=8)

    # 1. The functional API: same seed, same purification.
    pure = rdp_core.purify(x, t_star=0.1, model=model, generator=torch.Generator().manual_seed(0))
    print("purified", tuple(pure.shape), "mean |change|", (pure - x).abs().mean().item())

    # 2. A Purifier is an nn.Module: classifier(purify(x)), differentiable end to end, so an attack library
    #    can take gradients through it. Each call draws fresh noise, as EOT expects.
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # stand-in for a real classifier
    defended = rdp_core.Purifier(classifier, model, t_star=0.1, steps=20, generator=torch.Generator().manual_seed(1))
    x_attack = x.clone().requires_grad_()
    loss = nn.functional.cross_entropy(defended(x_attack), y)
    loss.backward()
    print("loss", loss.item(), "input-gradient norm", x_attack.grad.norm().item())


if __name__ == "__main__":
    main()
