"""Evaluation folders as `rdp-core eval` writes them, made up for the tests that read them."""
import json

ATTACK = {"attack": "pgd-eot", "norm": "linf", "iterations": 10, "eot": 4, "step_size": 0.007, "votes": 2,
          "seed": 0, "classifier": "resnet56.th"}


def write_run(folder, defense, clean, attacked, eps=0.031372549, **changes):
    """An eval output folder: config.json and records as rdp-core eval writes them (without votes)."""
    return write_records(folder, defense, [[{"correct_all": right_all, "correct_majority": right_majority}
                                            for right_all, right_majority in flags] for flags in (clean, attacked)],
                         eps, **changes)


def write_voted_run(folder, defense, clean, attacked, votes=5, **changes):
    """An eval output folder whose records hold each purification's prediction: `votes` per image, of which
    clean[i] (attacked[i]) predict the label 0."""
    def record(right):
        return {"label": 0, "votes": [0] * right + [1] * (votes - right), "correct_all": right == votes,
                "correct_majority": 2 * right > votes, "linf": 0.0, "l2": 0.0}  # summarize reads the norms
    return write_records(folder, defense, [[record(k) for k in counts] for counts in (clean, attacked)],
                         votes=votes, **changes)


def write_records(folder, defense, clean_and_attacked, eps=0.031372549, **changes):
    (folder / "records").mkdir(parents=True)
    config = {**ATTACK, "defense": defense, "t_star": 0.1, "guidance_options": None, **changes}
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    for (kind, eps_value), records in zip((("clean", 0.0), ("attack", eps)), clean_and_attacked):
        lines += [json.dumps({"kind": kind, "index": index, "eps": eps_value, **record})
                  for index, record in enumerate(records)]
    (folder / "records" / "rank0-of-1.jsonl").write_text("\n".join(lines) + "\n")
    return folder
