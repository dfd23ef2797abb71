"""Accuracy per purification, the way DiffPure and the papers after it report it, compared image by image.

The evaluator purifies every image V times (`--votes`) and records each purification's prediction. The
share of the V purifications that are right estimates, per image, the probability that one purification
classifies it correctly; averaged over the images it is the accuracy of a single stochastic purification,
which is the figure the literature reports (one purification per image). Unlike a verdict (all votes or a
majority), the share keeps every vote, so two defenses compared on it are told apart with less noise.

Two defenses on the same images differ by the mean of the per-image share differences d_i, each a multiple of
1 / V. Its 95% interval is Student's t interval of the mean of the d_i (approximate: the d_i are bounded and
discrete). Whether the difference is real is the exact sign-flip (randomization) test: if the two defenses
were interchangeable on every image, each d_i would be as likely as -d_i, and the p-value is the probability,
over the 2^n sign patterns, of a sum at least as far from 0 as the one observed. The d_i lie on a lattice of
step 1 / V, so the distribution of the sum is computed exactly by convolution. With one vote per image the d_i
are -1, 0 or 1 and the test is exactly McNemar's.

A defense's own accuracy gets Wilson's interval of n images at the mean share: a share in [0, 1] with mean p
varies at most as much as one right-or-wrong verdict with probability p does, so the interval is
conservative, and it stays honest where every image has the same share (where a t interval would shrink to a
point).
"""
import math

import numpy as np

from rdp_core.evaluation.summary import mean_share_ci95

LEVEL_95 = 0.95


def share_entry(counts, votes):
    """The accuracy per purification of one defense from its right votes per image, with Wilson's interval."""
    n = len(counts)
    return {"accuracy": 100.0 * sum(counts) / (votes * n) if n else float("nan"), "right_votes": sum(counts),
            "votes": votes, "n": n, "ci95": mean_share_ci95([k / votes for k in counts])}


def paired_share_difference(first, second, votes, level=LEVEL_95):
    """Accuracy per purification of `first` minus that of `second` (right votes out of `votes` per image, the
    same images in the same order), in points: the mean difference with Student's t interval (None if every
    image differs by the same amount: no spread to estimate it from), how many images `first` has more and
    fewer votes right on, and the exact two-sided sign-flip p."""
    if len(first) != len(second) or not first:
        raise ValueError("paired_share_difference needs two equally long, non-empty lists of right-vote counts")
    if any(not 0 <= k <= votes for k in (*first, *second)):
        raise ValueError(f"right-vote counts must lie between 0 and the {votes} votes per image")
    steps = [f - s for f, s in zip(first, second)]
    n = len(steps)
    mean = sum(steps) / (n * votes)
    return {"difference": 100.0 * mean, "ci95": _t_interval(steps, votes, level), "n": n, "votes": votes,
            "higher": sum(s > 0 for s in steps), "lower": sum(s < 0 for s in steps),
            "sign_flip_p": sign_flip_p(steps)}


def _t_interval(steps, votes, level):
    n = len(steps)
    if n < 2 or len(set(steps)) == 1:
        return None
    mean = sum(steps) / n
    spread = math.sqrt(sum((s - mean) ** 2 for s in steps) / (n - 1))
    half = student_t_quantile(level, n - 1) * spread / math.sqrt(n)
    return [100.0 * max((mean - half) / votes, -1.0), 100.0 * min((mean + half) / votes, 1.0)]


def sign_flip_p(steps):
    """Exact two-sided randomization p of integer paired differences: the probability, with each difference's
    sign flipped by a fair coin, that their sum is at least as far from 0 as the observed sum."""
    sizes = [abs(int(s)) for s in steps if s]
    observed = abs(sum(steps))
    if observed == 0:
        return 1.0
    reach = sum(sizes)
    # distribution[j] = P(sum = j - reach), one fair sign at a time.
    distribution = np.zeros(2 * reach + 1)
    distribution[reach] = 1.0
    for size in sizes:
        shifted = np.zeros_like(distribution)
        shifted[size:] += distribution[:-size]
        shifted[:-size] += distribution[size:]
        distribution = shifted / 2
    sums = np.abs(np.arange(-reach, reach + 1))
    return float(min(1.0, distribution[sums >= observed].sum()))


def student_t_quantile(level, dof):
    """The t at which Student's distribution with `dof` (a positive integer) degrees of freedom holds `level`
    of its mass within [-t, t]: the two-sided interval's multiplier."""
    if not 0.0 < level < 1.0 or dof < 1 or int(dof) != dof:
        raise ValueError(f"need 0 < level < 1 and a positive integer dof, got level {level}, dof {dof}")
    return _bisect_above_zero(lambda t: student_t_central_mass(t, int(dof)) - level)


def student_t_central_mass(t, dof):
    """P(|T| <= t) for Student's t with an integer `dof`, from its finite series (Abramowitz and Stegun
    26.7.3 and 26.7.4): exact up to rounding, with no special functions."""
    theta = math.atan(t / math.sqrt(dof))
    cos_squared = math.cos(theta) ** 2
    # The bracketed series 1 + a c^2 + b c^4 + ...: each term is the one before times c^2 (k - 1) / k.
    first = 2 if dof % 2 == 0 else 3
    term = series = 1.0
    for k in range(first, dof - 1, 2):
        term *= cos_squared * (k - 1) / k
        series += term
    if dof % 2 == 0:
        return math.sin(theta) * series
    if dof == 1:
        return 2.0 / math.pi * theta
    return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)


def _bisect_above_zero(rising, iterations=200):
    """The root in (0, inf) of a function that rises from negative to positive across it."""
    low, high = 0.0, 1.0
    while rising(high) < 0:
        low, high = high, 2 * high
    for _ in range(iterations):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if rising(middle) < 0 else (low, middle)
    return (low + high) / 2
