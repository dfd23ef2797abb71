import json
import struct
import zlib

import numpy as np
import pytest
import torch

from rdp_core import cli
from rdp_core.cli import main
from rdp_core.data import load_cifar10
from rdp_core.guidance import load_auxiliary
from rdp_core.train import CPU_MODEL
from rdp_core.visualize import image_grid, write_png


def read_png(path):
    """Minimal decoder for the 8-bit RGB, filter-0 PNGs write_png produces (checks the CRCs)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return torch.from_numpy(rows[:, 1:].reshape(height, width, 3).copy()).permute(2, 0, 1)


def test_png_round_trip(tmp_path):
    image = torch.randint(0, 256, (3, 7, 11), dtype=torch.uint8)
    write_png(image, tmp_path / "x.png")
    assert torch.equal(read_png(tmp_path / "x.png"), image)
    with pytest.raises(ValueError, match="uint8"):
        write_png(image.float(), tmp_path / "y.png")


def test_grid_places_rows_and_columns():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 1, 4, 4)
    grid = image_grid([a, b], padding=1)
    assert grid.shape == (3, 11, 11)
    assert (grid[:, 1:5, 1:5] == 0).all() and (grid[:, 6:10, 6:10] == 255).all()
    with pytest.raises(ValueError, match="row 1"):
        image_grid([a, torch.zeros(3, 3, 4, 4)])


def test_purify_command_writes_grid_metrics_and_images(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["purify", "--data", str(data_root), "--n-images", "5", "--batch-size", "2", "--steps", "10",
                 "--model", "gaussian", "--fit-images", "10000", "--out", str(out), "--seed", "3"])
    assert code == 0
    report = json.loads((out / "purify.json").read_text())
    assert report["n_images"] == 5 and len(report["per_image"]) == 5
    assert report["command"].startswith("rdp-core purify --data ")  # this call's arguments, not the process's
    assert report["config"]["fit_images"] == 10_000 and report["config"]["steps"] == 10
    assert 12 < report["psnr_mean"] < 40 and report["images_per_second"] > 0
    accuracy = report["accuracy"]
    assert accuracy["classifier"] == "ResNet-56" and accuracy["clean"] in (0.0, 20.0, 40.0, 60.0, 80.0, 100.0)
    assert accuracy["clean"] >= 80.0  # the first five test images: ResNet-56 gets them (almost) all right
    saved = np.load(out / "purified.npz", allow_pickle=False)
    assert saved["x"].shape == (5, 3, 32, 32) and saved["x"].dtype == np.uint8 and saved["y"].shape == (5,)
    grid = read_png(out / "grid.png")
    assert grid.shape == (3, 2 + 3 * 34, 2 + 2 * 34)  # input, diffused, purified rows; one batch of 2 shown
    printed = capsys.readouterr().out
    assert "mean PSNR" in printed and "ResNet-56 accuracy on these 5 images: clean" in printed


def test_purify_command_uses_the_default_model_and_shows_the_exact_diffused_state(data_root, tmp_path):
    import rdp_core

    out = tmp_path / "run"
    main(["purify", "--data", str(data_root), "--n-images", "3", "--steps", "4", "--out", str(out), "--seed", "5"])
    report = json.loads((out / "purify.json").read_text())
    assert report["config"]["model"] == "default" and report["config"]["fit_images"] is None
    images, _ = load_cifar10("test", root=data_root, dtype=torch.float32, limit=3)
    generator = torch.Generator().manual_seed(5)
    diffused = rdp_core.diffuse(images, 0.1, steps=4, generator=generator)
    purified = rdp_core.purify(images, 0.1, steps=4, generator=torch.Generator().manual_seed(5))
    grid = read_png(out / "grid.png").float() / 255
    to_pixels = lambda x: (x.clamp(0, 1) * 255).round() / 255  # noqa: E731
    torch.testing.assert_close(grid[:, 36:68, 2:34], to_pixels(diffused[0]), atol=1 / 255, rtol=0)
    torch.testing.assert_close(grid[:, 70:102, 2:34], to_pixels(purified[0]), atol=1 / 255, rtol=0)


def test_purify_command_states_what_bf16_changes_against_fp32_with_the_same_noise(data_root, tmp_path, capsys):
    common = ["purify", "--data", str(data_root), "--n-images", "4", "--steps", "5", "--seed", "2"]
    main(common + ["--out", str(tmp_path / "fp32")])
    main(common + ["--precision", "bf16", "--out", str(tmp_path / "bf16")])
    fp32, bf16 = (json.loads((tmp_path / name / "purify.json").read_text()) for name in ("fp32", "bf16"))
    effect = bf16["against_fp32"]
    assert "against_fp32" not in fp32 and bf16["config"]["precision"] == "bf16"
    # The reference is the fp32 purification with the same noise: the plain fp32 run's images, so its accuracy.
    assert effect["fp32_purified_accuracy"] == fp32["accuracy"]["purified"]
    saved = np.load(tmp_path / "fp32" / "purified.npz")["x"].astype(np.float64) / 255
    ours = np.load(tmp_path / "bf16" / "purified.npz")["x"].astype(np.float64) / 255
    assert abs(np.abs(ours - saved).mean() - effect["mean_abs_difference"]) < 2 / 255  # uint8 rounding of both
    assert 0 < effect["mean_abs_difference"] <= effect["max_abs_difference"] < 0.5
    assert 0 <= effect["prediction_agreement"] <= 100
    assert "bf16 against fp32 with the same noise" in capsys.readouterr().out


def test_purify_command_can_skip_or_name_the_classifier(data_root, tmp_path):
    common = ["purify", "--data", str(data_root), "--n-images", "2", "--steps", "2", "--fit-images", "10000"]
    main(common + ["--classifier", "none", "--out", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "purify.json").read_text())["accuracy"] is None
    with pytest.raises(FileNotFoundError, match="absent.th"):
        main(common + ["--classifier", str(tmp_path / "absent.th"), "--out", str(tmp_path / "b")])


def test_purify_command_rejects_bad_arguments(data_root, tmp_path):
    with pytest.raises(SystemExit):
        main(["purify", "--data", str(data_root), "--solver", "rk4"])
    with pytest.raises(SystemExit, match="n-images"):
        main(["purify", "--data", str(data_root), "--n-images", "0"])
    with pytest.raises(ValueError, match="t_star"):
        main(["purify", "--data", str(data_root), "--n-images", "2", "--fit-images", "10000", "--t-star", "1.5",
              "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="limit must be a positive number"):
        main(["purify", "--data", str(data_root), "--n-images", "2", "--model", "gaussian", "--fit-images", "-5",
              "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="takes one radius"):
        main(["train-guidance", "--data", str(data_root), "--eps", "8/255,4/255", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["train-diffusion", "--ch-mult", "1,two"], "expected comma-separated channel multipliers such as 1,2,2,2, got '1,two'"),
    (["compare", "a", "b", "--looks", "16,"], "expected comma-separated image counts such as 16,32,48, got '16,'"),
])
def test_integer_list_options_say_what_they_expected(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_train_command_passes_the_channel_multipliers_to_the_model(monkeypatch, tmp_path):
    configs = []
    monkeypatch.setattr(cli, "train", lambda config, *args, **kwargs: configs.append(config) or tmp_path)
    main(["train-diffusion", "--out", str(tmp_path)])
    main(["train-diffusion", "--ch-mult", "1,2", "--out", str(tmp_path)])
    assert [config.model.ch_mult for config in configs] == [CPU_MODEL.ch_mult, (1, 2)]


def test_eval_command_reports_accuracy_and_sanity(data_root, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--data", str(data_root), "--defense", "none", "--n-images", "6", "--iterations", "5",
                 "--eps", "2/255,8/255", "--sanity-images", "4", "--sanity-iterations", "5", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["classifier"].endswith("resnet56-4bfd9763.th") and summary["n_images"] == 6
    assert summary["rows"][-1]["robust"]["accuracy"] == 0.0  # ResNet-56 undefended at 8/255
    status = {c["name"]: c["status"] for c in summary["sanity"]}
    assert status.pop("attacked") == "not run"  # PGD breaks every image: nothing counted robust to check
    assert set(status.values()) == {"pass"}
    printed = capsys.readouterr().out
    assert "| 8/255 |" in printed and "accuracy_vs_eps.png" in printed
    png = (out / "accuracy_vs_eps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (600, 432)


@pytest.mark.parametrize("argv, message", [
    (["--eps", "8/x"], "--eps"), (["--votes", "0"], "votes"), (["--t-star", "2"], "t_star"),
    (["--classifier-arch", "vgg16"], "unknown classifier"),
    (["--guidance-scale", "3"], "--guidance-scale applies to --defense gdmp or agdm"),
    (["--defense", "gdmp", "--agdm-lambda", "0"], "--agdm-lambda applies to --defense agdm"),
    (["--defense", "gdmp", "--auxiliary", "x.safetensors"], "auxiliary network is for --defense agdm"),
])
def test_eval_command_rejects_bad_settings(data_root, tmp_path, argv, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        main(["eval", "--data", str(data_root), "--out", str(tmp_path / "x")] + argv)


def test_train_guidance_then_evaluate_agdm_with_the_trained_network(data_root, tmp_path, capsys):
    # The whole path of the paper's method at toy size: TRADES-train an auxiliary network, then attack the
    # AGDM-guided purifier that uses it through the evaluator.
    weights = tmp_path / "aux" / "auxiliary.safetensors"
    assert main(["train-guidance", "--data", str(data_root), "--out", str(weights.parent), "--depth", "8",
                 "--max-steps", "3", "--batch-size", "16", "--attack-steps", "2", "--eval-images", "20"]) == 0
    network = load_auxiliary(weights)
    assert network.metadata["depth"] == 8 and network.metadata["eval_images"] == 20
    assert 0.0 <= network.metadata["pgd20_accuracy"] <= network.metadata["clean_accuracy"] <= 1.0
    assert network.metadata["command"].startswith("rdp-core train-guidance")
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(data_root), "--defense", "agdm", "--auxiliary", str(weights),
                 "--agdm-layer", "layer3", "--guidance-scale", "50", "--n-images", "2", "--iterations", "1",
                 "--eot", "1", "--votes", "2", "--steps", "3", "--no-sanity", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["guidance_options"] == {"layer": "layer3", "scale": 50.0}
    assert summary["config"]["defense"] == "agdm" and summary["n_images"] == 2
    assert (out / "summary.md").read_text().startswith("defense `agdm` (layer=layer3, scale=50.0)")
