"""Train AGDM's auxiliary network with TRADES from Python, as `rdp-core train-guidance` does.

    python python/train_guidance.py --data ../shared/data --minutes 40 --out runs/train-guidance

Writes OUT/auxiliary.safetensors (fp16, with the configuration, the command and the measured clean and PGD-20
accuracies in its metadata) and OUT/train_log.jsonl; then uses the network for one guided purification.
"""
import argparse
import sys

import torch

import rdp_core
from rdp_core.data import load_cifar10
from rdp_core.guidance import load_auxiliary
from rdp_core.guidance.trades import TradesConfig, train_auxiliary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/train-guidance")
    parser.add_argument("--depth", type=int, default=TradesConfig.depth)
    parser.add_argument("--minutes", type=float, default=TradesConfig.minutes)
    args = parser.parse_args()
    config = TradesConfig(depth=args.depth, minutes=args.minutes)
    path = train_auxiliary(config, args.data, args.out, command=" ".join(["python"] + sys.argv))
    network = load_auxiliary(path)
    print({k: network.metadata[k] for k in ("clean_accuracy", "pgd20_accuracy", "eval_images")})

    x, _ = load_cifar10("test", root=args.data, dtype=torch.float32, limit=4)
    purified = rdp_core.purify(x, 0.1, guidance="agdm", guidance_options={"network": network}, grad="none",
                               generator=torch.Generator().manual_seed(0))
    print(f"AGDM-guided purification of 4 test images: mean |change| {(purified - x).abs().mean():.4f}")


if __name__ == "__main__":
    main()
