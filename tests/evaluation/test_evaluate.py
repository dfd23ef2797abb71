import json
import os
import subprocess
import sys

import pytest
import torch

from rdp_core.data import load_cifar10
from rdp_core.evaluation import EvalConfig, evaluate
from rdp_core.evaluation.records import RecordStore
from rdp_core.models import GaussianEpsModel
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp, ScoreSDEEpsModel

QUICK = dict(iterations=2, eot=2, votes=3, sanity_images=2, sanity_iterations=2, batch_size=3)


@pytest.fixture(scope="module")
def gaussian_model(data_root):
    train, _ = load_cifar10("train", root=data_root, dtype=torch.float32, limit=5000)
    return GaussianEpsModel.fit(train * 2 - 1)


def records(out):
    return RecordStore(out).read_all()


def keys(out):
    return sorted((r["kind"], r["index"], str(r["eps"])) for r in records(out))


@pytest.mark.parametrize("attack", ["pgd-eot", "bpda-eot", "autoattack-rand"])
def test_diffpure_evaluation_writes_votes_records_summary_and_plot(resnet20, test_images, gaussian_model, tmp_path,
                                                                   attack):
    if attack.startswith("autoattack"):
        pytest.importorskip("torchattacks")
    x, y = (t[:4] for t in test_images)
    config = EvalConfig(defense="diffpure", attack=attack, n_images=4, t_star=0.05, steps=4, eps=(4 / 255, 8 / 255),
                        **QUICK)
    summary = evaluate(config, resnet20, gaussian_model, tmp_path, images=x, labels=y, progress=False)
    written = records(tmp_path)
    # Clean and two eps for 4 images; the two sanity attacks on the first 2.
    assert len(written) == 4 * 3 + 2 * 2 and len(set(keys(tmp_path))) == len(written)
    assert all(len(r["votes"]) == 3 for r in written if r["kind"] != "undefended")
    attacked = [r for r in written if r["kind"] == "attack"]
    assert all(r["linf"] <= r["eps"] + 1e-6 for r in attacked)
    assert ("correct_fraction" in attacked[0]) == (attack != "autoattack-rand")
    assert [row["eps"] for row in summary["rows"]] == [round(4 / 255, 9), round(8 / 255, 9)]
    assert {c["name"] for c in summary["sanity"]} == {"undefended", "unbounded", "eps", "iterations", "attacked"}
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["config"]["attack"] == attack and stored["rows"] == json.loads(json.dumps(summary["rows"]))
    assert (tmp_path / "accuracy_vs_eps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sanity check |" in (tmp_path / "summary.md").read_text()


def test_resume_skips_what_is_written_and_refuses_another_configuration(resnet20, test_images, tmp_path):
    x, y = test_images
    config = EvalConfig(defense="none", n_images=5, **QUICK)
    evaluate(config, resnet20, out_dir=tmp_path, images=x, labels=y, progress=False)
    first = keys(tmp_path)
    evaluate(config, resnet20, out_dir=tmp_path, images=x, labels=y, resume=True, progress=False)
    assert keys(tmp_path) == first  # nothing evaluated twice
    # A crash mid-write leaves a partial line: it is ignored and its image evaluated again.
    path = next((tmp_path / "records").glob("*.jsonl"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    evaluate(config, resnet20, out_dir=tmp_path, images=x, labels=y, resume=True, progress=False)
    assert keys(tmp_path) == first
    # More images extend the run; the first five are not redone.
    evaluate(EvalConfig(defense="none", n_images=7, **QUICK), resnet20, out_dir=tmp_path, images=x, labels=y,
             resume=True, progress=False)
    assert len(keys(tmp_path)) == len(first) + 2 * 2 and set(first) < set(keys(tmp_path))
    with pytest.raises(ValueError, match="iterations"):
        evaluate(EvalConfig(defense="none", n_images=5, **{**QUICK, "iterations": 3}), resnet20, out_dir=tmp_path,
                 images=x, labels=y, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        evaluate(config, resnet20, out_dir=tmp_path, images=x, labels=y, progress=False)


def test_block_checkpointing_changes_no_record_and_may_change_on_resume(resnet20, test_images, tmp_path):
    torch.manual_seed(0)
    unet = NCSNpp(DDPMppConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0))
    model = ScoreSDEEpsModel(unet).eval().requires_grad_(False)
    x, y = (t[:3] for t in test_images)
    written = {}
    for blocks in (False, True):
        config = EvalConfig(defense="diffpure", n_images=2, t_star=0.05, steps=3, checkpoint_blocks=blocks, **QUICK)
        evaluate(config, resnet20, model, tmp_path / str(blocks), images=x, labels=y, progress=False)
        written[blocks] = [{k: v for k, v in r.items() if k != "seconds"} for r in records(tmp_path / str(blocks))]
    assert written[True] == written[False]  # the same gradients, so the same adversarial examples and votes
    config = EvalConfig(defense="diffpure", n_images=3, t_star=0.05, steps=3, **QUICK)
    evaluate(config, resnet20, model, tmp_path / "True", images=x, labels=y, resume=True, progress=False)
    blockless = GaussianEpsModel.fit(torch.rand(64, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="checkpoint_unit"):
        evaluate(EvalConfig(defense="diffpure", n_images=3, checkpoint_blocks=True, **QUICK), resnet20, blockless,
                 tmp_path / "gaussian", images=x, labels=y, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(defense="pixel"), "defense"), (dict(attack="cw"), "attack"), (dict(norm="l1"), "norm"),
    (dict(eps=(0.0,)), "eps"), (dict(votes=0), "votes"), (dict(defense="none", attack="bpda-eot"), "bpda"),
    (dict(defense="diffpure", guidance_options={"scale": 1.0}), "guidance options"),
    (dict(defense="gdmp", auxiliary="aux.safetensors"), "auxiliary network is for"),
    (dict(step_size=-0.01), "step_size"),
])
def test_bad_configurations_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_step_size_defaults_to_one_number_in_linf_and_to_eps_over_4_in_l2(resnet20, test_images, tmp_path):
    assert EvalConfig(norm="linf", eps=(2 / 255, 8 / 255)).step_size == 0.007
    assert EvalConfig(norm="l2", step_size=0.1).step_size == 0.1
    config = EvalConfig(defense="none", norm="l2", n_images=8, iterations=4, sanity=False, batch_size=8)
    assert config.step_size is None  # resolved per eps: 0.5 / 4 at the reference radius
    x, y = (t[:8] for t in test_images)
    summary = evaluate(config, resnet20, out_dir=tmp_path, images=x, labels=y, progress=False)
    # l_inf's 0.007 would move an l_2 attack 0.028 in 4 iterations, far inside the ball, and leave most right.
    assert summary["rows"][0]["robust"]["correct"] == 0


def test_torchrun_shards_the_images_over_two_gloo_processes(data_root, tmp_path):
    """Two CPU processes: every (kind, image, eps) is evaluated exactly once, and rank 0 writes one summary."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rdp_core.cli", "eval", "--data", str(data_root), "--defense", "none", "--n-images", "7",
               "--iterations", "2", "--sanity-images", "3", "--sanity-iterations", "2", "--batch-size", "2",
               "--eps", "4/255,8/255", "--classifier", str(data_root / "classifiers/cifar10-resnet-akamaster/"
                                                           "resnet20-12fca82f.th"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "records").glob("*.jsonl")) == ["rank0-of-2.jsonl", "rank1-of-2.jsonl"]
    written = keys(out)
    assert len(written) == len(set(written)) == 7 * 3 + 3 * 2
    per_file = {p.name: {json.loads(line)["index"] % 2 for line in p.read_text().splitlines()}
                for p in (out / "records").glob("*.jsonl")}
    assert per_file == {"rank0-of-2.jsonl": {0}, "rank1-of-2.jsonl": {1}}
    assert json.loads((out / "summary.json").read_text())["n_images"] == 7


def test_results_name_the_gpu_and_the_code_that_made_them(monkeypatch):
    from pathlib import Path

    import rdp_core
    from rdp_core.evaluation.runner import code_version, device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Some GPU {device}")
    assert device_name(torch.device("cuda", 0)) == "Some GPU cuda:0"
    code = code_version()
    assert code["rdp_core"] == rdp_core.__version__
    if (Path(rdp_core.__file__).resolve().parents[1] / ".git").exists():  # run from a checkout: its commit
        assert len(code["git_commit"]) == 40 and isinstance(code["git_dirty"], bool)
    else:
        assert "git_commit" not in code


def test_summarize_rewrites_a_summary_from_the_records_and_keeps_the_runs_provenance(resnet20, test_images,
                                                                                    tmp_path):
    from rdp_core.cli import main

    x, y = test_images
    evaluate(EvalConfig(defense="none", n_images=3, **QUICK), resnet20, out_dir=tmp_path, images=x, labels=y,
             progress=False)
    before = json.loads((tmp_path / "summary.json").read_text())
    # A record as an older rule wrote it: the summary follows the votes, not the stored flag.
    path = next((tmp_path / "records").glob("*.jsonl"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    clean = next(r for r in lines if r["kind"] == "clean" and r["correct_all"])
    clean["votes"] = [(clean["label"] + 1) % 10] * len(clean["votes"])
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["summarize", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "summary.json").read_text())
    assert after["command"] == before["command"] and after["date"] == before["date"]
    assert set(after["summarized"]) == {"command", "date", "device", "code"}
    assert after["clean"]["correct"] == before["clean"]["correct"] - 1
    with pytest.raises(SystemExit, match="not an rdp-core eval folder"):
        main(["summarize", str(tmp_path / "nothing")])


def test_summarize_covers_the_images_a_resumed_run_added(resnet20, test_images, tmp_path):
    # config.json keeps the first run's --n-images; the resumed run's summary says how many it covered.
    from rdp_core.cli import main

    x, y = test_images
    for n_images in (2, 3):
        evaluate(EvalConfig(defense="none", n_images=n_images, **QUICK), resnet20, out_dir=tmp_path, images=x,
                 labels=y, progress=False, resume=n_images == 3)
    assert json.loads((tmp_path / "config.json").read_text())["n_images"] == 2
    assert main(["summarize", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["n_images"] == 3
