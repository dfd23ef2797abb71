"""The robustness evaluation: attack a defense image by image, judge it over N purifications, check sanity.

    config = EvalConfig(defense="diffpure", attack="pgd-eot", norm="linf", eps=(8 / 255,), n_images=64)
    summary = evaluate(config, classifier, eps_model, "runs/eval")

For each batch of images the runner writes, as soon as each is known: the clean verdict (kind "clean",
eps 0), the verdict on the attack's adversarial image at every eps (kind "attack"), and, on the first
`sanity_images` images, the unbounded l_2 attack on the defense (kind "unbounded-l2") and PGD on the bare
classifier at the reference eps (kind "undefended"). A verdict runs the defense `votes` times on the image
(independent purifications) and records every prediction. Under torchrun each process takes every
world_size-th image, so each image is evaluated exactly once; rank 0 writes the summary.
"""
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from rdp_core.api import Purifier
from rdp_core.attacks import autoattack, pgd_eot, predict_votes
from rdp_core.attacks.pgd import DEFAULT_EPS, LINF_STEP, NORMS, default_step_size
from rdp_core.evaluation import distributed
from rdp_core.evaluation.records import CONFIG_FILE, RESUMABLE_CHANGES, RecordStore, eps_key, verdicts
from rdp_core.evaluation.summary import markdown, plot_accuracy_vs_eps, summarize
from rdp_core.guidance import load_auxiliary
from rdp_core.models.default import load_default_eps_model

DEFENSES = ("none", "diffpure", "gdmp", "agdm")
ATTACKS = ("pgd-eot", "bpda-eot", "autoattack-rand", "autoattack-standard")


@dataclasses.dataclass
class EvalConfig:
    defense: str = "diffpure"
    attack: str = "pgd-eot"
    norm: str = "linf"
    eps: tuple = ()  # empty: the reference eps of the norm (8/255 or 0.5)
    n_images: int = 64
    iterations: int = 200  # PGD iterations; APGD and FAB iterations for AutoAttack (which uses 100)
    eot: int = 20
    step_size: float = None  # None: 0.007 in l_inf; eps / 4 in l_2, for each eps (attacks.pgd.default_step_size)
    votes: int = 10  # purifications per verdict
    t_star: float = 0.1
    solver: str = "sde"
    steps: int = None
    seed: int = 0
    batch_size: int = 16
    eot_chunk: int = None
    checkpoint_blocks: bool = False  # the adjoint recomputes the score model's blocks: less memory, +1 forward/step
    square_queries: int = 5000
    sanity: bool = True
    sanity_images: int = 16
    sanity_iterations: int = 20
    unbounded_step: float = 2.0  # l_2 length of each unbounded step
    classifier: str = ""  # what the classifier was, for the record (the evaluator is handed the module)
    classifier_arch: str = None
    model: str = ""
    device: str = "cpu"
    # gdmp / agdm: options of rdp_core.guidance.PixelGuidance / AdversarialGuidance (scale, schedule, on, ...)
    # and, for agdm, the auxiliary network's weights (None: the shipped ones). None when unused, so that runs
    # recorded before guidance existed still resume.
    guidance_options: dict = None
    auxiliary: str = None

    def __post_init__(self):
        if self.defense not in DEFENSES:
            raise ValueError(f"defense must be one of {DEFENSES}, got {self.defense!r}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        self.eps = tuple(float(e) for e in self.eps) or (DEFAULT_EPS[self.norm],)
        if self.step_size is None and self.norm == "linf":
            self.step_size = LINF_STEP  # one number for every eps, as recorded before l_2 had its own default
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if any(not (0 < e < math.inf) for e in self.eps):
            raise ValueError(f"every eps must be positive and finite, got {self.eps}")
        for name in ("n_images", "iterations", "eot", "votes", "batch_size", "sanity_images", "sanity_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.defense == "none":
            # A deterministic classifier: more votes or EOT samples repeat the same computation.
            self.votes, self.eot = 1, 1
        if self.defense == "none" and self.attack == "bpda-eot":
            raise ValueError("bpda-eot approximates a purifier's gradient; with --defense none use pgd-eot")
        if self.guidance_options and self.defense not in ("gdmp", "agdm"):
            raise ValueError(f"guidance options need --defense gdmp or agdm, not {self.defense}")
        if self.auxiliary and self.defense != "agdm":
            raise ValueError(f"an auxiliary network is for --defense agdm, not {self.defense}")


def evaluate(config, classifier, eps_model=None, out_dir="runs/eval", *, images=None, labels=None, data_root=None,
             resume=False, progress=True):
    """Runs (or resumes) the evaluation, writes the records and, on rank 0, the summary; returns the summary.

    classifier: images in [0, 1] -> logits. eps_model: the purifier's epsilon model (None: the default).
    images, labels: the images to evaluate (default: the first config.n_images CIFAR-10 test images from
    data_root); image i of the records is images[i]. Returns None on ranks other than 0.
    """
    rank, world_size = distributed.rank_and_world()
    code = code_version()  # before the work: files edited while it runs did not make these results
    device = torch.device(config.device)
    store = RecordStore(out_dir, rank, world_size)
    if rank == 0:
        store.prepare(_config_dict(config), resume)
    distributed.barrier()
    if images is None:
        from rdp_core.data import load_cifar10

        images, labels = load_cifar10("test", root=data_root, dtype=torch.float32, limit=config.n_images)
    if len(images) < config.n_images or labels is None or len(labels) != len(images):
        raise ValueError(f"need {config.n_images} images with one label each, got {len(images)} images and "
                         f"{None if labels is None else len(labels)} labels")
    evaluation = _Evaluation(config, classifier.to(device).eval(), eps_model, device, progress)
    done = store.done_keys()
    mine = list(range(rank, config.n_images, world_size))
    with _progress_bar(len(mine), rank, progress) as bar:
        for start in range(0, len(mine), config.batch_size):
            indices = mine[start:start + config.batch_size]
            for job in evaluation.jobs():
                todo = [i for i in indices if (job.kind, i, eps_key(job.eps)) not in done and job.applies_to(i)]
                if todo:
                    store.append(evaluation.run(job, todo, images[todo].to(device), labels[todo].to(device)))
            bar.update(len(indices))
            bar.refresh()  # batches a resumed run skips pass within tqdm's redraw interval and would not show
    distributed.barrier()
    if rank != 0:
        return None
    return write_summary(out_dir, _config_dict(config), store.read_first(config.n_images), code)


def write_summary(out_dir, config, records, code=None, provenance=None):
    """summary.json, summary.md and accuracy_vs_eps.png of `records`; provenance (command, date, device, code)
    is this process's unless given."""
    out_dir = Path(out_dir)
    summary = summarize(records, config["norm"])
    provenance = provenance or _provenance(config, code)
    (out_dir / "summary.json").write_text(json.dumps({**provenance, "config": config, **summary}, indent=2))
    (out_dir / "summary.md").write_text(markdown(summary, config))
    plot_accuracy_vs_eps(summary, config, out_dir / "accuracy_vs_eps.png")
    return summary


def summarize_again(out_dir):
    """Rewrites an evaluation's summary from its config and records (after a change in how records are read or
    summarised, or to look at a run in progress), keeping the provenance of the run that made the records and
    adding that of this summary under "summarized"."""
    out_dir = Path(out_dir)
    config_path, summary_path = out_dir / CONFIG_FILE, out_dir / "summary.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an rdp-core eval folder: no {CONFIG_FILE}")
    config = json.loads(config_path.read_text())
    earlier = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    # config.json keeps the first run's settings; a resumed run may have changed the resumable ones (a larger
    # --n-images), and its summary holds them.
    last = earlier.get("config", {})
    config = {**config, **{k: last[k] for k in RESUMABLE_CHANGES if k in last}}
    records = RecordStore(out_dir).read_first(config["n_images"])
    if not records:
        raise ValueError(f"{out_dir} holds no records")
    run = {k: earlier[k] for k in ("command", "date", "device", "code") if k in earlier}
    return write_summary(out_dir, config, records, provenance={**run, "summarized": _provenance(config)})


def _provenance(config, code=None):
    return {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(torch.device(config["device"])), "code": code or code_version()}


@dataclasses.dataclass
class _Job:
    kind: str
    eps: float
    sanity_images: int = None

    def applies_to(self, index):
        return self.sanity_images is None or index < self.sanity_images


class _Evaluation:
    def __init__(self, config, classifier, eps_model, device, progress):
        self.config = config
        self.progress = progress
        self.classifier = classifier
        self.device = device
        self.generator = torch.Generator(device=device)
        if config.defense == "none":
            self.defense = self.gradient_model = classifier
        else:
            eps_model = eps_model if eps_model is not None else load_default_eps_model(device)
            options = dict(t_star=config.t_star, solver=config.solver, steps=config.steps, generator=self.generator,
                           **_guidance(config, device))
            self.defense = Purifier(classifier, eps_model, grad="none", **options)
            grad = "bpda" if config.attack == "bpda-eot" else "adjoint"
            self.gradient_model = Purifier(classifier, eps_model, grad=grad,
                                           checkpoint_blocks=config.checkpoint_blocks and grad == "adjoint", **options)

    def jobs(self):
        c = self.config
        yield _Job("clean", 0.0)
        for eps in c.eps:
            yield _Job("attack", eps)
        if c.sanity:
            yield _Job("unbounded-l2", math.inf, c.sanity_images)
            yield _Job("undefended", DEFAULT_EPS[c.norm], c.sanity_images)

    def run(self, job, indices, x, y):
        self._reseed(job, indices)
        start = time.perf_counter()
        x_adv, trace = self._adversarial(job, x, y)
        judge = self.classifier if job.kind == "undefended" else self.defense
        votes = predict_votes(judge, x_adv, 1 if job.kind == "undefended" else self.config.votes,
                              self.config.eot_chunk)
        seconds = (time.perf_counter() - start) / len(indices)
        records = [_record(job, index, label, votes[:, k], x_adv[k] - x[k], trace, k, seconds)
                   for k, (index, label) in enumerate(zip(indices, y.tolist()))]
        if job.kind == "undefended":  # the bare classifier's own clean verdict, for the sanity check
            for record, right in zip(records, (predict_votes(self.classifier, x, 1)[0] == y).tolist()):
                record["clean_correct"] = right
        return records

    def _adversarial(self, job, x, y):
        c = self.config
        if job.kind == "clean":
            return x, None
        if job.kind == "undefended":
            # Enough step length to reach the ball's edge in the given iterations, whatever the norm.
            step = max(c.step_size or default_step_size(c.norm, job.eps), 2.5 * job.eps / c.sanity_iterations)
            result = pgd_eot(self.classifier, x, y, norm=c.norm, eps=job.eps, iterations=c.sanity_iterations,
                             step_size=step, eot=1, generator=self.generator)
            return result.x_adv, result.correct_fraction
        if job.kind == "unbounded-l2":
            result = pgd_eot(self.gradient_model, x, y, norm="l2", eps=math.inf, iterations=c.sanity_iterations,
                             step_size=c.unbounded_step, eot=c.eot, eot_chunk=c.eot_chunk, generator=self.generator,
                             progress=self.progress)
            return result.x_adv, result.correct_fraction
        if c.attack.startswith("autoattack"):
            result = autoattack(self.gradient_model, x, y, norm=c.norm, eps=job.eps,
                                version=c.attack.removeprefix("autoattack-"), iterations=c.iterations, eot=c.eot,
                                square_queries=c.square_queries, seed=c.seed, judge=self._right_fraction,
                                progress=self.progress)
            return result.x_adv, None
        result = pgd_eot(self.gradient_model, x, y, norm=c.norm, eps=job.eps, iterations=c.iterations,
                         step_size=c.step_size, eot=c.eot, eot_chunk=c.eot_chunk, generator=self.generator,
                         progress=self.progress)
        return result.x_adv, result.correct_fraction

    def _right_fraction(self, x, y):
        return (predict_votes(self.defense, x, self.config.votes, self.config.eot_chunk) == y).double().mean(0)

    def _reseed(self, job, indices):
        """Noise as a function of (seed, job, the batch's first image and size): a batch resumed as it was run
        replays exactly; a batch cut differently (another --batch-size, process count or a partial batch
        redone) draws other noise, from the same distribution."""
        text = f"{self.config.seed}/{job.kind}/{eps_key(job.eps)}/{indices[0]}/{len(indices)}"
        self.generator.manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


def _record(job, index, label, votes, delta, trace, k, seconds):
    predictions = votes.tolist()
    correct_all, correct_majority = verdicts(predictions, label)
    record = {"kind": job.kind, "index": index, "label": label, "eps": eps_key(job.eps), "votes": predictions,
              "correct_all": correct_all, "correct_majority": correct_majority,
              "linf": float(delta.abs().max()), "l2": float(delta.flatten().norm()), "seconds": seconds}
    if trace is not None:
        record["correct_fraction"] = [round(float(v), 4) for v in trace[:, k]]
    return record


# What computes results; edits elsewhere (docs, tests) do not make a run's code differ from its commit.
CODE_PATHS = ("rdp_core", "csrc", "kernels", "setup.py", "pyproject.toml")


def code_version():
    """Which code made a result: rdp_core's version and, run from a git checkout, its commit and whether the
    code (CODE_PATHS) differed from it: a figure from uncommitted code cannot be reproduced from the commit."""
    from rdp_core import __version__

    code = {"rdp_core": __version__}
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # an installed copy: the repository around it, if any, is not its source
        return code
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30)
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  *CODE_PATHS],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return code
    if commit.returncode == 0 and changes.returncode == 0:
        code.update(git_commit=commit.stdout.strip(), git_dirty=bool(changes.stdout.strip()))
    return code


def device_name(device):
    """What a result was measured on: the GPU's name, or the CPU's and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _guidance(config, device):
    """Purifier's guidance arguments for the configured defense (none for diffpure)."""
    if config.defense not in ("gdmp", "agdm"):
        return {}
    options = dict(config.guidance_options or {})
    if config.defense == "agdm":
        options["network"] = load_auxiliary(config.auxiliary, device)
    return {"guidance": config.defense, "guidance_options": options}


def _config_dict(config):
    return dataclasses.asdict(config)


def _progress_bar(total, rank, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"evaluating (rank {rank})" if rank else "evaluating", unit="img",
                position=rank, disable=not enabled)
