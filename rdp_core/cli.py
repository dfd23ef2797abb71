"""The `rdp-core` command line.

    rdp-core purify --data ../shared/data --n-images 64 --out runs/purify

purifies CIFAR-10 test images, prints a CIFAR ResNet's accuracy on them before and after, and writes
grid.png (rows: input, diffused to t*, purified), purify.json (the configuration, timing, accuracies and
per-image results) and purified.npz (the purified images as uint8).

    rdp-core eval --data ../shared/data --defense diffpure --attack pgd-eot --norm linf --n-images 16

attacks a defense and reports clean and robust accuracy with sanity checks (rdp_core.evaluation); under
`torchrun --nproc_per_node K -m rdp_core.cli eval ...` the images are sharded over K processes.
"""
import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rdp_core.api import diffuse, purify
from rdp_core.attacks import NORMS
from rdp_core.data import default_root, load_cifar10
from rdp_core.evaluation import ATTACKS, DEFENSES, EvalConfig, evaluate
from rdp_core.evaluation.compare import VERDICTS, write_comparison
from rdp_core.evaluation.distributed import init_from_env, shutdown
from rdp_core.evaluation.runner import device_name, summarize_again
from rdp_core.evaluation.worst_case import write_worst_case
from rdp_core.guidance.objectives import SCHEDULES
from rdp_core.guidance.trades import TradesConfig, train_auxiliary
from rdp_core.models import GaussianEpsModel, load_cifar_resnet, load_classifier
from rdp_core.models.default import load_default_eps_model, load_trained
from rdp_core.models.ncsnpp import DDPMppConfig
from rdp_core.sampling import SOLVERS, make_solver
from rdp_core.sampling.precision import PRECISIONS
from rdp_core.train import CPU_MODEL, TrainConfig, train
from rdp_core.visualize import image_grid, write_png


DEFAULT_CLASSIFIER = "classifiers/cifar10-resnet-akamaster/resnet56-4bfd9763.th"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rdp-core", description="diffusion-based adversarial purification")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_purify_command(commands)
    _add_train_command(commands)
    _add_train_guidance_command(commands)
    _add_eval_command(commands)
    _add_compare_command(commands)
    _add_summarize_command(commands)
    _add_worst_case_command(commands)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["rdp-core"] + list(sys.argv[1:] if argv is None else argv))
    return args.run(args)


def _add_purify_command(commands):
    p = commands.add_parser("purify", help="purify CIFAR-10 test images; write a PNG grid, JSON metrics and the images")
    p.add_argument("--data", default=None, help="data root holding cifar-10-batches-py/ (default: $RDP_CORE_DATA "
                   "or ~/.cache/rdp_core/data)")
    p.add_argument("--n-images", type=int, default=64, help="first N test images (default 64)")
    p.add_argument("--t-star", type=float, default=0.1, help="diffusion time in (0, 1] (default 0.1)")
    p.add_argument("--solver", choices=SOLVERS, default="sde", help="reverse solver (default sde: Euler-Maruyama)")
    p.add_argument("--steps", type=int, default=None, help="reverse steps (default: dt = 1e-3, or the whole chain)")
    p.add_argument("--model", default="default",
                   help="epsilon model: 'default' (the shipped DDPM++), 'gaussian' (the exact score of a Gaussian "
                        "fitted to the training images: a Wiener-filter baseline), or a .safetensors file written by "
                        "rdp-core train-diffusion")
    p.add_argument("--fit-images", type=int, default=50_000, help="training images the Gaussian is fitted to")
    p.add_argument("--classifier", default=None,
                   help=f"CIFAR ResNet checkpoint (akamaster format) to measure accuracy with, or 'none' "
                        f"(default: DATA/{DEFAULT_CLASSIFIER} when present)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the purification noise")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="the score model's precision (default fp32); bf16 or fp16 also purify once in fp32 with the "
                        "same noise and report how far the two results and their predictions are apart")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", type=Path, default=Path("runs/purify"), help="output folder")
    p.set_defaults(run=run_purify)


def _add_train_command(commands):
    p = commands.add_parser("train-diffusion", help="train a DDPM++ epsilon model on the CIFAR-10 training set")
    p.add_argument("--data", default=None, help="data root holding cifar-10-batches-py/")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="folder for the log and the weights")
    p.add_argument("--nf", type=int, default=CPU_MODEL.nf, help="base channel count (128 in DDPM++)")
    p.add_argument("--ch-mult", type=_int_list("channel multipliers", "1,2,2,2"),
                   default=",".join(map(str, CPU_MODEL.ch_mult)),
                   help="channel multipliers per resolution (DDPM++: 1,2,2,2)")
    p.add_argument("--num-res-blocks", type=int, default=CPU_MODEL.num_res_blocks,
                   help="residual blocks per resolution (DDPM++: 4)")
    p.add_argument("--t-max", type=float, default=TrainConfig.t_max, help="largest diffusion time trained on")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    p.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps,
                   help="stop after this many steps (0: budget only)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(run=run_train)


def _add_train_guidance_command(commands):
    defaults = TradesConfig()
    p = commands.add_parser("train-guidance", help="train AGDM's auxiliary network with TRADES on CIFAR-10")
    p.add_argument("--data", default=None, help="data root holding cifar-10-batches-py/")
    p.add_argument("--out", type=Path, default=Path("runs/train-guidance"), help="folder for the log and weights")
    p.add_argument("--depth", type=int, default=defaults.depth, help="CIFAR ResNet depth 6n+2 (default 20)")
    p.add_argument("--beta", type=float, default=defaults.beta, help="TRADES' robustness weight (default 6)")
    p.add_argument("--eps", default="8/255", help="l_inf radius of the inner attack (default 8/255)")
    p.add_argument("--attack-steps", type=int, default=defaults.attack_steps, help="inner attack steps (default 5)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate, cosine-annealed (default 0.1)")
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="stop after this many steps (0: budget)")
    p.add_argument("--eval-images", type=int, default=defaults.eval_images,
                   help="test images for the final clean and PGD-20 accuracy")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(run=run_train_guidance)


def run_train_guidance(args):
    radii = _parse_eps(args.eps)
    if len(radii) != 1:
        raise SystemExit(f"--eps: train-guidance takes one radius, got {args.eps!r}")
    (eps,) = radii
    config = TradesConfig(depth=args.depth, beta=args.beta, eps=eps, step_size=eps / 4,
                          attack_steps=args.attack_steps, batch_size=args.batch_size, lr=args.lr,
                          minutes=args.minutes, max_steps=args.max_steps, eval_images=args.eval_images, seed=args.seed)
    path = train_auxiliary(config, args.data, args.out, resume=args.resume, device=_resolve_device(args.device),
                           command=args.command_line)
    print(f"wrote {path} and {args.out / 'train_log.jsonl'}")
    return 0


def _add_eval_command(commands):
    defaults = EvalConfig()
    p = commands.add_parser("eval", help="attack a defense on CIFAR-10 test images; clean and robust accuracy with "
                            "confidence intervals, sanity checks, a markdown table and a PNG of accuracy against eps")
    p.add_argument("--data", default=None, help="data root holding cifar-10-batches-py/")
    p.add_argument("--defense", choices=DEFENSES, default=defaults.defense,
                   help="none: the bare classifier; diffpure: purification then the classifier; gdmp: purification "
                        "guided by pixel distance to the input; agdm: adversarial guidance (the paper's method)")
    p.add_argument("--attack", choices=ATTACKS, default=defaults.attack)
    p.add_argument("--norm", choices=NORMS, default=defaults.norm)
    p.add_argument("--eps", default=None,
                   help="comma-separated radii, fractions allowed: 2/255,4/255,8/255 (default 8/255 or 0.5)")
    p.add_argument("--n-images", type=int, default=defaults.n_images, help="first N test images")
    p.add_argument("--iterations", type=int, default=defaults.iterations,
                   help="PGD iterations (default 200); APGD/FAB iterations for AutoAttack (which uses 100)")
    p.add_argument("--eot", type=int, default=defaults.eot, help="EOT samples per gradient (default 20)")
    p.add_argument("--step-size", type=float, default=defaults.step_size,
                   help="PGD step (default 0.007 in l_inf, eps/4 in l_2)")
    p.add_argument("--votes", type=int, default=defaults.votes,
                   help="independent purifications per verdict: robust only if right on all (default 10)")
    p.add_argument("--classifier", default=None,
                   help=f"CIFAR ResNet checkpoint, akamaster format (default DATA/{DEFAULT_CLASSIFIER})")
    p.add_argument("--classifier-arch", default=None,
                   help="architecture of --classifier: resnet20/32/44/56/110 (akamaster), wrn-28-10 (RobustBench) "
                        "or resnet50 (torchvision) (default: read from an akamaster file name)")
    p.add_argument("--model", default="default", help="epsilon model: default, gaussian, or a .safetensors file")
    p.add_argument("--fit-images", type=int, default=50_000, help="training images the Gaussian is fitted to")
    p.add_argument("--t-star", type=float, default=defaults.t_star)
    p.add_argument("--solver", choices=SOLVERS, default=defaults.solver)
    p.add_argument("--steps", type=int, default=None, help="reverse steps (default: dt = 1e-3)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--eot-chunk", type=int, default=None, help="at most this many EOT copies per forward (memory)")
    p.add_argument("--checkpoint-blocks", action="store_true",
                   help="the attack's adjoint recomputes the score model's blocks instead of keeping one step's "
                        "graph: 2.4x less peak memory on the CPU bench, one more forward per step (same gradient); "
                        "with guidance on x0_hat it saves little and costs about 3x")
    p.add_argument("--square-queries", type=int, default=defaults.square_queries)
    p.add_argument("--no-sanity", dest="sanity", action="store_false", help="skip the sanity-check attacks")
    p.add_argument("--sanity-images", type=int, default=defaults.sanity_images,
                   help="images the sanity-check attacks run on (the first ones)")
    p.add_argument("--sanity-iterations", type=int, default=defaults.sanity_iterations)
    _add_guidance_options(p)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--resume", action="store_true", help="continue the evaluation in --out where it stopped")
    p.set_defaults(run=run_eval)


# --option: (guidance options key, the defenses it applies to); unset options keep the objectives' defaults.
GUIDANCE_FLAGS = {
    "guidance_scale": ("scale", ("gdmp", "agdm")),
    "guidance_schedule": ("schedule", ("gdmp", "agdm")),
    "guidance_on": ("on", ("gdmp", "agdm")),
    "gdmp_distance": ("distance", ("gdmp",)),
    "agdm_layer": ("layer", ("agdm",)),
    "agdm_lambda": ("lam", ("agdm",)),
    "agdm_latent": ("latent", ("agdm",)),
}


def _add_guidance_options(p):
    g = p.add_argument_group("guidance (--defense gdmp or agdm)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="scale a of the guidance (defaults: GDMP's CIFAR-10 setting 28687.5; agdm 100)")
    g.add_argument("--guidance-schedule", choices=SCHEDULES, default=None,
                   help="gdmp: a * sigma(t) / sqrt(alpha_bar(t)) (GDMP's; default for gdmp); constant: a "
                        "(default for agdm)")
    g.add_argument("--guidance-on", choices=("x_t", "x0"), default=None,
                   help="guide the sample x_t or its one-step denoised estimate x0 (defaults: gdmp x_t, agdm x0)")
    g.add_argument("--gdmp-distance", choices=("mse", "ssim"), default=None, help="GDMP's distance (default mse)")
    g.add_argument("--agdm-layer", default=None, help="auxiliary representation compared: layer1, layer2, layer3 "
                   "or pool (default pool)")
    g.add_argument("--agdm-lambda", type=float, default=None,
                   help="weight of the auxiliary classifier's log-probability term (default 1; 0: latent term only)")
    g.add_argument("--agdm-no-latent", dest="agdm_latent", action="store_const", const=False, default=None,
                   help="drop the latent distance (the classifier-term-only ablation)")
    g.add_argument("--auxiliary", default=None, help="auxiliary network weights for agdm (default: the shipped ones, "
                   "made by rdp-core train-guidance)")


def _guidance_options(args):
    """The guidance options given on the command line, or a ValueError for one that the defense does not take."""
    options = {}
    for flag, (key, defenses) in GUIDANCE_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if args.defense not in defenses:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --defense {' or '.join(defenses)}, "
                             f"not {args.defense}")
        options[key] = value
    return options or None


def _add_compare_command(commands):
    p = commands.add_parser("compare", help="compare defenses evaluated on the same images: paired differences in "
                            "clean and robust accuracy with intervals and McNemar's test, a table and a PNG")
    p.add_argument("runs", nargs="+", type=Path,
                   help="rdp-core eval output folders, the baseline first, all attacked the same way")
    p.add_argument("--verdict", choices=VERDICTS, default="all votes",
                   help="an image is robust when all its purifications are right (default) or most of them; "
                        "'per purification' scores every purification on its own, the accuracy DiffPure reports")
    p.add_argument("--plan-images", type=int, default=None, metavar="N",
                   help="also give the power of McNemar's exact test on N images at the observed discordance "
                   "(and at half its imbalance), and the images it needs for 80%% power: how likely a run of N "
                   "images would settle each difference, and how many would")
    p.add_argument("--looks", type=_int_list("image counts", "16,32,48"), default=None, metavar="K,K,...",
                   help="image counts at which the comparison was read before (e.g. 16,32,48 as a run grew): "
                   "also give McNemar's p at each and the p adjusted for these repeated looks")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.set_defaults(run=run_compare)


def _int_list(what, example):
    """An argparse type for a comma-separated list of integers, with an error that says what was expected."""
    def parse(text):
        try:
            return [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as {example}, got {text!r}") from None
    return parse


def _add_summarize_command(commands):
    p = commands.add_parser("summarize", help="rewrite the summary of eval folders from their records (a run in "
                            "progress, or runs read under a newer rule), keeping each run's own provenance")
    p.add_argument("runs", nargs="+", type=Path, help="rdp-core eval output folders")
    p.set_defaults(run=run_summarize)


def _add_worst_case_command(commands):
    p = commands.add_parser("worst-case", help="one defense's runs under several attacks as one run: per image, "
                            "the attack that did best (the field's worst case over attacks); summarize and compare "
                            "read it like any run")
    p.add_argument("runs", nargs="+", type=Path,
                   help="rdp-core eval output folders of one defense, the first giving the clean verdicts")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=run_worst_case)


def run_worst_case(args):
    try:
        write_worst_case(args.runs, args.out)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"rdp-core worst-case: {error}") from None
    print((args.out / "summary.md").read_text())
    print(f"wrote {args.out}: config.json, records, summary.json, summary.md and accuracy_vs_eps.png")
    return 0


def run_summarize(args):
    for run in args.runs:
        try:
            summary = summarize_again(run)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"rdp-core summarize: {error}") from None
        print(f"{run}: {summary['n_images']} images; wrote summary.json, summary.md and accuracy_vs_eps.png")
    return 0


def run_compare(args):
    try:
        write_comparison(args.runs, args.out, args.verdict, args.plan_images, args.looks)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"rdp-core compare: {error}") from None
    print((args.out / "comparison.md").read_text())
    print(f"wrote {args.out / 'comparison.json'}, {args.out / 'comparison.md'} and {args.out / 'comparison.png'}")
    return 0


def run_eval(args):
    device = init_from_env() or _resolve_device(args.device)
    try:
        config = _eval_config(args, device)
    except ValueError as error:
        raise SystemExit(f"rdp-core eval: {error}") from None
    if args.defense != "none":
        make_solver(args.solver, args.t_star, args.steps)  # a bad configuration fails before the slow set-up
    classifier = _load_classifier(args)
    if classifier is None:
        raise SystemExit("eval needs a classifier: pass --classifier")
    eps_model = _load_eps_model(args, device)[0] if args.defense != "none" else None
    try:
        summary = evaluate(config, classifier, eps_model, args.out, data_root=args.data, resume=args.resume)
    finally:
        shutdown()
    if summary is not None:
        print((args.out / "summary.md").read_text())
        print(f"wrote {args.out / 'summary.json'}, {args.out / 'summary.md'}, {args.out / 'accuracy_vs_eps.png'} "
              f"and the per-image records in {args.out / 'records'}")
    return 0


def _eval_config(args, device):
    return EvalConfig(defense=args.defense, attack=args.attack, norm=args.norm, eps=_parse_eps(args.eps),
                      n_images=args.n_images, iterations=args.iterations, eot=args.eot, step_size=args.step_size,
                      votes=args.votes, t_star=args.t_star, solver=args.solver, steps=args.steps, seed=args.seed,
                      batch_size=args.batch_size, eot_chunk=args.eot_chunk,
                      checkpoint_blocks=args.checkpoint_blocks, square_queries=args.square_queries,
                      sanity=args.sanity, sanity_images=args.sanity_images, sanity_iterations=args.sanity_iterations,
                      classifier=args.classifier or DEFAULT_CLASSIFIER, classifier_arch=args.classifier_arch,
                      model=args.model, device=str(device), guidance_options=_guidance_options(args),
                      auxiliary=args.auxiliary)


def _parse_eps(text):
    """'2/255,0.5' -> (2/255, 0.5); None -> () (the norm's reference eps)."""
    if text is None:
        return ()
    values = []
    for part in text.split(","):
        numerator, _, denominator = part.strip().partition("/")
        try:
            values.append(float(numerator) / (float(denominator) if denominator else 1.0))
        except ValueError:
            raise SystemExit(f"--eps: cannot read {part!r}; expected numbers or fractions like 8/255") from None
    return tuple(values)


def run_train(args):
    model = DDPMppConfig(nf=args.nf, ch_mult=tuple(args.ch_mult),
                         num_res_blocks=args.num_res_blocks)
    config = TrainConfig(model=model, t_max=args.t_max, batch_size=args.batch_size, lr=args.lr,
                         ema_decay=args.ema_decay, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed)
    path = train(config, args.data, args.out, resume=args.resume, command=args.command_line)
    print(f"wrote {path} and {args.out / 'train_log.jsonl'}")
    return 0


def run_purify(args):
    if args.n_images < 1:
        raise SystemExit(f"--n-images must be at least 1, got {args.n_images}")
    make_solver(args.solver, args.t_star, args.steps)  # reject a bad configuration before the slow set-up
    device = _resolve_device(args.device)
    images, labels = load_cifar10("test", root=args.data, dtype=torch.float32, limit=args.n_images)
    model, fit_images = _load_eps_model(args, device)

    classifier = _load_classifier(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # Replays the first batch's diffusion exactly: same generator state, same batch shape.
    diffused = diffuse(images[:args.batch_size].to(device), args.t_star, solver=args.solver, steps=args.steps,
                       generator=torch.Generator(device=device).set_state(generator.get_state())).cpu()
    noise_state = generator.get_state()
    purified, seconds = _purify_in_batches(images, model, generator, device, args, args.precision)
    mse = ((purified - images) ** 2).flatten(1).mean(1)
    psnr = [_psnr(m) for m in mse.tolist()]
    accuracy = _accuracies(classifier, images, purified, labels, args.batch_size)
    if args.precision != "fp32":
        reference, _ = _purify_in_batches(images, model, torch.Generator(device=device).set_state(noise_state),
                                          device, args, "fp32")
        precision_effect = _precision_effect(purified, reference, classifier, labels, args.batch_size)

    args.out.mkdir(parents=True, exist_ok=True)
    shown = min(len(images), 16, args.batch_size)
    write_png(image_grid([images[:shown], diffused[:shown], purified[:shown]]), args.out / "grid.png")
    np.savez_compressed(args.out / "purified.npz", x=(purified * 255).round().to(torch.uint8).numpy(),
                        y=labels.numpy())
    report = _report(args, device, fit_images, seconds, mse, psnr, labels)
    report["accuracy"] = accuracy
    if args.precision != "fp32":
        report["against_fp32"] = precision_effect
    (args.out / "purify.json").write_text(json.dumps(report, indent=2))
    print(f"purified {len(images)} images in {seconds:.2f} s ({len(images) / seconds:.1f} images/s on "
          f"{report['device']}); mean PSNR to the input {report['psnr_mean']:.2f} dB")
    if accuracy:
        print(f"{accuracy['classifier']} accuracy on these {len(images)} images: clean "
              f"{accuracy['clean']:.2f}%, purified {accuracy['purified']:.2f}%")
    if args.precision != "fp32":
        _print_precision_effect(args.precision, precision_effect)
    print(f"wrote {args.out / 'grid.png'}, {args.out / 'purify.json'}, {args.out / 'purified.npz'}")
    return 0


def _load_eps_model(args, device):
    """(model, number of images it was fitted to or None) for --model."""
    if args.model == "default":
        return load_default_eps_model(device), None
    if args.model == "gaussian":
        print(f"fitting the Gaussian prior to {args.fit_images} CIFAR-10 training images ...", flush=True)
        train, _ = load_cifar10("train", root=args.data, dtype=torch.float32, limit=args.fit_images)
        return GaussianEpsModel.fit(train * 2 - 1).to(device), train.shape[0]
    return load_trained(args.model, device), None


def _load_classifier(args):
    """The accuracy classifier: --classifier, else the data root's ResNet-56 if present, else None."""
    if args.classifier == "none":
        return None
    path = Path(args.classifier) if args.classifier else Path(args.data or default_root()) / DEFAULT_CLASSIFIER
    if args.classifier is None and not path.is_file():
        print(f"no classifier at {path}: accuracy is not measured (pass --classifier)", flush=True)
        return None
    arch = getattr(args, "classifier_arch", None)
    return load_classifier(arch, path) if arch else load_cifar_resnet(path)


def _psnr(mse):
    return 10 * math.log10(1 / max(mse, 1e-12))


def _predictions(classifier, x, batch_size):
    with torch.no_grad():
        return torch.cat([classifier(xb).argmax(1) for xb in x.split(batch_size)])


def _accuracies(classifier, images, purified, labels, batch_size):
    if classifier is None:
        return None

    def accuracy(x):
        return 100.0 * (_predictions(classifier, x, batch_size) == labels).float().mean().item()

    name = f"ResNet-{len(classifier.layer1) * 6 + 2}"
    return {"classifier": name, "clean": accuracy(images), "purified": accuracy(purified)}


def _precision_effect(purified, reference, classifier, labels, batch_size):
    """How a reduced-precision purification differs from the float32 one with the same noise: pixels (on the
    [0, 1] scale) and, with a classifier, predictions and accuracy."""
    difference = (purified - reference).abs()
    effect = {"max_abs_difference": difference.max().item(), "mean_abs_difference": difference.mean().item(),
              "psnr_to_fp32_mean": sum(_psnr(m) for m in difference.square().flatten(1).mean(1).tolist())
              / len(purified)}
    if classifier is not None:
        ours, theirs = (_predictions(classifier, x, batch_size) for x in (purified, reference))
        effect.update(prediction_agreement=100.0 * (ours == theirs).float().mean().item(),
                      fp32_purified_accuracy=100.0 * (theirs == labels).float().mean().item())
    return effect


def _print_precision_effect(precision, effect):
    line = (f"{precision} against fp32 with the same noise: max |difference| {effect['max_abs_difference']:.3g}, "
            f"mean {effect['mean_abs_difference']:.3g}, PSNR {effect['psnr_to_fp32_mean']:.1f} dB")
    if "prediction_agreement" in effect:
        line += (f"; predictions agree on {effect['prediction_agreement']:.2f}% of the images "
                 f"(fp32 purified accuracy {effect['fp32_purified_accuracy']:.2f}%)")
    print(line)


def _resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _purify_in_batches(images, model, generator, device, args, precision):
    from tqdm.auto import tqdm

    out = []
    start = time.perf_counter()
    with torch.no_grad(), tqdm(total=len(images), desc=f"purifying ({precision})", unit="img") as bar:
        for batch in images.split(args.batch_size):
            out.append(purify(batch.to(device), args.t_star, model=model, solver=args.solver, steps=args.steps,
                              generator=generator, precision=precision).cpu())
            bar.update(len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(out), time.perf_counter() - start


def _report(args, device, fit_images, seconds, mse, psnr, labels):
    return {
        "command": args.command_line,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "config": {"t_star": args.t_star, "solver": args.solver, "steps": args.steps, "seed": args.seed,
                   "precision": args.precision,
                   "batch_size": args.batch_size, "model": args.model, "fit_images": fit_images},
        "n_images": len(labels),
        "seconds": seconds,
        "images_per_second": len(labels) / seconds,
        "mse_mean": float(mse.mean()),
        "psnr_mean": sum(psnr) / len(psnr),
        "per_image": [{"index": i, "label": int(y), "mse": float(m), "psnr": p}
                      for i, (y, m, p) in enumerate(zip(labels, mse, psnr))],
    }


if __name__ == "__main__":
    sys.exit(main())
