import os
from pathlib import Path

import pytest
import torch
from torch import nn

from rdp_core.data import load_cifar10
from rdp_core.models import load_cifar_resnet

# Without a GPU the Triton kernels can still be checked for indexing and masking in Triton's interpreter,
# which reads this variable once, when triton is first imported: set it before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The real data folder beside the project (../shared/data), or $RDP_CORE_DATA.
SHARED_DATA = Path(os.environ.get("RDP_CORE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def data_root():
    """../shared/data; tests that read real data fail loudly (never skip) when it is missing."""
    if not (SHARED_DATA / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.fail(f"real CIFAR-10 data not found at {SHARED_DATA}: expected ../shared/data beside the project")
    return SHARED_DATA


RESNET20 = "classifiers/cifar10-resnet-akamaster/resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def resnet20(data_root):
    return load_cifar_resnet(data_root / RESNET20)


@pytest.fixture(scope="session")
def test_images(data_root):
    return load_cifar10("test", root=data_root, dtype=torch.float32, limit=400)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (0: masked, -1: pointing the wrong way)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class BrokenGradient(nn.Module):
    """A deliberately masked model: right logits forward, a zeroed or reversed gradient backward."""

    def __init__(self, model, scale):
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x):
        return self.model(_ScaledGradient.apply(x, self.scale))


class NoisyLogits(nn.Module):
    """A randomized model: the logits plus Gaussian noise, fresh on every forward."""

    def __init__(self, model, std):
        super().__init__()
        self.model = model
        self.std = std

    def forward(self, x):
        logits = self.model(x)
        return logits + self.std * torch.randn_like(logits)


@pytest.fixture
def broken_gradient():
    """BrokenGradient(model, scale): right forward, gradient times scale backward (0 masks, -1 reverses)."""
    return BrokenGradient


@pytest.fixture
def noisy_logits():
    return NoisyLogits
