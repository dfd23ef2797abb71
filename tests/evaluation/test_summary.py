import pytest

from rdp_core.evaluation.summary import markdown, summarize, wilson_interval


def test_wilson_interval_matches_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def record(kind, index, eps, votes, label=0, **extra):
    return {"kind": kind, "index": index, "label": label, "eps": eps, "votes": votes,
            "correct_all": all(v == label for v in votes),
            "correct_majority": sum(v == label for v in votes) * 2 > len(votes), "linf": eps, "l2": 0.0, **extra}


def test_robust_needs_every_vote_on_both_the_clean_and_the_attacked_image():
    records = [record("clean", 0, 0.0, [0, 0, 0]), record("attack", 0, 0.03, [0, 0, 0]),   # robust
               record("clean", 1, 0.0, [0, 0, 1]), record("attack", 1, 0.03, [0, 0, 0]),   # clean vote lost
               record("clean", 2, 0.0, [0, 0, 0]), record("attack", 2, 0.03, [0, 1, 0]),   # majority only
               record("clean", 3, 0.0, [1, 1, 1]), record("attack", 3, 0.03, [1, 1, 1])]   # wrong
    summary = summarize(records)
    (row,) = summary["rows"]
    assert row["clean"]["correct"] == 2 and row["robust"]["correct"] == 1
    assert row["clean_majority"]["correct"] == 3 and row["robust_majority"]["correct"] == 3
    assert row["robust"]["accuracy"] == 25.0 and row["robust"]["ci95"][0] < 25.0 < row["robust"]["ci95"][1]
    assert row["clean_per_vote"] == pytest.approx(200 / 3) and row["attacked_per_vote"] == pytest.approx(200 / 3)
    # 8 of 12 purifications right over 4 images: Wilson's interval of 4 images at 8/3 right.
    low, high = wilson_interval(8 / 3, 4)
    assert row["clean_per_vote_ci95"] == pytest.approx([100 * low, 100 * high])
    assert row["attacked_per_vote_ci95"] == pytest.approx([100 * low, 100 * high])
    config = {"defense": "diffpure", "attack": "pgd-eot", "norm": "linf", "votes": 3, "iterations": 10, "eot": 4,
              "step_size": 0.007}
    text = markdown(summary, config)
    assert "| 7.65/255 | 50.00% [" in text and "25.00% [" in text
    assert f"| 66.67% [{100 * low:.1f}, {100 * high:.1f}] / 66.67% [{100 * low:.1f}, {100 * high:.1f}] |" in text
    assert "(linf, 10 iterations x 4 EOT, step 0.007)" in text
    assert "(l2, 10 iterations x 4 EOT, step eps/4)" in markdown(summary, {**config, "norm": "l2", "step_size": None})


def test_eps_check_flags_only_a_significant_rise():
    clean = [record("clean", i, 0.0, [i % 2]) for i in range(20)]  # half right
    flat = [record("attack", i, 0.03, [1]) for i in range(20)]  # all wrong
    risen = [record("attack", i, 0.06, [0]) for i in range(20)]  # all right at the larger eps
    status = {c["name"]: c["status"] for c in summarize(clean + flat + risen)["sanity"]}
    assert status["eps"] == "FAIL"
    one_more = [record("attack", i, 0.06, [0 if i == 1 else 1]) for i in range(20)]
    status = {c["name"]: c["status"] for c in summarize(clean + flat + one_more)["sanity"]}
    assert status["eps"] == "pass" and status["iterations"] == "not run" and status["unbounded"] == "not run"


def test_iteration_check_reads_the_pgd_traces():
    clean = [record("clean", i, 0.0, [0]) for i in range(10)]
    falling = [record("attack", i, 0.03, [1], correct_fraction=[1.0, 0.9, 0.5, 0.2, 0.0, 0.0, 0.1, 0.0])
               for i in range(10)]
    rising = [record("attack", i, 0.03, [1], correct_fraction=[0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 0.9, 1.0 - i / 100])
              for i in range(10)]
    assert summarize(clean + falling)["sanity"][3]["status"] == "pass"
    assert summarize(clean + rising)["sanity"][3]["status"] == "FAIL"


def test_a_majority_tie_is_wrong_whatever_the_class_indices(tmp_path):
    from rdp_core.evaluation.records import RecordStore, verdicts

    # Label 1 tied with 5 used to win (the smaller index) and label 9 tied with 8 to lose: now both are wrong.
    assert verdicts([3, 1, 5, 5, 1], 1) == (False, False) and verdicts([9, 9, 8, 0, 8], 9) == (False, False)
    assert verdicts([1, 1, 5, 5, 1], 1) == (False, True) and verdicts([2, 2, 2], 2) == (True, True)
    assert verdicts([2, 3, 4], 2) == (False, False)
    # Records written under the old rule are read under the new one.
    store = RecordStore(tmp_path)
    store.records_dir.mkdir(parents=True)
    store.append([{"kind": "clean", "index": 6, "label": 1, "eps": 0.0, "votes": [3, 1, 5, 5, 1],
                   "correct_all": False, "correct_majority": True}])
    assert store.read_all()[0]["correct_majority"] is False


def test_attacked_check_flags_robust_images_the_attack_left_unperturbed():
    clean = [record("clean", i, 0.0, [0, 0, 0]) for i in range(20)]
    attacked = [record("attack", i, 0.03, [0, 0, 1]) for i in range(20)]  # all robust by majority, all moved
    assert summarize(clean + attacked)["sanity"][4]["status"] == "pass"
    attacked[0]["linf"] = 0.0  # one of 20 (5%) handed back unperturbed: within the limit
    assert summarize(clean + attacked)["sanity"][4]["status"] == "pass"
    attacked[1]["linf"] = 0.0
    check = summarize(clean + attacked)["sanity"][4]
    assert check["name"] == "attacked" and check["status"] == "FAIL" and check["detail"].startswith("2 of the 20")
    broken = [record("attack", i, 0.03, [1, 1, 1]) for i in range(20)]  # nothing robust: nothing to check
    assert summarize(clean + broken)["sanity"][4]["status"] == "not run"
