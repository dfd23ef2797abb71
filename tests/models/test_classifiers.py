import os

import pytest
import torch
from safetensors.torch import save_file

from rdp_core.data import load_cifar10
from rdp_core.models.checkpoint import CheckpointMismatch, load_strict, read_state, strip_prefix
from rdp_core.models.classifiers import CifarResNet, ResNet50, WideResNet, load_cifar_resnet, load_classifier


@pytest.fixture(scope="module")
def akamaster(data_root):
    return data_root / "classifiers" / "cifar10-resnet-akamaster"


@pytest.mark.parametrize("name, published", [("resnet20-12fca82f.th", 91.73), ("resnet56-4bfd9763.th", 93.39)])
def test_cifar_resnets_reproduce_their_published_accuracy(data_root, akamaster, name, published):
    model = load_cifar_resnet(akamaster / name)
    x, y = load_cifar10("test", root=data_root, dtype=torch.float32)
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000)))
    assert abs(100.0 * correct / len(y) - published) <= 0.05


def test_normalisation_is_inside_and_not_in_the_state_dict(akamaster):
    model = load_cifar_resnet(akamaster / "resnet20-12fca82f.th")
    assert not any("input_" in k for k in model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = model.logits((x - mean[:, None, None]) / std[:, None, None])
        torch.testing.assert_close(model(x), expected)


def test_wide_resnet_28_10_has_robustbench_keys_and_size():
    state = WideResNet().state_dict()
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 36_479_194
    for key in ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                "block2.layer.0.convShortcut.weight", "block3.layer.3.conv2.weight", "bn1.running_var", "fc.bias"]:
        assert key in state
    assert "block1.layer.1.convShortcut.weight" not in state
    assert len(state) == 155


def test_resnet50_has_torchvision_keys_and_size():
    state = ResNet50().state_dict()
    assert len(state) == 320
    assert sum(p.numel() for p in ResNet50().parameters()) == 25_557_032
    for key in ["conv1.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
                "layer3.5.conv2.weight", "layer4.2.bn3.bias", "fc.weight"]:
        assert key in state
    assert tuple(state["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)  # v1.5: stride in the 3x3


@pytest.mark.parametrize("kind, build", [("wrn-28-10", lambda: WideResNet(depth=10, widen_factor=1)),
                                         ("resnet50", ResNet50)])
def test_saved_checkpoints_load_back_in_both_formats(tmp_path, kind, build):
    source = build().eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    state = source.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "model.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    for path in (tmp_path / "model.pt", tmp_path / "model.safetensors"):
        target = build()
        load_strict(target, strip_prefix(read_state(path).get("state_dict", read_state(path))))
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(target.eval()(x), source(x))
    if kind == "resnet50":
        assert isinstance(load_classifier(kind, tmp_path / "model.pt"), ResNet50)


def test_mismatches_are_named(akamaster):
    model = CifarResNet(20)
    state = strip_prefix(read_state(akamaster / "resnet20-12fca82f.th", key="state_dict"))
    broken = dict(state)
    del broken["layer2.1.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["linear.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointMismatch) as err:
        load_strict(model, broken)
    message = str(err.value)
    assert "1 missing keys, first ['layer2.1.conv1.weight']" in message
    assert "1 unexpected keys, first ['extra.weight']" in message
    assert "linear.weight: checkpoint (100, 64) vs model (10, 64)" in message
    # Values of another kind: load_state_dict would cast an integer or bool tensor into float weights silently.
    odd = {**state, "linear.bias": state["linear.bias"].long(), "conv1.weight": state["conv1.weight"] > 0,
           "bn1.weight": state["bn1.weight"].tolist()}
    with pytest.raises(CheckpointMismatch) as err:
        load_strict(model, odd)
    assert ("3 values of another kind, first ['conv1.weight: checkpoint bool tensor vs model floating-point "
            "tensor', 'bn1.weight: checkpoint a list, not a tensor vs model floating-point tensor', "
            "'linear.bias: checkpoint integer tensor vs model floating-point tensor']") in str(err.value)
    load_strict(model, {k: v.half() if v.is_floating_point() else v for k, v in state.items()})  # precisions convert
    with pytest.raises(CheckpointMismatch, match="matches nothing"):
        load_strict(model, {"module." + k: v for k, v in state.items()})
    with pytest.raises(CheckpointMismatch, match="does not fit WideResNet: .* shapes differ"):
        load_strict(WideResNet(depth=10, widen_factor=1), state)  # only conv1/bn1 names are shared
    with pytest.raises(CheckpointMismatch, match="none of its 0 keys"):
        load_strict(model, {})
    with pytest.raises(CheckpointMismatch, match="180 missing keys, first \\['layer1.3.conv1.weight'"):
        load_cifar_resnet(akamaster / "resnet20-12fca82f.th", depth=56)  # a ResNet-20 file is no ResNet-56


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    torch.save({"state_dict": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        read_state(tmp_path / "evil.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointMismatch, match="dict of tensors"):
        read_state(tmp_path / "list.pt")
    with pytest.raises(CheckpointMismatch, match="no entry 'ema'"):
        read_state(tmp_path / "list.pt", key="ema")
    with pytest.raises(FileNotFoundError):
        read_state(tmp_path / "absent.pt")


def test_bad_classifier_names_are_explained(akamaster):
    with pytest.raises(ValueError, match="unknown classifier"):
        load_classifier("vgg16", akamaster / "resnet20-12fca82f.th")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
