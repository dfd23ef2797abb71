"""Epsilon models the samplers take (model(x_t, t) -> eps) and the classifiers the purifier feeds."""
from rdp_core.models.checkpoint import CheckpointMismatch, load_strict, read_state, strip_prefix
from rdp_core.models.classifiers import CifarResNet, ResNet50, WideResNet, load_cifar_resnet, load_classifier
from rdp_core.models.gaussian import GaussianEpsModel

__all__ = [
    "CheckpointMismatch", "CifarResNet", "GaussianEpsModel", "ResNet50", "WideResNet", "load_cifar_resnet",
    "load_classifier", "load_strict", "read_state", "strip_prefix",
]
