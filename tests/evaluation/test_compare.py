"""Paired comparison of defenses: the statistics, and the comparison of real evaluation folders."""
import json
import math
import random

import pytest
from scipy.stats import beta, binomtest

from rdp_core.cli import main
from rdp_core.evaluation.compare import (clopper_pearson, compare, conditional_exact_interval, images_for_power,
                                         look_adjusted_p, markdown, mcnemar_p, mcnemar_power, paired_difference, planned_power)
from rdp_core.evaluation.records import RecordStore
from rdp_core.evaluation.summary import summarize, wilson_interval
from rdp_core.evaluation.vote_shares import paired_share_difference

from eval_runs import write_run, write_voted_run


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (7, 2), (12, 12), (1, 9), (30, 18), (600, 500), (2900, 3100)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_p(b, c) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k, m", [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (9, 11), (40, 70), (300, 600),
                                  (1, 2000)])
def test_clopper_pearson_is_the_beta_quantile_interval(k, m):
    low, high = clopper_pearson(k, m)
    assert low == (0.0 if k == 0 else pytest.approx(beta.ppf(0.025, k, m - k + 1), rel=1e-9))
    assert high == (1.0 if k == m else pytest.approx(beta.ppf(0.975, k + 1, m - k), rel=1e-9))


def test_the_exact_interval_excludes_zero_exactly_when_mcnemar_rejects():
    # The property that makes it worth reporting beside Newcombe's: it never contradicts the test.
    checked = 0
    for b in range(31):
        for c in range(31):
            if b + c == 0:
                continue
            low, high = conditional_exact_interval(b, c, 100)
            assert low <= b - c <= high
            if abs(mcnemar_p(b, c) - 0.05) > 1e-9:
                assert (low > 0 or high < 0) == (mcnemar_p(b, c) < 0.05), (b, c)
                checked += 1
    assert checked == 960


def test_the_exact_interval_scales_the_discordant_share_to_points_of_accuracy():
    low, high = conditional_exact_interval(9, 2, 80)
    p_low, p_high = clopper_pearson(9, 11)
    assert [low, high] == pytest.approx([100 * (2 * p_low - 1) * 11 / 80, 100 * (2 * p_high - 1) * 11 / 80])
    assert low < 0 < high and mcnemar_p(9, 2) > 0.05  # 80 images, 9 : 2: the split bench/eval/README.md discusses
    assert conditional_exact_interval(0, 0, 16) is None
    first, second = verdicts(both=5, only_first=9, only_second=2, neither=64)
    assert paired_difference(first, second)["ci95_exact"] == [low, high]


@pytest.mark.parametrize("n, p_first, p_second", [(12, 0.3, 0.05), (20, 0.1, 0.1), (25, 0.02, 0.4), (9, 0.5, 0.5),
                                                 (15, 0.2, 0.0), (10, 0.0, 0.0)])
def test_power_is_the_probability_of_a_rejected_split_summed_over_every_outcome(n, p_first, p_second):
    # Brute force over every (b, c) of n images, each judged by the exact test itself.
    expected = sum(math.comb(n, b) * math.comb(n - b, c) * p_first ** b * p_second ** c
                   * (1 - p_first - p_second) ** (n - b - c)
                   for b in range(n + 1) for c in range(n + 1 - b) if mcnemar_p(b, c) < 0.05)
    assert mcnemar_power(n, p_first, p_second) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_power_is_below_the_level_without_a_difference_and_grows_with_the_sample():
    assert mcnemar_power(3000, 0.07, 0.07) <= 0.05  # the exact test is conservative
    powers = [mcnemar_power(n, 0.1125, 0.025) for n in (80, 160, 512)]  # 9 : 2 of 80, the split of bench/eval/README.md
    assert powers[0] < powers[1] < powers[2] and powers[0] == pytest.approx(0.5, abs=0.2) and powers[2] > 0.999
    planned = planned_power(9, 2, 80, 512)
    assert planned["at_half_the_imbalance"] == pytest.approx(mcnemar_power(512, 11 / 160 + 7 / 320, 11 / 160 - 7 / 320))
    assert planned["at_half_the_imbalance"] < planned["at_observed_rates"]
    with pytest.raises(ValueError, match="at least 1"):
        planned_power(9, 2, 80, 0)
    with pytest.raises(ValueError, match="summing to at most 1"):
        mcnemar_power(10, 0.7, 0.4)


@pytest.mark.parametrize("p_first, p_second", [(0.1125, 0.025), (0.05, 0.1375), (0.05, 0.04), (0.3, 0.0)])
def test_images_for_power_is_where_the_power_crosses_the_target(p_first, p_second):
    images = images_for_power(p_first, p_second)
    assert images % 16 == 0
    assert mcnemar_power(images, p_first, p_second) >= 0.8 > mcnemar_power(images - 16, p_first, p_second)
    # Connor's (1987) normal approximation, which ignores the exact test's conservatism, needs a little less.
    discordant, imbalance = p_first + p_second, p_first - p_second
    connor = (1.959964 * math.sqrt(discordant) + 0.841621 * math.sqrt(discordant - imbalance ** 2)) ** 2 / imbalance ** 2
    assert connor - 16 <= images <= 1.3 * connor + 16


def test_images_for_power_gives_up_without_an_imbalance_and_checks_its_target():
    assert images_for_power(0.07, 0.07) is None
    assert images_for_power(0.07, 0.069, limit=2000) is None
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        images_for_power(0.1, 0.0, target=1.0)
    planned = planned_power(9, 2, 80, 512)
    assert planned["images_needed"] == {"at_observed_rates": images_for_power(9 / 80, 2 / 80),
                                        "at_half_the_imbalance": images_for_power(11 / 160 + 7 / 320, 11 / 160 - 7 / 320)}


def verdicts(both, only_first, only_second, neither):
    first = [True] * both + [True] * only_first + [False] * only_second + [False] * neither
    second = [True] * both + [False] * only_first + [True] * only_second + [False] * neither
    return first, second


def unpaired_newcombe(k1, k2, n):
    (l1, u1), (l2, u2) = wilson_interval(k1, n), wilson_interval(k2, n)
    p1, p2 = k1 / n, k2 / n
    return p1 - p2 - math.hypot(p1 - l1, u2 - p2), p1 - p2 + math.hypot(u1 - p1, p2 - l2)


def test_without_correlation_the_interval_is_newcombes_unpaired_one():
    # a d = b c: the paired verdicts are uncorrelated, and method 10 reduces to the hybrid score interval.
    first, second = verdicts(both=4, only_first=8, only_second=2, neither=4)
    result = paired_difference(first, second)
    low, high = unpaired_newcombe(12, 6, 18)
    assert result["difference"] == pytest.approx(100 * 6 / 18)
    assert result["ci95"] == pytest.approx([100 * low, 100 * high])
    assert (result["only_first"], result["only_second"], result["n"]) == (8, 2, 18)


def test_identical_verdicts_differ_by_nothing():
    first, _ = verdicts(both=10, only_first=0, only_second=0, neither=6)
    result = paired_difference(first, list(first))
    assert result["difference"] == 0 and result["mcnemar_p"] == 1.0 and result["ci95_exact"] is None
    assert result["ci95"][0] < 0 < result["ci95"][1]


def test_paired_intervals_cover_the_true_difference_and_are_narrower_than_unpaired_ones():
    # Correlated defenses (most images both right or both wrong), true difference 10 points, 40 images.
    rng = random.Random(0)
    cells = [(True, True, 0.50), (True, False, 0.15), (False, True, 0.05), (False, False, 0.30)]
    covered, paired_width, unpaired_width, trials = 0, 0.0, 0.0, 2000
    for _ in range(trials):
        draws = rng.choices([c[:2] for c in cells], weights=[c[2] for c in cells], k=40)
        first, second = [d[0] for d in draws], [d[1] for d in draws]
        low, high = paired_difference(first, second)["ci95"]
        covered += low <= 10.0 <= high
        paired_width += high - low
        u_low, u_high = unpaired_newcombe(sum(first), sum(second), 40)
        unpaired_width += 100 * (u_high - u_low)
    assert covered / trials >= 0.93
    assert paired_width < 0.8 * unpaired_width


def test_bad_verdict_lists_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference([], [])


def test_compare_pairs_the_images_both_runs_attacked(tmp_path):
    base = write_run(tmp_path / "diffpure", "diffpure", clean=[(True, True)] * 6,
                     attacked=[(True, True), (False, True), (False, False), (False, False), (True, True)])
    ours = write_run(tmp_path / "agdm", "agdm", clean=[(True, True)] * 4 + [(False, False)] * 2,
                     attacked=[(True, True), (True, True), (True, True), (False, True), (True, True),
                               (True, True)])
    result = compare([base, ours])
    (row,) = result["rows"]
    assert row["n"] == 5  # image 5 was attacked in one run only
    baseline, agdm = row["runs"]
    assert baseline["robust"]["correct"] == 2 and agdm["robust"]["correct"] == 3  # image 4: agdm's clean is wrong
    assert agdm["robust_vs_baseline"]["only_first"] == 2 and agdm["robust_vs_baseline"]["only_second"] == 1
    assert agdm["clean_vs_baseline"]["difference"] == pytest.approx(-20.0)
    majority = compare([base, ours], verdict="majority")["rows"][0]["runs"]
    assert majority[0]["robust"]["correct"] == 3 and majority[1]["robust"]["correct"] == 4


def test_runs_attacked_differently_are_not_compared(tmp_path):
    base = write_run(tmp_path / "a", "diffpure", clean=[(True, True)], attacked=[(True, True)])
    other = write_run(tmp_path / "b", "agdm", clean=[(True, True)], attacked=[(True, True)], eot=20)
    with pytest.raises(ValueError, match="eot: 4 vs 20"):
        compare([base, other])
    with pytest.raises(FileNotFoundError, match="not an rdp-core eval output folder"):
        compare([base, tmp_path / "missing"])
    elsewhere = write_run(tmp_path / "c", "agdm", clean=[(True, True)], attacked=[(True, True)], eps=0.5)
    with pytest.raises(ValueError, match="no attacked image and eps in common"):
        compare([base, elsewhere])


def test_compare_command_writes_table_json_and_png(tmp_path, capsys):
    base = write_run(tmp_path / "a", "diffpure", clean=[(True, True)] * 3, attacked=[(False, False)] * 3)
    ours = write_run(tmp_path / "b", "agdm", clean=[(True, True)] * 3, attacked=[(True, True)] * 3)
    assert main(["compare", str(base), str(ours), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    low, _ = conditional_exact_interval(3, 0, 3)
    assert "+100.00" in out and f"3 / 0, p = 0.25, [{low:+.1f}, +100.0]" in out
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    with pytest.raises(SystemExit, match="at least two"):
        main(["compare", str(base), "--out", str(tmp_path / "cmp2")])
    assert main(["compare", str(base), str(ours), "--plan-images", "20", "--out", str(tmp_path / "cmp3")]) == 0
    power = json.loads((tmp_path / "cmp3" / "comparison.json").read_text())["rows"][0]["runs"][1]
    assert power["robust_vs_baseline"]["power"]["at_observed_rates"] == pytest.approx(mcnemar_power(20, 1.0, 0.0))
    out = capsys.readouterr().out
    assert "on 20 images" in out and f"(needs {images_for_power(1.0, 0.0)} / " in out


def test_runs_of_the_same_defense_are_told_apart_by_their_folder(tmp_path):
    base = write_run(tmp_path / "diffpure", "diffpure", clean=[(True, True)] * 2, attacked=[(True, False)] * 2)
    old = write_run(tmp_path / "agdm_old", "agdm", clean=[(True, True)] * 2, attacked=[(True, True)] * 2)
    new = write_run(tmp_path / "agdm_new", "agdm", clean=[(True, True)] * 2, attacked=[(True, False)] * 2)
    table = markdown(compare([base, old, new]))
    assert "| agdm_old | agdm, t*=0.1 |" in table and "| agdm_new | agdm, t*=0.1 |" in table
    assert table.startswith("`pgd-eot` (linf, 10 iterations x 4 EOT, step 0.007), 2 purification(s) per verdict")


def test_per_purification_compares_the_share_of_right_votes_image_by_image(tmp_path, capsys):
    base = write_voted_run(tmp_path / "diffpure", "diffpure", clean=[5, 5, 4, 3], attacked=[2, 0, 3, 1])
    ours = write_voted_run(tmp_path / "agdm", "agdm", clean=[5, 4, 5, 3], attacked=[4, 0, 5, 1])
    (row,) = compare([base, ours], verdict="per purification")["rows"]
    baseline, agdm = row["runs"]
    summary = summarize(RecordStore(ours).read_all())["rows"][0]
    assert agdm["clean"]["accuracy"] == pytest.approx(summary["clean_per_vote"]) == pytest.approx(85.0)
    assert agdm["robust"]["accuracy"] == pytest.approx(summary["attacked_per_vote"]) == pytest.approx(50.0)
    assert baseline["robust"]["accuracy"] == pytest.approx(30.0)
    assert agdm["robust_vs_baseline"] == paired_share_difference([4, 0, 5, 1], [2, 0, 3, 1], 5)
    assert agdm["clean_vs_baseline"]["higher"] == 1 and agdm["clean_vs_baseline"]["lower"] == 1
    assert main(["compare", str(base), str(ours), "--verdict", "per purification", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "attacked - baseline" in out and "| 2 / 0, p = 0.5 |" in out and "sign-flip" in out


def test_per_purification_needs_votes_and_plans_nothing(tmp_path):
    base = write_voted_run(tmp_path / "a", "diffpure", clean=[5], attacked=[1])
    ours = write_voted_run(tmp_path / "b", "agdm", clean=[5], attacked=[2])
    with pytest.raises(ValueError, match="--plan-images"):
        compare([base, ours], verdict="per purification", plan_images=64)
    voteless = write_run(tmp_path / "c", "agdm", clean=[(True, True)], attacked=[(True, True)], votes=5)
    with pytest.raises(ValueError, match="needs each record's votes"):
        compare([base, voteless], verdict="per purification")


def brute_force_look_adjusted_p(first, second, looks):
    """Every assignment of sides to the discordant images, each equally likely under equal defenses."""
    discordant = [i for i, (f, s) in enumerate(zip(first, second)) if f != s]

    def smallest_p(first_only):
        return min(mcnemar_p(sum(i in first_only for i in discordant if i < k),
                             sum(i not in first_only for i in discordant if i < k)) for k in looks)

    observed = smallest_p({i for i in discordant if first[i]})
    outcomes = [smallest_p({i for bit, i in enumerate(discordant) if mask >> bit & 1})
                for mask in range(2 ** len(discordant))]
    return sum(p <= observed * (1 + 1e-9) for p in outcomes) / len(outcomes)


@pytest.mark.parametrize("seed", range(6))
def test_the_look_adjusted_p_is_the_share_of_sign_assignments_that_look_as_extreme(seed):
    rng = random.Random(seed)
    first = [rng.random() < 0.6 for _ in range(40)]
    second = [f if rng.random() < 0.7 else rng.random() < 0.35 for f in first]
    looks = sorted(rng.sample(range(5, 40), 3))
    adjusted = look_adjusted_p(first, second, looks)
    assert adjusted["looks"] == looks + [40]
    assert adjusted["adjusted_p"] == pytest.approx(brute_force_look_adjusted_p(first, second, looks + [40]))
    # One look is the plain test; more looks can only raise it, and never beyond Bonferroni's bound.
    single = look_adjusted_p(first, second, [40])
    assert single["adjusted_p"] == pytest.approx(mcnemar_p(*[sum(x and not y for x, y in zip(a, b))
                                                             for a, b in ((first, second), (second, first))]))
    smallest = min(adjusted["mcnemar_p"])
    assert smallest * (1 - 1e-9) <= adjusted["adjusted_p"] <= min(1.0, 4 * smallest) + 1e-12


def test_looks_must_be_counts_of_the_images_compared():
    first, second = [True, False, True], [False, False, True]
    for looks in ([0], [4]):
        with pytest.raises(ValueError, match="looks must be image counts from 1 to the 3 images"):
            look_adjusted_p(first, second, looks)


def test_compare_command_adjusts_for_looks(tmp_path, capsys):
    base = write_run(tmp_path / "a", "diffpure", clean=[(True, True)] * 8, attacked=[(False, False)] * 8)
    ours = write_run(tmp_path / "b", "agdm", clean=[(True, True)] * 8, attacked=[(True, True)] * 8)
    assert main(["compare", str(base), str(ours), "--looks", "4,6", "--out", str(tmp_path / "cmp")]) == 0
    looks = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"][0]["runs"][1]
    assert looks["robust_vs_baseline"]["looks"]["mcnemar_p"] == [0.125, 0.03125, 0.0078125]
    # Every sign assignment reaching p <= 1/128 at 8 images is the all-first one and its mirror.
    assert looks["robust_vs_baseline"]["looks"]["adjusted_p"] == pytest.approx(2 / 256)
    assert "on the first 4, 6, 8 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", str(base), str(ours), "--looks", "4,six", "--out", str(tmp_path / "cmp2")])
    with pytest.raises(ValueError, match="--looks"):
        compare([write_voted_run(tmp_path / "c", "diffpure", clean=[5], attacked=[1]),
                 write_voted_run(tmp_path / "d", "agdm", clean=[5], attacked=[2])], verdict="per purification",
                looks=[1])
