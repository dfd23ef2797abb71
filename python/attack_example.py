"""Attacking the purifier from research code: rdp_core's PGD-EOT, a hand-written PGD loop, and torchattacks.

    python python/attack_example.py --data ../shared/data --n-images 4

All three see the exact gradient of the stochastic purification (the checkpointed adjoint behind
`Purifier`); the final verdict re-purifies each adversarial image several times, as `rdp-core eval` does.
Small settings so that it runs in a few minutes on a CPU; `rdp-core eval` is the full evaluation.
"""
import argparse

import torch
import torch.nn.functional as F

import rdp_core
from rdp_core.attacks import pgd_eot, predict_votes
from rdp_core.data import load_cifar10
from rdp_core.models import load_cifar_resnet


def hand_written_pgd(model, x, y, eps=8 / 255, step=2 / 255, iterations=5):
    """What a user would write: any loop over loss.backward() gets the purifier's exact gradient."""
    x_adv = x.clone()
    for _ in range(iterations):
        x_adv.requires_grad_(True)
        F.cross_entropy(model(x_adv), y).backward()
        x_adv = (x + (x_adv.detach() + step * x_adv.grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--n-images", type=int, default=4)
    args = parser.parse_args()
    x, y = load_cifar10("test", root=args.data, dtype=torch.float32, limit=args.n_images)
    resnet56 = load_cifar_resnet(f"{args.data}/classifiers/cifar10-resnet-akamaster/resnet56-4bfd9763.th")
    defended = rdp_core.Purifier(resnet56, t_star=0.1, generator=torch.Generator().manual_seed(0)).eval()

    def right_on_all(images, votes=5):
        return (predict_votes(defended, images, votes) == y).all(0).float().mean().item()

    print(f"clean: right on all 5 purifications for {100 * right_on_all(x):.0f}% of {len(x)} images")
    adv = pgd_eot(defended, x, y, iterations=5, eot=2, step_size=2 / 255, progress=True).x_adv
    print(f"rdp_core pgd_eot (5 iterations, 2 EOT): {100 * right_on_all(adv):.0f}%")
    print(f"hand-written PGD (5 iterations): {100 * right_on_all(hand_written_pgd(defended, x, y)):.0f}%")
    try:
        import torchattacks
    except ImportError:
        print("torchattacks not installed (pip install --no-deps torchattacks scipy): skipped")
        return
    adv = torchattacks.PGD(defended, eps=8 / 255, alpha=2 / 255, steps=5)(x, y)
    print(f"torchattacks PGD (5 iterations): {100 * right_on_all(adv):.0f}%")


if __name__ == "__main__":
    main()
