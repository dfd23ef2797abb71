"""From records to the figures people report: accuracies with confidence intervals and the sanity checks.

Robust accuracy at eps counts an image as robust when the defense is right on every one of its N
purifications of the clean image and of the attack's adversarial image (the attacker may always submit the
clean image; its verdict is part of the ball). The majority-vote figure (right by the most frequent of the
N predictions) stands beside it, and so does the accuracy of single purifications (the mean over images
and votes), the figure DiffPure-style papers report. Intervals are 95% Wilson score intervals; for single
purifications, Wilson's interval of n images at the mean share, which is conservative (vote_shares explains
why, and `rdp-core compare --verdict "per purification"` compares defenses on it).

The sanity checks flag what gradient masking looks like (Athalye et al. 2018; Carlini et al. 2019):
  undefended:  the bare classifier must fall to about 0 under PGD at the reference eps (8/255 or 0.5);
  unbounded:   an l_2 attack without a bound must drive the defense to about 0;
               (both by majority vote, over the images the model had right before the attack)
  eps:         the attacked accuracy must not rise significantly from one eps to a larger one;
  iterations:  the share of EOT forwards still right must not rise significantly from a quarter of the
               PGD iterations to the last.
  attacked:    the images counted robust (by majority vote) at an eps above 0 must have been attacked: at
               most `about_zero` of them may have an adversarial image equal to the clean one (an attack that
               skips images, or hands back the clean image where it failed, leaves its verdicts to chance).
"Significantly" is an exact one-sided sign test at 5% over the images that changed (for eps: became right
against became wrong; for iterations: rose against fell), exact because these counts are small, where a
normal approximation flags rises like 3 to 0 (p = 0.125). "About 0" is at most `about_zero` (5%) of the
images. By majority vote, an image is right only when its label has more votes than any other class: a tie
counts as wrong, whatever the class indices.
"""
import math
from collections import defaultdict

Z_95 = 1.959964
SIGNIFICANCE = 0.05
ABOUT_ZERO = 0.05


def sign_test_p(rose, fell):
    """One-sided exact sign test: the probability of at least `rose` rises among rose + fell changes that are
    equally likely to go either way."""
    changed = rose + fell
    # Each coefficient from the last, C(n, k + 1) = C(n, k) (n - k) / (k + 1): one product a term, not k.
    term, total = math.comb(changed, rose), 0
    for k in range(rose, changed + 1):
        total += term
        term = term * (changed - k) // (k + 1)
    return total / 2 ** changed


def wilson_interval(successes, n, z=Z_95):
    """(low, high) of the Wilson score interval for a binomial proportion, in [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_entry(flags):
    n, k = len(flags), sum(flags)
    low, high = wilson_interval(k, n)
    return {"accuracy": 100.0 * k / n if n else float("nan"), "correct": k, "n": n,
            "ci95": [100.0 * low, 100.0 * high]}


def by_kind(records):
    """{kind: {eps: {index: record}}}."""
    table = defaultdict(lambda: defaultdict(dict))
    for r in records:
        table[r["kind"]][r["eps"]][r["index"]] = r
    return table


def summarize(records, norm="linf", about_zero=ABOUT_ZERO):
    """The summary dict: per-eps accuracies (all-votes and majority), the undefended row and the checks."""
    table = by_kind(records)
    clean = table["clean"][0.0]
    rows = []
    for eps in sorted(table["attack"], key=float):
        attacked = table["attack"][eps]
        images = sorted(set(attacked) & set(clean))
        clean_shares = [vote_share(clean[i]) for i in images]
        attacked_shares = [vote_share(attacked[i]) for i in images]
        rows.append({
            "eps": eps,
            "clean": accuracy_entry([clean[i]["correct_all"] for i in images]),
            "robust": accuracy_entry([clean[i]["correct_all"] and attacked[i]["correct_all"] for i in images]),
            "clean_majority": accuracy_entry([clean[i]["correct_majority"] for i in images]),
            "robust_majority": accuracy_entry([clean[i]["correct_majority"] and attacked[i]["correct_majority"]
                                               for i in images]),
            # One purification per verdict, as DiffPure-style papers report it: the mean over images and votes.
            "clean_per_vote": 100.0 * _mean(clean_shares),
            "attacked_per_vote": 100.0 * _mean(attacked_shares),
            "clean_per_vote_ci95": mean_share_ci95(clean_shares),
            "attacked_per_vote_ci95": mean_share_ci95(attacked_shares),
            "mean_linf": _mean([attacked[i]["linf"] for i in images]),
            "mean_l2": _mean([attacked[i]["l2"] for i in images]),
        })
    return {"n_images": len(clean), "clean": accuracy_entry([r["correct_all"] for r in clean.values()]),
            "clean_majority": accuracy_entry([r["correct_majority"] for r in clean.values()]),
            "rows": rows, "undefended": _undefended_rows(table),
            "sanity": sanity_checks(table, norm, about_zero)}


def _undefended_rows(table):
    return [{"eps": eps, "robust": accuracy_entry([r["correct_all"] for r in table["undefended"][eps].values()])}
            for eps in sorted(table["undefended"], key=float)]


def sanity_checks(table, norm, about_zero=ABOUT_ZERO):
    clean = table["clean"][0.0]
    return [_about_zero_check("undefended", "undefended classifier under PGD at the reference eps falls to about 0",
                              table["undefended"], clean, about_zero),
            _about_zero_check("unbounded", "unbounded l2 attack drives the defense to about 0",
                              table["unbounded-l2"], clean, about_zero),
            _eps_check(table, norm), _iterations_check(table), _attacked_check(table, about_zero)]


def _about_zero_check(name, claim, by_eps, clean, about_zero):
    """Share of the images the model had right without attack that the attack left right, by majority vote
    both times: the strict reading for these checks (all-votes verdicts would pass them more easily)."""
    flags = [r["correct_majority"] for records in by_eps.values() for i, r in records.items()
             if r.get("clean_correct", clean.get(i, {}).get("correct_majority"))]
    if not by_eps:
        return _check(name, claim, None, "not run")
    if not flags:
        return _check(name, claim, None, "no image was right before the attack")
    accuracy = sum(flags) / len(flags)
    return _check(name, claim, accuracy <= about_zero,
                  f"{sum(flags)} of the {len(flags)} images right before the attack stayed right "
                  f"({100 * accuracy:.1f}%, limit {100 * about_zero:.0f}%)")


def _eps_check(table, norm):
    claim = "attacked accuracy does not rise with eps"
    clean = table["clean"][0.0]
    ladder = [(0.0, clean)] + [(eps, table["attack"][eps]) for eps in sorted(table["attack"], key=float)]
    if len(ladder) < 2:
        return _check("eps", claim, None, "needs at least one attacked eps")
    findings = []
    for (eps_lo, lo), (eps_hi, hi) in zip(ladder, ladder[1:]):
        images = set(lo) & set(hi)
        rose = sum(hi[i]["correct_all"] and not lo[i]["correct_all"] for i in images)
        fell = sum(lo[i]["correct_all"] and not hi[i]["correct_all"] for i in images)
        significant = sign_test_p(rose, fell) <= SIGNIFICANCE
        findings.append((eps_lo, eps_hi, rose, fell, significant))
    failed = [f for f in findings if f[4]]
    worst = failed[0] if failed else max(findings, key=lambda f: f[2] - f[3])
    detail = (f"from eps {eps_text(worst[0], norm)} to {eps_text(worst[1], norm)}: {worst[2]} images became right, "
              f"{worst[3]} became wrong"
              + (" (significant rise)" if failed else " (largest change; no significant rise)"))
    return _check("eps", claim, not failed, detail)


def _iterations_check(table):
    claim = "more PGD iterations do not help the defense"
    changes = []
    for records in table["attack"].values():
        for r in records.values():
            trace = r.get("correct_fraction")
            if trace and len(trace) >= 4:
                changes.append(trace[-1] - trace[len(trace) // 4 - 1])
    if len(changes) < 2:
        return _check("iterations", claim, None, "needs PGD traces of at least 4 iterations on 2 images")
    mean = sum(changes) / len(changes)
    rose, fell = sum(c > 0 for c in changes), sum(c < 0 for c in changes)
    significant = sign_test_p(rose, fell) <= SIGNIFICANCE
    return _check("iterations", claim, not significant,
                  f"share of EOT forwards right changed by {100 * mean:+.1f} points from 1/4 of the iterations "
                  f"to the last ({len(changes)} image-eps pairs: {rose} rose, {fell} fell)")


def _attacked_check(table, about_zero):
    claim = "every image counted robust was attacked"
    clean = table["clean"][0.0]
    robust = [r for eps, records in table["attack"].items() if float(eps) > 0 for i, r in records.items()
              if r["correct_majority"] and clean.get(i, {}).get("correct_majority")]
    if not robust:
        return _check("attacked", claim, None, "no image counted robust at an eps above 0")
    unperturbed = sum(r["linf"] == 0 for r in robust)
    return _check("attacked", claim, unperturbed <= about_zero * len(robust),
                  f"{unperturbed} of the {len(robust)} image-eps pairs counted robust by majority vote had an "
                  f"adversarial image equal to the clean one (limit {100 * about_zero:.0f}%)")


def _check(name, claim, passed, detail):
    return {"name": name, "claim": claim, "passed": passed, "detail": detail,
            "status": "not run" if passed is None else ("pass" if passed else "FAIL")}


def right_votes(record):
    """How many of the record's purifications predicted its label."""
    return sum(v == record["label"] for v in record["votes"])


def vote_share(record):
    """The fraction of the record's purifications that predicted its label."""
    return right_votes(record) / len(record["votes"])


def mean_share_ci95(shares):
    """Wilson's 95% interval, in percent, of len(shares) images at their mean share of right purifications."""
    low, high = wilson_interval(sum(shares), len(shares))
    return [100.0 * low, 100.0 * high]


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def markdown(summary, config):
    """A markdown report: the configuration line, the accuracy table and the sanity checks."""
    votes = config.get("votes", 1)
    guidance = config.get("guidance_options")
    defense = f"`{config['defense']}`" + (f" ({', '.join(f'{k}={v}' for k, v in sorted(guidance.items()))})" if guidance else "")
    lines = [f"defense {defense}, attack {attack_text(config)}, "
             f"{summary['n_images']} CIFAR-10 test images, {votes} purification(s) per verdict",
             "", f"| eps | clean (all {votes}) | robust (all {votes}) | clean (majority) | robust (majority) | "
             "per purification: clean / attacked | n |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        cells = [_cell(row[k]) for k in ("clean", "robust", "clean_majority", "robust_majority")]
        cells.append(" / ".join(_per_vote_cell(row, part) for part in ("clean", "attacked")))
        lines.append(f"| {eps_text(row['eps'], config['norm'])} | " + " | ".join(cells) + f" | {row['robust']['n']} |")
    for row in summary["undefended"]:
        lines.append(f"\nundefended classifier, PGD at eps {eps_text(row['eps'], config['norm'])}: "
                     f"{_cell(row['robust'])} robust ({row['robust']['n']} images)")
    lines += ["", "| sanity check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['claim']} | {c['status']} | {c['detail']} |" for c in summary["sanity"]]
    return "\n".join(lines) + "\n"


def attack_text(config):
    """The attack as the reports name it: `pgd-eot` (l2, 10 iterations x 4 EOT, step eps/4); a worst case over
    attacks (worst_case.py) by the attacks it was made of."""
    if config.get("attacks"):
        return f"`{config['attack']}` per image of " + " and ".join(attack_text(a) for a in config["attacks"])
    text = f"`{config['attack']}` ({config['norm']}, {config['iterations']} iterations x {config['eot']} EOT"
    if config["attack"] in ("pgd-eot", "bpda-eot"):
        text += ", step " + ("eps/4" if config["step_size"] is None else f"{config['step_size']:g}")
    return text + ")"


def _cell(entry):
    return _percent_with_interval(entry["accuracy"], entry["ci95"])


def _per_vote_cell(row, part):
    return _percent_with_interval(row[f"{part}_per_vote"], row[f"{part}_per_vote_ci95"])


def _percent_with_interval(value, interval):
    low, high = interval
    return f"{value:.2f}% [{low:.1f}, {high:.1f}]"


def eps_text(eps, norm):
    if eps == "inf":
        return "unbounded"
    if eps == 0:
        return "0"
    return f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"


def plot_accuracy_vs_eps(summary, config, path):
    """PNG of clean-and-robust accuracy against eps (all-votes with its 95% interval, and majority)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 255 if config["norm"] == "linf" else 1
    points = [(0.0, summary["clean"], summary["clean_majority"])]
    points += [(row["eps"] * scale, row["robust"], row["robust_majority"]) for row in summary["rows"]]
    eps = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(eps, [p[1]["accuracy"] for p in points], "o-", label=f"right on all {config.get('votes', 1)}")
    ax.fill_between(eps, [p[1]["ci95"][0] for p in points], [p[1]["ci95"][1] for p in points], alpha=0.2)
    ax.plot(eps, [p[2]["accuracy"] for p in points], "s--", label="majority vote")
    for row in summary["undefended"]:
        ax.plot([row["eps"] * scale], [row["robust"]["accuracy"]], "x", color="black", label="undefended")
    ax.set_xlabel("eps (x 1/255)" if config["norm"] == "linf" else "eps (l2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{config['defense']} vs {config['attack']} ({config['norm']}), {summary['n_images']} images",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
