"""The worst case over attacks, image by image: one defense's runs under several attacks read as one run.

The field reports robustness against an ensemble of attacks per image (AutoAttack's own cascade does): an
image counts robust only where no attack broke it. `rdp-core compare` refuses runs attacked differently, so
this combines runs of one defense (the same purifier, classifier, t*, votes and norm) under different attacks
into an evaluation folder of its own, with config.json, records and summary like any other: per image and eps
it keeps the attacked record of the attack that did best against the defense (wrong by majority before
right, then the smallest share of right purifications, then wrong on some vote before right on all), so the
majority and all-votes verdicts are exactly the minimum over the attacks. Its clean records are the first run's:
one clean evaluation, as in any run (the others' clean purifications drew other noise). `summarize` and `compare` read
the folder as they read any run; two combined folders compare when their attacks were the same.

What a single run's sanity checks test does not carry over: the undefended and unbounded checks are the runs'
own, and the iterations check reads one attack's trace, which a per-image choice among attacks would bias, so
the combined summary lists each run's checks instead and keeps only the eps and attacked checks.
"""
import json
from pathlib import Path

from rdp_core.evaluation.compare import check_same_settings, load_run
from rdp_core.evaluation.records import CONFIG_FILE, RECORDS_DIR
from rdp_core.evaluation.summary import eps_text, right_votes, vote_share

WORST_CASE = "worst-case"
# What makes two runs runs of the same defense, whatever attacked them.
SAME_DEFENSE = ("defense", "t_star", "solver", "steps", "votes", "norm", "classifier", "classifier_arch", "model",
                "guidance_options", "auxiliary")
# What says how one run attacked, kept per run in the combined config.
ATTACK_SETTINGS = ("attack", "norm", "iterations", "eot", "step_size", "seed", "square_queries")
# The iterations check reads a PGD trace; one attack's, chosen per image, would bias it.
RUN_OWN_FIELDS = ("correct_fraction",)


def worst_case(out_dirs):
    """(config, records) of the per-image worst case over the runs in `out_dirs` (the first gives the clean
    records), on the images and eps every run attacked."""
    return _combine(_load_runs(out_dirs))


def _combine(runs):
    clean, attacked = {}, []
    for eps in sorted(set.intersection(*(set(pairs) for _, _, pairs in runs)), key=float):
        for index in sorted(set.intersection(*(set(pairs[eps]) for _, _, pairs in runs))):
            source, record = min(((name, pairs[eps][index][1]) for name, _, pairs in runs),
                                 key=lambda candidate: attack_outcome(candidate[1]))
            attacked.append({**{k: v for k, v in record.items() if k not in RUN_OWN_FIELDS}, "source": source})
            clean[index] = runs[0][2][eps][index][0]
    if not attacked:
        raise ValueError(f"the runs {[name for name, _, _ in runs]} have no attacked image and eps in common")
    return _combined_config(runs, attacked), [clean[i] for i in sorted(clean)] + attacked


def attack_outcome(record):
    """Orders attacked records from the attack that did best: right by majority last, then by the share of right
    purifications, then right on all votes last."""
    if "votes" not in record:
        raise ValueError("the worst case over attacks needs each record's votes, and these records have none "
                         f"(image {record['index']}); they were written before votes were recorded")
    return record["correct_majority"], vote_share(record), record["correct_all"]


def write_worst_case(out_dirs, out):
    """Writes the combined evaluation folder `out` (config, records, summary.json/.md with a per-image table,
    accuracy_vs_eps.png) and returns its summary."""
    from rdp_core.evaluation.runner import write_summary

    out = Path(out)
    if any(out.resolve() == Path(d).resolve() for d in out_dirs):
        raise ValueError(f"--out {out} is one of the runs combined: choose another folder")
    if (out / CONFIG_FILE).is_file() and json.loads((out / CONFIG_FILE).read_text()).get("attack") != WORST_CASE:
        raise ValueError(f"--out {out} holds an evaluation of its own: choose another folder")
    runs = _load_runs(out_dirs)
    config, records = _combine(runs)
    runs_section = runs_markdown(runs, records, config["norm"])
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (out / RECORDS_DIR / "rank0-of-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = write_summary(out, config, records)
    with open(out / "summary.md", "a") as f:
        f.write(runs_section)
    return summary


def runs_markdown(runs, records, norm):
    """Each run's sanity checks, and per image and eps which run's attack did best and each run's verdict."""
    out_dirs = [name for name, _, _ in runs]
    statuses = [{c["name"]: c["status"] for c in _sanity(d)} for d in out_dirs]
    names = list(dict.fromkeys(name for run in statuses for name in run))
    lines = ["", "Sanity checks of the runs combined (the undefended, unbounded and iterations checks are theirs):",
             "", "| run | " + " | ".join(names) + " |", "|" + " --- |" * (1 + len(names))]
    lines += [f"| {d} | " + " | ".join(run.get(name, "-") for name in names) + " |"
              for d, run in zip(out_dirs, statuses)]
    lines += ["", "Right purifications of the attacked image per run (M: right by majority), and the run kept:", "",
              "| eps | image | " + " | ".join(str(d) for d in out_dirs) + " | kept |",
              "|" + " --- |" * (3 + len(out_dirs))]
    for r in (r for r in records if r["kind"] == "attack"):
        cells = [_votes_cell(pairs[r["eps"]][r["index"]][1]) for _, _, pairs in runs]
        lines.append(f"| {eps_text(r['eps'], norm)} | {r['index']} | " + " | ".join(cells) + f" | {r['source']} |")
    return "\n".join(lines) + "\n"


def _votes_cell(record):
    return f"{right_votes(record)}/{len(record['votes'])}" + (
        " M" if record["correct_majority"] else "")


def _sanity(out_dir):
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no summary.json: run `rdp-core summarize {out_dir}` first")
    return json.loads(path.read_text())["sanity"]


def _load_runs(out_dirs):
    """(name, config, {eps: {index: (clean record, attacked record)}}) of each run, all of one defense."""
    if len(out_dirs) < 2:
        raise ValueError("a worst case over attacks needs at least two evaluation folders")
    runs = [(str(d), *_load(d)) for d in out_dirs]
    check_same_settings(runs, SAME_DEFENSE, "{name} evaluated another defense than {first} ({details}): a worst "
                        "case over attacks combines runs of one defense")
    return runs


def _load(out_dir):
    config, pairs = load_run(out_dir)
    if config.get("attack") == WORST_CASE:
        raise ValueError(f"{out_dir} is a worst case already: combine the runs it was made of instead")
    return config, pairs


def _combined_config(runs, attacked):
    """The defense's settings; the attacks' move under "attacks" (so that two worst cases compare only when made
    of the same attacks), and what each run did on its own (batch size, sanity-check settings) stays in its
    folder."""
    first = runs[0][1]
    return {**{k: first.get(k) for k in SAME_DEFENSE}, "attack": WORST_CASE,
            "eps": sorted({r["eps"] for r in attacked}, key=float), "n_images": len({r["index"] for r in attacked}),
            "device": first.get("device"), "attacks": [{k: config.get(k) for k in ATTACK_SETTINGS}
                                                       for _, config, _ in runs],
            "runs": [name for name, _, _ in runs]}
