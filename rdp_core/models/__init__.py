"""Epsilon models the samplers take (model(x_t, t) -> eps) and the classifiers the purifier feeds."""
from rdp_core.models.adm import ADMConfig, ADMEpsModel, UNetModel, load_guided_diffusion_checkpoint
from rdp_core.models.checkpoint import CheckpointMismatch, load_strict, read_state, strip_prefix
from rdp_core.models.classifiers import CifarResNet, ResNet50, WideResNet, load_cifar_resnet, load_classifier
from rdp_core.models.default import load_default_eps_model, load_trained
from rdp_core.models.gaussian import GaussianEpsModel
from rdp_core.models.layout import engine_layout
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp, ScoreSDEEpsModel, load_score_sde_checkpoint

__all__ = [
    "ADMConfig", "ADMEpsModel", "CheckpointMismatch", "CifarResNet", "DDPMppConfig", "GaussianEpsModel", "NCSNpp",
    "ResNet50", "ScoreSDEEpsModel", "UNetModel", "WideResNet", "engine_layout", "load_cifar_resnet", "load_classifier",
    "load_default_eps_model", "load_guided_diffusion_checkpoint", "load_score_sde_checkpoint", "load_strict",
    "load_trained", "read_state", "strip_prefix",
]
