"""Train a DDPM++ epsilon model on CIFAR-10 for purification (what `rdp-core train-diffusion` runs).

    python python/train_diffusion.py --data ../shared/data --out runs/train --minutes 60

The defaults are the shipped CPU model's (rdp_core.train.CPU_MODEL: nf 32, ch_mult (1, 2, 2), one residual
block per resolution, attention at 16x16; t in [0.001, 0.3]). On a GPU, widen it (e.g. --nf 128
--ch-mult 1,2,2,2 --blocks 4).
"""
import argparse

from rdp_core.models.ncsnpp import DDPMppConfig
from rdp_core.train import CPU_MODEL, TrainConfig, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="runs/train")
    parser.add_argument("--nf", type=int, default=CPU_MODEL.nf)
    parser.add_argument("--ch-mult", default=",".join(map(str, CPU_MODEL.ch_mult)))
    parser.add_argument("--blocks", type=int, default=CPU_MODEL.num_res_blocks)
    parser.add_argument("--t-max", type=float, default=TrainConfig.t_max)
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    args = parser.parse_args()
    model = DDPMppConfig(nf=args.nf, ch_mult=tuple(int(m) for m in args.ch_mult.split(",")),
                         num_res_blocks=args.blocks)
    path = train(TrainConfig(model=model, t_max=args.t_max, minutes=args.minutes), args.data, args.out)
    print("weights:", path)


if __name__ == "__main__":
    main()
