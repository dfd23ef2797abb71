"""Per-image majority verdicts of several evaluation runs of one defense, and their worst case over attacks.

    python python/per_image_verdicts.py bench/eval/agdm_linf bench/eval/agdm8_aarand3_linf --first 8

`rdp-core compare` refuses runs made with different attacks (their verdicts answer different questions). For
runs of one defense under different attacks this prints, on the images all of them attacked (optionally only
the first N test images), each run's majority-vote robust verdict per image, its majority and per-purification
accuracy, and the worst case: an image counts robust only where every run's attack left it robust by majority
(the field's per-image minimum over attacks). Read-only; nothing is written.
"""
import argparse

from rdp_core.evaluation.compare import _verdicts, load_run
from rdp_core.evaluation.summary import _vote_share


def attacked_images(pairs, first):
    return {i for i in pairs if first is None or i < first}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="rdp-core eval output folders")
    parser.add_argument("--first", type=int, default=None, help="only the first N test images")
    args = parser.parse_args()
    runs = [(run, load_run(run)[1]) for run in args.runs]
    for eps in sorted(set.intersection(*(set(pairs) for _, pairs in runs)), key=float):
        images = sorted(set.intersection(*(attacked_images(pairs[eps], args.first) for _, pairs in runs)))
        if not images:
            continue
        print(f"eps {eps}, {len(images)} images {images[0]}..{images[-1]}:")
        worst = [True] * len(images)
        for run, pairs in runs:
            robust = _verdicts(pairs[eps], images, "correct_majority")[1]
            shares = [_vote_share(pairs[eps][i][1]) for i in images]
            worst = [w and r for w, r in zip(worst, robust)]
            print(f"  {run}: majority {100 * sum(robust) / len(images):.2f}%, per purification attacked "
                  f"{100 * sum(shares) / len(images):.2f}%, robust by majority: {''.join('01'[r] for r in robust)}")
        print(f"  worst case over these runs: majority {100 * sum(worst) / len(images):.2f}%, "
              f"robust: {''.join('01'[w] for w in worst)}")


if __name__ == "__main__":
    main()
