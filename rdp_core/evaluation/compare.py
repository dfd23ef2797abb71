"""Defenses compared on the same images: paired differences in clean and robust accuracy.

Evaluations of one attack on the same test images (rdp-core eval output folders) say, per image, whether
each defense was right. Two accuracies measured on the same images differ by (b - c) / n, b the images only
the first defense gets right and c those only the second gets right; the images both get right or both miss
cancel, so the difference is much better determined than the two separate intervals suggest. Its 95%
interval is Newcombe's (1998, method 10: Wilson intervals of the two accuracies combined with their
correlation), and the exact McNemar test gives the probability of a split of the discordant images at
least as uneven as b : c if the defenses were equally good.

The two can disagree at the edge (Newcombe's interval is approximate), so an exact interval consistent with
the test is reported too: given the m = b + c discordant images, b is binomial(m, pi); the Clopper-Pearson
interval of pi, mapped through (2 pi - 1) m / n, is the conditional exact interval of the difference. It
excludes 0 exactly when the McNemar p is below 0.05; being conditional on m it says nothing of how many images
are discordant, so it is the one to read for "is the difference real", Newcombe's for "how large".

For planning the next run, `plan_images` adds the power of that exact test on a larger sample: the
probability that it rejects at 5% on N images if each image is discordant either way at the rates observed
here, and again with the observed imbalance halved. The observed rates are estimates, and the imbalance of a
comparison that caught the eye overestimates the true one (the winner's curse), hence the second figure. It
also gives, at both, how many images (in steps of 16, the evaluator's batch) the test needs for 80% power.

A comparison looked at repeatedly as a run grows (16 images, then 32, ...) with no stopping rule fixed in
advance gets more chances to cross 0.05 by luck than one test has. `looks` lists the image counts at which it
was read; `look_adjusted_p` is then the probability, if the defenses were equally good, that the smallest
McNemar p over those looks is at most the smallest one observed: exact, by summing over every split of the
discordant images look by look, and conditional (like the test itself) on which images are discordant.
Bonferroni's bound, the looks times the smallest p, is far larger, the looks sharing most of their images.

The verdicts are the evaluator's: an image counts as robust when every purification of its clean and of its
attacked version is right ("all votes"), or under a majority vote. The third way, "per purification", keeps
every vote: per image the share of its purifications that are right, clean and attacked, compared with the
paired t interval and the exact sign-flip test of vote_shares (robust accuracy there is the accuracy of one
purification of the attacked image, as DiffPure reports it).
"""
import functools
import json
import math
from pathlib import Path

from rdp_core.evaluation.records import CONFIG_FILE, RecordStore
from rdp_core.evaluation.summary import (Z_95, accuracy_entry, attack_text, by_kind, eps_text, right_votes,
                                        sign_test_p, wilson_interval)
from rdp_core.evaluation.vote_shares import paired_share_difference, share_entry

BOOLEAN_VERDICTS = {"all votes": "correct_all", "majority": "correct_majority"}
PER_PURIFICATION = "per purification"
VERDICTS = (*BOOLEAN_VERDICTS, PER_PURIFICATION)
# Sample-size planning: the conventional 80% power, in whole batches of the evaluator, up to what a GPU could run.
TARGET_POWER, IMAGE_STEP, IMAGE_LIMIT = 0.8, 16, 10_000
# Settings that must agree for two runs to be compared image by image (the defense's own settings may differ).
SAME_ATTACK = ("attack", "norm", "iterations", "eot", "step_size", "votes", "seed", "classifier", "square_queries",
               "attacks")  # "attacks": those a worst case over attacks (worst_case.py) was made of


def load_run(out_dir):
    """(config, {eps: {index: (clean record, attacked record)}}) of one evaluation folder."""
    out_dir = Path(out_dir)
    config_path = out_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an rdp-core eval output folder: no {CONFIG_FILE}")
    config = json.loads(config_path.read_text())
    table = by_kind(RecordStore(out_dir).read_all())
    clean = table["clean"][0.0]
    pairs = {eps: {i: (clean[i], attacked[i]) for i in attacked if i in clean}
             for eps, attacked in table["attack"].items()}
    if not any(pairs.values()):
        raise ValueError(f"{out_dir} holds no attacked images with a clean verdict: nothing to compare")
    return config, pairs


def paired_difference(first, second, z=Z_95, plan_images=None, looks=None):
    """Accuracy of `first` minus that of `second` (booleans per image, same images, same order), in points,
    with Newcombe's interval, the exact two-sided McNemar p-value and the conditional exact interval; with
    `plan_images`, the power of the test on that many images at the observed discordance; with `looks`, the
    McNemar p adjusted for having been read on the first `looks[i]` images too (see above)."""
    if len(first) != len(second) or not first:
        raise ValueError("paired_difference needs two equally long, non-empty lists of verdicts")
    n = len(first)
    both = sum(f and s for f, s in zip(first, second))
    only_first = sum(f and not s for f, s in zip(first, second))
    only_second = sum(s and not f for f, s in zip(first, second))
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_first, n, z), wilson_interval(both + only_second, n, z)
    phi = _continuity_corrected_phi(both, only_first, only_second, neither)
    delta = p1 - p2
    lower = delta - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = delta + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    difference = {"difference": 100.0 * delta, "ci95": [100.0 * max(lower, -1.0), 100.0 * min(upper, 1.0)],
                  "only_first": only_first, "only_second": only_second, "n": n,
                  "mcnemar_p": mcnemar_p(only_first, only_second),
                  "ci95_exact": conditional_exact_interval(only_first, only_second, n)}
    if plan_images is not None:
        difference["power"] = planned_power(only_first, only_second, n, plan_images)
    if looks is not None:
        difference["looks"] = look_adjusted_p(first, second, looks)
    return difference


def look_adjusted_p(first, second, looks):
    """{"looks", "mcnemar_p" per look, "adjusted_p"}: the exact McNemar test of `first` against `second` read on
    their first k verdicts for each k in `looks` (and on all of them), adjusted for the repeated looks: the
    probability under equal defenses, given which images are discordant, that some look's p is as small as
    the smallest observed."""
    n = len(first)
    looks = sorted(set(looks) | {n})
    if looks[0] < 1 or looks[-1] > n:
        raise ValueError(f"looks must be image counts from 1 to the {n} images compared, got {looks}")
    discordant = [f != s for f, s in zip(first, second)]
    splits = [(sum(f and not s for f, s in zip(first[:k], second[:k])), sum(discordant[:k])) for k in looks]
    p_values = [mcnemar_p(b, m - b) for b, m in splits]
    smallest = min(p_values) * (1 + 1e-9)  # the same p recomputed must count as reached
    # Probability mass of the number of first-only images among the discordant ones so far, over the paths
    # that have not yet reached `smallest`; the discordant images' sides are fair coins under equal defenses.
    alive, seen = {0: 1.0}, 0
    for _, m in splits:
        alive = _add_fair_coins(alive, m - seen)
        alive = {b: mass for b, mass in alive.items() if mcnemar_p(b, m - b) > smallest}
        seen = m
    return {"looks": looks, "mcnemar_p": p_values, "adjusted_p": min(1.0, 1.0 - sum(alive.values()))}


def _add_fair_coins(mass_by_count, coins):
    """The distribution of a count after `coins` more fair coin flips each add 1 with probability 1/2."""
    result = {}
    for count, mass in mass_by_count.items():
        for heads in range(coins + 1):
            result[count + heads] = result.get(count + heads, 0.0) + mass * _binomial_pmf(heads, coins, 0.5)
    return result


def planned_power(b, c, n, images, alpha=0.05, target=TARGET_POWER):
    """The power of the exact McNemar test at level `alpha` on `images` images when b and c of n were
    discordant, and the images it needs for `target` power: at the observed rates, and with the same
    discordance but half the imbalance."""
    if images < 1:
        raise ValueError(f"the planned number of images must be at least 1, got {images}")
    discordant, half_imbalance = (b + c) / n, (b - c) / (2 * n)
    rates = {"at_observed_rates": (b / n, c / n),
             "at_half_the_imbalance": ((discordant + half_imbalance) / 2, (discordant - half_imbalance) / 2)}
    return {"images": images, "alpha": alpha,
            **{name: mcnemar_power(images, *pair, alpha) for name, pair in rates.items()},
            "target": target, "images_needed": {name: images_for_power(*pair, target, alpha)
                                                for name, pair in rates.items()}}


def images_for_power(p_first, p_second, target=TARGET_POWER, alpha=0.05, step=IMAGE_STEP, limit=IMAGE_LIMIT):
    """A number of images, a multiple of `step`, at which the exact McNemar test's power at these discordance
    rates reaches `target` while `step` fewer images fall short, or None if `limit` images fall short (no
    imbalance, or too little). Found by doubling and bisection; the exact test's power rises with ripples (its
    discreteness), so a smaller count may also reach the target: read it as where the power curve crosses."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target power must lie strictly between 0 and 1, got {target}")

    def reached(units):
        return mcnemar_power(units * step, p_first, p_second, alpha) >= target

    failed, passed = 0, 1
    while not reached(passed):
        if passed * step >= limit:
            return None
        failed, passed = passed, min(2 * passed, -(-limit // step))
    return _first_true(reached, failed, passed) * step


def mcnemar_power(n, p_first, p_second, alpha=0.05):
    """The probability that the exact two-sided McNemar test rejects at `alpha` (p < alpha, as mcnemar_p
    computes it) on n images, each right only for the first defense with probability p_first and only for the
    second with probability p_second: the sum over the number m of discordant images, binomial(n, p_first +
    p_second), of the binomial(m, p_first / (p_first + p_second)) probability of a rejected split."""
    if not (0.0 <= p_first and 0.0 <= p_second and p_first + p_second <= 1.0):
        raise ValueError(f"discordance rates must be probabilities summing to at most 1, got {p_first}, {p_second}")
    discordant = p_first + p_second
    if discordant == 0.0:
        return 0.0
    share = p_first / discordant
    power = 0.0
    for m in range(n + 1):
        weight = _binomial_pmf(m, n, discordant)
        # Terms below 1e-17 cannot move the sum of at most n + 1 probabilities at float precision.
        if weight > 1e-17:
            power += weight * _rejection_probability(m, share, alpha)
    return min(power, 1.0)


def _rejection_probability(m, share, alpha):
    """P(the split b : m - b is rejected) for b ~ binomial(m, share): the test rejects b <= k or b >= m - k."""
    k = _mcnemar_critical_count(m, alpha)
    if k < 0:
        return 0.0
    return _binomial_cdf(k, m, share) + _binomial_cdf(k, m, 1.0 - share)


@functools.lru_cache(maxsize=None)
def _mcnemar_critical_count(m, alpha):
    """The largest k for which the split k : m - k has an exact McNemar p below alpha (-1 if none has)."""
    # mcnemar_p(k, m - k) rises with k up to m / 2: bisect for the first k that is kept, with the test's own
    # exact arithmetic so that power and test cannot disagree at the boundary.
    return _first_true(lambda k: mcnemar_p(k, m - k) >= alpha, -1, m // 2 + 1) - 1


def _first_true(holds, low, high):
    """An integer in (low, high] at which `holds` is true and one less is not, for a predicate false at low and
    true at high (neither end is evaluated); the smallest at which it holds if it changes only once."""
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if holds(middle) else (middle, high)
    return high


def _binomial_pmf(j, m, pi):
    """P(X = j) for X ~ binomial(m, pi), in log space so that large m cannot overflow."""
    if pi in (0.0, 1.0):
        return float(j == (m if pi == 1.0 else 0))
    return math.exp(math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1)
                    + j * math.log(pi) + (m - j) * math.log1p(-pi))


def _continuity_corrected_phi(a, b, c, d):
    """The correlation of the paired verdicts as Newcombe's method 10 uses it (0 where a margin is empty)."""
    denominator = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    if denominator == 0:
        return 0.0
    numerator = a * d - b * c
    if numerator > 0:
        numerator = max(numerator - (a + b + c + d) / 2, 0.0)
    return numerator / denominator


def mcnemar_p(b, c):
    """Exact two-sided McNemar p-value: the binomial(b + c, 1/2) probability of a split as uneven as b : c."""
    m = b + c
    if m == 0:
        return 1.0
    # By symmetry at 1/2 the tail below min(b, c) is the evaluator's one-sided sign test above max(b, c).
    return min(1.0, 2.0 * sign_test_p(max(b, c), min(b, c)))


def conditional_exact_interval(b, c, n, level=0.95):
    """The exact interval, in points, of (b - c) / n given b + c: Clopper-Pearson's interval of the share b of
    the b + c discordant images, mapped through (2 pi - 1)(b + c) / n. None when no image is discordant: the
    conditional interval would be [0, 0], which reads as a certainty that the test cannot give."""
    m = b + c
    if m == 0:
        return None
    low, high = clopper_pearson(b, m, level)
    return [100.0 * (2 * low - 1) * m / n, 100.0 * (2 * high - 1) * m / n]


def clopper_pearson(k, m, level=0.95):
    """(low, high): the exact interval of a binomial proportion from k successes in m trials, each bound the
    pi at which the tail beyond k holds (1 - level) / 2, found by bisection on the binomial tail."""
    alpha = (1.0 - level) / 2
    # P(X >= k; pi) rises with pi, P(X <= k; pi) falls.
    low = 0.0 if k == 0 else _bisect(lambda pi: 1.0 - _binomial_cdf(k - 1, m, pi) - alpha)
    high = 1.0 if k == m else _bisect(lambda pi: alpha - _binomial_cdf(k, m, pi))
    return low, high


def _binomial_cdf(k, m, pi):
    """P(X <= k) for X ~ binomial(m, pi)."""
    return sum(_binomial_pmf(j, m, pi) for j in range(k + 1))


def _bisect(increasing, iterations=60):
    """The root in (0, 1) of a function that rises from negative to positive across it."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if increasing(middle) < 0:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def compare(out_dirs, verdict="all votes", plan_images=None, looks=None):
    """The comparison of the evaluations in `out_dirs` (the first is the baseline) on the images all of them
    attacked: per run its accuracies, per later run its paired differences from the baseline (with the power
    of McNemar's test on `plan_images` images, and its p adjusted for `looks`, if given)."""
    if len(out_dirs) < 2:
        raise ValueError("compare needs at least two evaluation folders")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {sorted(VERDICTS)}, got {verdict!r}")
    mcnemar_only = {"planning images (--plan-images)": plan_images, "adjusting for looks (--looks)": looks}
    for option, value in mcnemar_only.items():
        if verdict == PER_PURIFICATION and value is not None:
            raise ValueError(f"{option} is for McNemar's test of the 'all votes' and 'majority' verdicts, "
                             "not for the per-purification comparison")
    runs = [(str(d), *load_run(d)) for d in out_dirs]
    _check_same_attack(runs)
    per_image, entry, paired = _measure(verdict, runs[0][1].get("votes"), plan_images, looks)
    rows = []
    for eps in sorted(set.intersection(*(set(pairs) for _, _, pairs in runs)), key=float):
        images = sorted(set.intersection(*(set(pairs[eps]) for _, _, pairs in runs)))
        if not images:
            continue
        verdicts = [per_image(pairs[eps], images) for _, _, pairs in runs]
        base_clean, base_robust = verdicts[0]
        rows.append({"eps": eps, "n": len(images), "runs": [
            {"out_dir": name, "defense": _defense_name(config), "clean": entry(clean), "robust": entry(robust),
             **({} if index == 0 else {"clean_vs_baseline": paired(clean, base_clean),
                                       "robust_vs_baseline": paired(robust, base_robust)})}
            for index, ((name, config, _), (clean, robust)) in enumerate(zip(runs, verdicts))]})
    if not rows:
        raise ValueError(f"the runs {list(map(str, out_dirs))} have no attacked image and eps in common")
    return {"verdict": verdict, "attack": {k: runs[0][1].get(k) for k in SAME_ATTACK}, "rows": rows}


def _measure(verdict, votes, plan_images, looks):
    """How the verdict reads a run: (its clean and robust values per image, a run's accuracy entry, the paired
    difference of two runs)."""
    if verdict == PER_PURIFICATION:
        return (_right_votes, lambda counts: share_entry(counts, votes),
                lambda first, second: paired_share_difference(first, second, votes))
    key = BOOLEAN_VERDICTS[verdict]
    return (lambda pairs, images: _verdicts(pairs, images, key), accuracy_entry,
            lambda first, second: paired_difference(first, second, plan_images=plan_images, looks=looks))


def _right_votes(pairs, images):
    """Right purifications per image, of the clean and of the attacked image (not conditioned on the clean)."""
    if any("votes" not in pairs[i][k] for i in images for k in (0, 1)):
        raise ValueError("the per-purification comparison needs each record's votes, and these records have none")
    return [right_votes(pairs[i][0]) for i in images], [right_votes(pairs[i][1]) for i in images]


def _verdicts(pairs, images, key):
    clean = [pairs[i][0][key] for i in images]
    robust = [pairs[i][0][key] and pairs[i][1][key] for i in images]
    return clean, robust


def _check_same_attack(runs):
    check_same_settings(runs, SAME_ATTACK, "{name} was not attacked as {first} was ({details}): its verdicts are "
                        "not comparable image by image")


def check_same_settings(runs, keys, refusal):
    """Raises ValueError, `refusal` formatted with the run's name, the first run's and the settings that differ,
    where a run of `runs` ((name, config, ...) each) differs from the first in one of `keys`."""
    (first_name, first, *_), *others = runs
    for name, config, *_ in others:
        differing = [k for k in keys if config.get(k) != first.get(k)]
        if differing:
            details = ", ".join(f"{k}: {first.get(k)!r} vs {config.get(k)!r}" for k in differing)
            raise ValueError(refusal.format(name=name, first=first_name, details=details))


def _defense_name(config):
    options = config.get("guidance_options") or {}
    details = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    name = config["defense"] + (f" ({details})" if details else "")
    return name if config["defense"] == "none" else f"{name}, t*={config.get('t_star')}"


def markdown(comparison):
    attack = comparison["attack"]
    shares = comparison["verdict"] == PER_PURIFICATION
    robust = "attacked" if shares else "robust"
    method = ("Student's t 95% interval of the per-image differences of the share of right purifications "
              "(runs: Wilson's interval at the mean share); the last column counts the images with more / fewer "
              "right purifications than the baseline, with the exact sign-flip p" if shares else
              "Newcombe's 95% interval; the last column adds the exact McNemar p and the conditional exact 95% "
              "interval, which excludes 0 exactly when p < 0.05")
    last = ("attacked: more / fewer right than baseline, sign-flip p" if shares else
            "robust: only this / only baseline, p, exact interval")
    lines = [f"{attack_text(attack)}, {attack['votes']} purification(s) per verdict, "
             f"verdict: {comparison['verdict']}; differences are paired (same images) against the first row, "
             f"with {method}.", ""]
    for row in comparison["rows"]:
        lines += [f"eps {eps_text(row['eps'], attack['norm'])}, {row['n']} images:", "",
                  f"| run | defense | clean | {robust} | clean - baseline | {robust} - baseline | {last} |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for run in row["runs"]:
            cells = [_run_name(run), run["defense"], _entry(run["clean"]), _entry(run["robust"])]
            if "robust_vs_baseline" in run:
                clean_d, robust_d = run["clean_vs_baseline"], run["robust_vs_baseline"]
                cells += [_difference(clean_d), _difference(robust_d),
                          _discordance(robust_d)]
            else:
                cells += ["(baseline)", "(baseline)", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + _power_lines(row) + _look_lines(row)
    return "\n".join(lines)


def _power_lines(row):
    planned = [run for run in row["runs"] if "power" in run.get("robust_vs_baseline", {})]
    if not planned:
        return []
    power = planned[0]["robust_vs_baseline"]["power"]
    lines = [f"Planning: the probability that the exact McNemar test rejects at {power['alpha']:g} on "
             f"{power['images']} images, and the images it needs for {power['target']:.0%} power, at the "
             "discordance rates observed here / with half the observed imbalance:", ""]
    for run in planned:
        clean, robust = run["clean_vs_baseline"]["power"], run["robust_vs_baseline"]["power"]
        lines.append(f"- {_run_name(run)}: robust {_power_text(robust)}; clean {_power_text(clean)}")
    return lines + [""]


def _look_lines(row):
    looked = [run for run in row["runs"] if "looks" in run.get("robust_vs_baseline", {})]
    if not looked:
        return []
    counts = ", ".join(map(str, looked[0]["robust_vs_baseline"]["looks"]["looks"]))
    lines = [f"Repeated looks: the exact McNemar p on the first {counts} images, and the probability under equal "
             "defenses that some look's p is as small as the smallest here (the look-adjusted p):", ""]
    for run in looked:
        lines.append(f"- {_run_name(run)}: robust {_look_text(run['robust_vs_baseline']['looks'])}; "
                     f"clean {_look_text(run['clean_vs_baseline']['looks'])}")
    return lines + [""]


def _look_text(looks):
    return f"p {', '.join(f'{p:.3g}' for p in looks['mcnemar_p'])}; adjusted {looks['adjusted_p']:.3g}"


def _power_text(power):
    needed = power["images_needed"]
    return (f"{power['at_observed_rates']:.2f} / {power['at_half_the_imbalance']:.2f} "
            f"(needs {_images_text(needed['at_observed_rates'])} / {_images_text(needed['at_half_the_imbalance'])})")


def _images_text(images):
    return f"over {IMAGE_LIMIT:,}" if images is None else f"{images:,}"


def _run_name(run):
    # The run's folder tells apart runs whose configurations agree (the same defense made by different code).
    return Path(run["out_dir"]).name


def _entry(entry):
    return f"{entry['accuracy']:.2f}% [{entry['ci95'][0]:.1f}, {entry['ci95'][1]:.1f}]"


def _difference(d):
    interval = "(no spread)" if d["ci95"] is None else _interval(d["ci95"])
    return f"{d['difference']:+.2f} {interval}"


def _discordance(d):
    if "sign_flip_p" in d:
        return f"{d['higher']} / {d['lower']}, p = {d['sign_flip_p']:.3g}"
    exact = "no image differs" if d["ci95_exact"] is None else _interval(d["ci95_exact"])
    return f"{d['only_first']} / {d['only_second']}, p = {d['mcnemar_p']:.3g}, {exact}"


def _interval(bounds):
    return f"[{bounds[0]:+.1f}, {bounds[1]:+.1f}]"


def plot(comparison, path):
    """PNG: clean and robust accuracy per defense with 95% intervals, one panel per eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(1.6 + 1.9 * len(rows[0]["runs"]), 3.6), dpi=120, squeeze=False)
    for ax, row in zip(axes[0], rows):
        names = [_run_name(run) for run in row["runs"]]
        for offset, kind in ((-0.2, "clean"), (0.2, "robust")):
            label = "attacked" if kind == "robust" and comparison["verdict"] == PER_PURIFICATION else kind
            values = [run[kind]["accuracy"] for run in row["runs"]]
            errors = [[v - run[kind]["ci95"][0] for v, run in zip(values, row["runs"])],
                      [run[kind]["ci95"][1] - v for v, run in zip(values, row["runs"])]]
            ax.bar([i + offset for i in range(len(values))], values, width=0.4, yerr=errors, capsize=3, label=label)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"eps {eps_text(row['eps'], comparison['attack']['norm'])}, {row['n']} images", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(out_dirs, out, verdict="all votes", plan_images=None, looks=None):
    """compare() written to `out` as comparison.json, comparison.md and comparison.png; returns the dict."""
    comparison = compare(out_dirs, verdict, plan_images, looks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    (out / "comparison.md").write_text(markdown(comparison))
    plot(comparison, out / "comparison.png")
    return comparison
