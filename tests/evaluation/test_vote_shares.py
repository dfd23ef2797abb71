"""Accuracy per purification: Student's t quantile, the exact sign-flip test, and the paired share difference."""
import itertools
import math
import random

import pytest
from scipy.stats import t as student_t

from rdp_core.evaluation.compare import mcnemar_p
from rdp_core.evaluation.summary import wilson_interval
from rdp_core.evaluation.vote_shares import (paired_share_difference, share_entry, sign_flip_p,
                                             student_t_central_mass, student_t_quantile)


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 15, 63, 79, 511, 4000])
def test_student_t_matches_scipy(dof):
    assert student_t_quantile(0.95, dof) == pytest.approx(student_t.ppf(0.975, dof), rel=1e-12)
    assert student_t_quantile(0.5, dof) == pytest.approx(student_t.ppf(0.75, dof), rel=1e-12)
    for t in (0.1, 1.3, 2.0, 9.0):
        assert student_t_central_mass(t, dof) == pytest.approx(1 - 2 * student_t.sf(t, dof), abs=1e-13)


def test_student_t_quantile_checks_its_arguments():
    for level, dof in ((1.0, 5), (0.95, 0), (0.95, 2.5)):
        with pytest.raises(ValueError, match="positive integer dof"):
            student_t_quantile(level, dof)


def brute_force_sign_flip_p(steps):
    observed = abs(sum(steps))
    patterns = list(itertools.product((1, -1), repeat=len(steps)))
    return sum(abs(sum(s * x for s, x in zip(signs, steps))) >= observed for signs in patterns) / len(patterns)


@pytest.mark.parametrize("seed", range(6))
def test_sign_flip_p_is_the_share_of_sign_patterns_as_extreme(seed):
    rng = random.Random(seed)
    steps = [rng.randint(-5, 5) for _ in range(rng.randint(1, 12))]
    assert sign_flip_p(steps) == pytest.approx(brute_force_sign_flip_p(steps), abs=1e-12)


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (7, 2), (12, 12), (1, 9), (30, 18)])
def test_with_one_vote_the_sign_flip_test_is_mcnemars(b, c):
    steps = [1] * b + [-1] * c + [0] * 17
    assert sign_flip_p(steps) == pytest.approx(mcnemar_p(b, c), abs=1e-12)


def test_paired_share_difference_counts_votes_and_uses_the_t_interval():
    first, second = [5, 4, 3, 5, 0, 2], [5, 2, 4, 1, 0, 2]
    result = paired_share_difference(first, second, votes=5)
    d = [(f - s) / 5 for f, s in zip(first, second)]
    mean = sum(d) / 6
    half = student_t.ppf(0.975, 5) * math.sqrt(sum((x - mean) ** 2 for x in d) / 5) / math.sqrt(6)
    assert result["difference"] == pytest.approx(100 * mean)
    assert result["ci95"] == pytest.approx([100 * (mean - half), 100 * (mean + half)])
    assert (result["higher"], result["lower"], result["n"]) == (2, 1, 6)
    assert result["sign_flip_p"] == pytest.approx(brute_force_sign_flip_p([0, 2, -1, 4, 0, 0]))


def test_equal_differences_have_no_interval_and_bad_counts_are_refused():
    same = paired_share_difference([3, 3, 3], [3, 3, 3], votes=5)
    assert same["difference"] == 0 and same["ci95"] is None and same["sign_flip_p"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_share_difference([1], [1, 2], votes=5)
    with pytest.raises(ValueError, match="between 0 and the 5 votes"):
        paired_share_difference([6], [1], votes=5)


def test_share_entry_is_wilsons_interval_at_the_mean_share():
    entry = share_entry([5, 0, 3, 4], votes=5)
    low, high = wilson_interval(12 / 5, 4)
    assert entry["accuracy"] == pytest.approx(60.0) and entry["right_votes"] == 12
    assert entry["ci95"] == pytest.approx([100 * low, 100 * high])
    unanimous = share_entry([5] * 20, votes=5)
    assert unanimous["ci95"][0] < 100.0 == unanimous["ci95"][1]  # no false certainty where all images agree


def test_the_intervals_cover_the_truth():
    # Images with their own probability of a right purification; 5 purifications each, 40 images.
    rng = random.Random(1)
    covered_share, covered_difference, trials = 0, 0, 600
    for _ in range(trials):
        p_first = [rng.choice((0.2, 0.5, 0.9, 1.0)) for _ in range(40)]
        p_second = [min(1.0, p + 0.1) for p in p_first]
        first = [sum(rng.random() < p for _ in range(5)) for p in p_first]
        second = [sum(rng.random() < p for _ in range(5)) for p in p_second]
        truth_first, truth_second = 100 * sum(p_first) / 40, 100 * sum(p_second) / 40
        low, high = share_entry(first, 5)["ci95"]
        covered_share += low <= truth_first <= high
        low, high = paired_share_difference(first, second, 5)["ci95"]
        covered_difference += low <= truth_first - truth_second <= high
    assert covered_share / trials >= 0.95 and covered_difference / trials >= 0.92
