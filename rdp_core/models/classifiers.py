"""Classifiers that take images in [0, 1]: each normalises its input itself.

Module trees and parameter names follow the checkpoints' own code, so their state dicts load key for key:

* `CifarResNet`: He et al.'s CIFAR ResNets as in akamaster/pytorch_resnet_cifar10 (option-A shortcuts);
  `load_cifar_resnet` reads the `resnet20-*.th` / `resnet56-*.th` files of ../shared/data/classifiers.
* `WideResNet`: the WRN-28-10 of RobustBench's model zoo (`Standard` and the models built like it).
* `ResNet50`: torchvision's ResNet-50 (v1.5: stride in the 3x3 convolution), ImageNet normalisation.

The normalisation constants are non-persistent buffers, so they never appear in a state dict.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rdp_core.models.checkpoint import load_strict, read_state, strip_prefix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _NormalizedInput(nn.Module):
    """Base: subtracts `mean` and divides by `std` (per channel), then computes `logits`."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.logits(self.normalize(x))

    def normalize(self, x):
        return (x - self.input_mean) / self.input_std


# --- akamaster CIFAR ResNets -------------------------------------------------------------------------------


class _OptionAShortcut(nn.Module):
    """Parameter-free downsampling shortcut: every other pixel, channels zero-padded on both sides."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _CifarBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _OptionAShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(_NormalizedInput):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n BasicBlocks with 16, 32, 64 channels."""

    def __init__(self, depth, num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(mean, std)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes, planes, blocks, stride):
        return nn.Sequential(*[_CifarBasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(blocks)])

    LAYERS = ("layer1", "layer2", "layer3", "pool")

    def logits(self, x):
        return self.linear(self._stages(x)[-1])

    def _stages(self, x):
        """The outputs of the three stages and of the global pooling, for a normalised input."""
        out = [F.relu(self.bn1(self.conv1(x)))]
        for stage in (self.layer1, self.layer2, self.layer3):
            out.append(stage(out[-1]))
        return out[1:] + [out[-1].mean(dim=(2, 3))]

    def representation(self, x, layer="pool"):
        """(the representation at `layer` (one of LAYERS), logits) of images x in [0, 1], in one forward."""
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        stages = self._stages(self.normalize(x))
        return stages[self.LAYERS.index(layer)], self.linear(stages[-1])


def load_cifar_resnet(path, depth=None):
    """A CifarResNet in eval mode from an akamaster checkpoint ({"state_dict": ...}, keys "module."-prefixed).

    `depth` defaults to what the file name says (resnet20-..., resnet56-...).
    """
    state = strip_prefix(read_state(path, key="state_dict"))
    if depth is None:
        name = Path(path).name
        digits = name.removeprefix("resnet").split("-")[0].split(".")[0]
        if not digits.isdigit():
            raise ValueError(f"cannot tell the depth from the file name {name!r}; pass depth=")
        depth = int(digits)
    model = CifarResNet(depth)
    load_strict(model, state, source=str(path))
    return model.eval()


# --- RobustBench WideResNet --------------------------------------------------------------------------------


class _WideBasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # Pre-activation: the projection shortcut reads the activated input, the identity the raw one.
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class _NetworkBlock(nn.Module):
    def __init__(self, blocks, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                     stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(_NormalizedInput):
    """WRN-depth-widen (default 28-10) in RobustBench's layout; by default no input normalisation."""

    def __init__(self, depth=28, widen_factor=10, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__(mean, std)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.fc = nn.Linear(widths[3], num_classes)

    def logits(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.relu(self.bn1(out)).mean(dim=(2, 3)))


# --- torchvision ResNet-50 ---------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(_NormalizedInput):
    """torchvision's resnet50 (same state-dict keys), with ImageNet normalisation inside."""

    def __init__(self, num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for index, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
            layers = [_Bottleneck(in_planes, planes, stride)]
            in_planes = planes * _Bottleneck.expansion
            layers += [_Bottleneck(in_planes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, num_classes)

    def logits(self, x):
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(out.mean(dim=(2, 3)))


def load_classifier(kind, path):
    """`kind`: "resnet20", "resnet56", ... (akamaster CIFAR), "wrn-28-10" (RobustBench), "resnet50" (torchvision)."""
    builders = {"wrn-28-10": WideResNet, "resnet50": ResNet50}
    if kind in builders:
        state = read_state(path)
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model = builders[kind]()
        load_strict(model, strip_prefix(state), source=str(path))
        return model.eval()
    depth = kind.removeprefix("resnet")
    if kind.startswith("resnet") and depth.isdigit():
        return load_cifar_resnet(path, depth=int(depth))
    raise ValueError(f"unknown classifier {kind!r}; expected resnet20/32/44/56/110, wrn-28-10 or resnet50")
