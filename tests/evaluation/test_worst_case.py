"""The worst case over attacks: one defense's runs under several attacks read as one run."""
import json
import random

import pytest

from rdp_core.cli import main
from rdp_core.evaluation.compare import compare
from rdp_core.evaluation.summary import summarize
from rdp_core.evaluation.worst_case import worst_case, write_worst_case

from eval_runs import write_run, write_voted_run

AUTOATTACK = {"attack": "autoattack-rand", "step_size": None, "square_queries": 5000}


def test_each_image_keeps_the_attack_that_did_best(tmp_path):
    # Right purifications of 5 per attacked image: PGD-EOT leaves images 0 and 1 robust by majority,
    # AutoAttack 0 and 2; only image 0 survives both. Image 3 ties (0 of 5): the first run's record stays.
    pgd = write_voted_run(tmp_path / "pgd", "agdm", clean=[5, 5, 5, 5], attacked=[5, 3, 1, 0], votes=5)
    aa = write_voted_run(tmp_path / "aa", "agdm", clean=[5, 5, 0, 5], attacked=[4, 2, 3, 0], votes=5, **AUTOATTACK)
    config, records = worst_case([pgd, aa])
    kept = [(r["index"], r["source"]) for r in records if r["kind"] == "attack"]
    assert kept == [(0, str(aa)), (1, str(aa)), (2, str(pgd)), (3, str(pgd))]
    row, = summarize(records)["rows"]
    assert row["robust_majority"]["correct"] == 1
    assert row["attacked_per_vote"] == pytest.approx(100 * (4 + 2 + 1 + 0) / 20)
    assert row["clean_majority"]["correct"] == 4  # the first run's clean records, not the second's
    assert config["attack"] == "worst-case" and config["n_images"] == 4
    assert [a["attack"] for a in config["attacks"]] == ["pgd-eot", "autoattack-rand"]


@pytest.mark.parametrize("votes", [4, 5])
def test_its_verdicts_are_the_minimum_over_the_attacks(tmp_path, votes):
    rng = random.Random(votes)
    n = 40
    attacked = [[rng.randint(0, votes) for _ in range(n)] for _ in range(3)]
    runs = [write_voted_run(tmp_path / f"run{k}", "diffpure", clean=[votes] * n, attacked=counts, votes=votes,
                            attack=f"attack{k}") for k, counts in enumerate(attacked)]
    _, records = worst_case(runs)
    kept = {r["index"]: r for r in records if r["kind"] == "attack"}
    for i in range(n):
        fewest = min(counts[i] for counts in attacked)
        assert kept[i]["correct_majority"] == all(2 * counts[i] > votes for counts in attacked)
        assert kept[i]["correct_all"] == (fewest == votes)
        assert kept[i]["votes"].count(0) == fewest


def test_it_refuses_what_is_not_one_defense_under_several_attacks(tmp_path):
    pgd = write_voted_run(tmp_path / "pgd", "agdm", clean=[5, 5], attacked=[5, 3], votes=5)
    with pytest.raises(ValueError, match="at least two"):
        worst_case([pgd])
    other = write_voted_run(tmp_path / "other", "diffpure", clean=[5, 5], attacked=[5, 3], votes=5, **AUTOATTACK)
    with pytest.raises(ValueError, match="another defense.*defense: 'agdm' vs 'diffpure'"):
        worst_case([pgd, other])
    hotter = write_voted_run(tmp_path / "hotter", "agdm", clean=[5, 5], attacked=[5, 3], votes=5, t_star=0.2)
    with pytest.raises(ValueError, match="t_star: 0.1 vs 0.2"):
        worst_case([pgd, hotter])
    unvoted = write_run(tmp_path / "unvoted", "agdm", clean=[(True, True)] * 2, attacked=[(True, True)] * 2,
                        votes=5, **AUTOATTACK)
    with pytest.raises(ValueError, match="votes"):
        worst_case([pgd, unvoted])
    elsewhere = write_voted_run(tmp_path / "elsewhere", "agdm", clean=[5], attacked=[5], votes=5,
                                eps=0.0627, **AUTOATTACK)
    with pytest.raises(ValueError, match="no attacked image and eps in common"):
        worst_case([pgd, elsewhere])
    with pytest.raises(FileNotFoundError, match="not an rdp-core eval output folder"):
        worst_case([pgd, tmp_path / "missing"])


def summarized_run(folder, defense, attacked, **changes):
    run = write_voted_run(folder, defense, clean=[5] * len(attacked), attacked=attacked, votes=5,
                          n_images=len(attacked), device="cpu", **changes)
    main(["summarize", str(run)])
    return run


def test_the_command_writes_a_run_that_compare_and_summarize_read(tmp_path, capsys):
    folders = {}
    right_counts = {"diffpure": ([5, 1, 0, 4], [2, 4, 0, 5]), "agdm": ([5, 4, 3, 1], [5, 5, 2, 5])}
    for defense, (pgd_counts, aa_counts) in right_counts.items():
        pgd = summarized_run(tmp_path / f"{defense}_pgd", defense, pgd_counts)
        aa = summarized_run(tmp_path / f"{defense}_aa", defense, aa_counts, **AUTOATTACK)
        folders[defense] = tmp_path / f"{defense}_worst"
        main(["worst-case", str(pgd), str(aa), "--out", str(folders[defense])])
    shown = capsys.readouterr().out
    assert ("`worst-case` per image of `pgd-eot` (linf, 10 iterations x 4 EOT, step 0.007) and `autoattack-rand`"
            in shown)
    assert f"| 8/255 | 1 | 4/5 M | 5/5 M | {tmp_path / 'agdm_pgd'} |" in shown
    summary = json.loads((folders["agdm"] / "summary.json").read_text())
    assert summary["rows"][0]["robust_majority"]["correct"] == 2  # images 0 and 1
    result = compare([folders["diffpure"], folders["agdm"]], verdict="majority")
    assert [run["robust"]["correct"] for run in result["rows"][0]["runs"]] == [1, 2]
    main(["summarize", str(folders["agdm"])])  # a combined folder is summarised again like any run
    assert json.loads((folders["agdm"] / "summary.json").read_text())["rows"] == summary["rows"]
    with pytest.raises(ValueError, match="not attacked as"):
        compare([tmp_path / "diffpure_pgd", folders["agdm"]])
    with pytest.raises(SystemExit, match="a worst case already"):
        main(["worst-case", str(folders["agdm"]), str(tmp_path / "agdm_pgd"), "--out", str(tmp_path / "again")])
    with pytest.raises(SystemExit, match="one of the runs combined"):
        main(["worst-case", str(tmp_path / "agdm_pgd"), str(tmp_path / "agdm_aa"), "--out", str(tmp_path / "agdm_aa")])
    with pytest.raises(SystemExit, match="holds an evaluation of its own"):
        main(["worst-case", str(tmp_path / "agdm_pgd"), str(tmp_path / "agdm_aa"),
              "--out", str(tmp_path / "diffpure_pgd")])


def test_it_asks_for_the_runs_summaries(tmp_path):
    pgd = write_voted_run(tmp_path / "pgd", "agdm", clean=[5], attacked=[5], votes=5)
    aa = write_voted_run(tmp_path / "aa", "agdm", clean=[5], attacked=[4], votes=5, **AUTOATTACK)
    with pytest.raises(FileNotFoundError, match="rdp-core summarize"):
        write_worst_case([pgd, aa], tmp_path / "worst")
    assert not (tmp_path / "worst").exists()  # nothing half-written
