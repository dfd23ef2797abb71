"""AutoAttack (Croce and Hein 2020), `standard` and `rand`, from torchattacks' implementations of its attacks.

The individual attacks (APGD-CE, APGD-T, APGD-DLR, FAB-T, Square) are torchattacks' ports of the authors'
code; torchattacks is an optional dependency (install it with `pip install --no-deps torchattacks scipy`:
its metadata asks for torchvision, which would replace a CPU build of torch, while its code needs only
torch, numpy and scipy). The ensemble itself is assembled here rather than taken from torchattacks'
`AutoAttack` class, because that class leaves APGD and FAB at torchattacks' default of 10 iterations where
AutoAttack runs 100, and because it decides which images survive from one forward; for a randomized
defense, survival must be judged the evaluator's way (over its N purifications), so `judge` is a parameter.

For a randomized defense "broken" is a matter of degree (how many of the N purifications are wrong), and the
verdicts reported from one attacked image differ (all N right, a majority right, each purification counted):
so the judge returns the fraction of its purifications that are right, every candidate any attack produces
is judged, each image keeps the candidate judged most damaging (on a tie the later one, unless that is the
clean image an attack hands back where it failed), and an image leaves the cascade only once a candidate makes every
judged purification wrong. For a deterministic model (fractions 0 or 1) this is AutoAttack's own cascade.

Versions, as in the AutoAttack paper's code:
    standard: APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), Square (5000 queries); each
              with one restart, 100 iterations. For deterministic models.
    rand:     APGD-CE and APGD-DLR with 20 EOT samples, one restart, 100 iterations. For randomized ones.
Each attack runs only on the images that no earlier candidate made wholly wrong; APGD on all of them,
submitting its fooling and its highest-loss iterates (`_candidates`).
"""
import contextlib
from dataclasses import dataclass, field

import torch

from rdp_core.attacks.eot import predict_votes
from rdp_core.attacks.pgd import DEFAULT_EPS, NORMS
from rdp_core.checks import check_images, check_labels

AUTOATTACK_VERSIONS = ("standard", "rand")
_TORCHATTACKS_NORM = {"linf": "Linf", "l2": "L2"}


@dataclass
class AutoAttackResult:
    x_adv: torch.Tensor  # per input, the candidate judged most damaging; the input itself where the judge
    #                      found it wrong on every purification before any attack
    robust: torch.Tensor  # (n,) bool: the judge found every purification of x_adv right
    stages: list = field(default_factory=list)  # (attack name, images still robust after it)
    right_fraction: torch.Tensor = None  # (n,) the judge's fraction of right purifications of x_adv


def autoattack(model, x, y, *, norm="linf", eps=None, version="rand", n_classes=10, iterations=100, eot=20,
               square_queries=5000, seed=0, judge=None, progress=False):
    """AutoAttack `version` against `model` (images in [0, 1] -> logits); returns an AutoAttackResult.

    iterations: APGD and FAB iterations (AutoAttack: 100). eot: EOT samples of the `rand` version (20).
    judge: (images, labels) -> the fraction of the model's predictions that are right per image, in [0, 1]
    (a bool tensor is read as 1 or 0); default one forward.
    """
    check_images(x)
    check_labels(y, x)
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"version must be one of {AUTOATTACK_VERSIONS}, got {version!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
    attacks = _ensemble(model, version, norm, eps, n_classes, iterations, eot, square_queries, seed)
    judge = _fraction_judge(judge or (lambda images, labels: predict_votes(model, images, 1)[0] == labels))
    x = x.detach()
    x_adv = x.clone()
    right = judge(x, y)
    stages = [("clean", int((right == 1).sum()))]

    # The bar shows how many images the next attack takes on (at least one right purification) and how many
    # are still right on every purification (AutoAttack's robust).
    def standing():
        return {"attacking": int((right > 0).sum()), "robust": int((right == 1).sum())}

    for name, attack in _stages(attacks, progress, standing):
        remaining = (right > 0).nonzero().flatten()
        if len(remaining) == 0:
            break
        with _modes_preserved(model), _forward_count(model, name, attack, progress):
            candidates = _candidates(attack, x[remaining], y[remaining])
        for candidate in candidates:
            score = judge(candidate, y[remaining])
            # On a tie the later candidate wins, unless it is the clean image an attack returns where it failed.
            moved = (candidate != x[remaining]).flatten(1).any(1)
            keep = (score < right[remaining]) | ((score == right[remaining]) & moved)
            x_adv[remaining[keep]] = candidate[keep]
            right[remaining[keep]] = score[keep]
        stages.append((name, int((right == 1).sum())))
    return AutoAttackResult(x_adv, right == 1, stages, right)


def _fraction_judge(judge):
    def fraction(images, labels):
        right = judge(images, labels).detach().to(torch.float64).clone()
        if right.shape != labels.shape or right.isnan().any() or right.min() < 0 or right.max() > 1:
            raise ValueError(f"judge must return one fraction of right predictions in [0, 1] per image, shape "
                             f"{tuple(labels.shape)}; got shape {tuple(right.shape)}, values {right.tolist()}")
        return right
    return fraction


def _candidates(attack, x, y):
    """The adversarial images an attack submits to the judge.

    torchattacks' APGD (like AutoAttack's own) attacks only the images one forward gets right and returns the
    clean image wherever none of its forwards was fooled. That is right for a deterministic model; for a
    randomized defense the one forward decides nothing, and the iterate of highest loss is a better candidate
    than the clean image. So APGD runs here on every image still robust, one run as AutoAttack's single
    restart, and submits both its fooling iterate (its random start where none fooled) and its highest-loss
    iterate. Other attacks submit what they return.

    APGD averages the gradient over its EOT forwards but, in AutoAttack's code as in torchattacks' port, reads
    the loss and the prediction of the last of them only: the "highest-loss" iterate, the step-size halvings
    and the "fooling" iterate all follow one purification's outcome. At 10 iterations its step-size check runs
    after the second step and after every step from then on (at 100, over windows of 22 steps shrinking to 6),
    so each check compares two single-purification losses, and each halving sends the iterate back to the best
    so chosen. This is AutoAttack's behaviour and is kept, not corrected here."""
    apgd = import_torchattacks().APGD
    if not isinstance(attack, apgd):
        return [attack(x, y).detach()]
    torch.random.manual_seed(attack.seed)  # as APGD.perturb does before its restarts
    highest_loss, _, _, fooling = attack.attack_single_run(x.clone(), y.clone())
    return [fooling.detach(), highest_loss.detach()]


def _ensemble(model, version, norm, eps, n_classes, iterations, eot, square_queries, seed):
    ta = import_torchattacks()
    common = dict(norm=_TORCHATTACKS_NORM[norm], eps=eps, seed=seed, n_restarts=1)
    if version == "rand":
        return [("APGD-CE", ta.APGD(model, steps=iterations, loss="ce", eot_iter=eot, **common)),
                ("APGD-DLR", ta.APGD(model, steps=iterations, loss="dlr", eot_iter=eot, **common))]
    return [("APGD-CE", ta.APGD(model, steps=iterations, loss="ce", **common)),
            ("APGD-T", ta.APGDT(model, steps=iterations, n_classes=n_classes, **common)),
            ("FAB-T", ta.FAB(model, steps=iterations, multi_targeted=True, n_classes=n_classes, **common)),
            ("Square", ta.Square(model, n_queries=square_queries, **common))]


@contextlib.contextmanager
def _modes_preserved(model):
    """torchattacks sets the model to eval for an attack and then to train() if model.training was True,
    which would switch a wrapped classifier's BatchNorm to batch statistics: restore every module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _forward_count(model, name, attack, progress):
    """A running count of the model's forwards (APGD's each with a backward) during one attack: on the CPU one APGD
    stage on a purifier runs for most of an hour, and the stage bar alone would not move. APGD's single run
    makes (steps + 1) x eot_iter forwards; other attacks' counts are not known beforehand."""
    if not progress:
        yield
        return
    from tqdm.auto import tqdm

    apgd = isinstance(attack, import_torchattacks().APGD)
    total = (attack.steps + 1) * attack.eot_iter if apgd else None
    with tqdm(total=total, desc=name, unit="forward", leave=False) as bar:
        def count(*_):
            bar.update(1)  # no return value: a forward hook's return value would replace the output

        handle = model.register_forward_hook(count)
        try:
            yield
        finally:
            handle.remove()


def import_torchattacks():
    try:
        import torchattacks
    except ImportError as error:
        raise ImportError("AutoAttack needs the optional package torchattacks: pip install --no-deps "
                          "torchattacks==3.5.1 scipy (--no-deps: its metadata would pull torchvision and a "
                          "CUDA build of torch; its code needs only torch, numpy and scipy)") from error
    return torchattacks


def _stages(attacks, progress, standing):
    if not progress:
        yield from attacks
        return
    from tqdm.auto import tqdm

    with tqdm(attacks, desc="AutoAttack", unit="attack", leave=False) as bar:
        for name, attack in bar:
            bar.set_postfix(attack=name, **standing())
            yield name, attack
