"""The trained default epsilon model that `purify` uses when no model is given, and its loader.

The weights ship inside the package (fp16 safetensors, written by `rdp-core train-diffusion`); their
metadata holds the model configuration, the training configuration and the exact training command.
"""
import functools
import json
import warnings
from pathlib import Path


from rdp_core.models.checkpoint import float_weights, load_strict
from rdp_core.models.layout import engine_layout
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp, ScoreSDEEpsModel

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "ddpmpp_cifar10_cpu.safetensors"


def load_trained(path, device="cpu"):
    """A frozen, eval-mode ScoreSDEEpsModel (float32) from a safetensors file written by rdp_core.train, in the
    engine's memory layout for `device` (rdp_core.models.layout)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = float_weights({k: f.get_tensor(k) for k in f.keys()})
    if "model_config" not in metadata:
        raise ValueError(f"{path} has no model_config metadata: it was not written by rdp-core train-diffusion")
    fields = json.loads(metadata["model_config"])
    config = DDPMppConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    net = NCSNpp(config)
    load_strict(net, state, source=str(path))
    model = engine_layout(ScoreSDEEpsModel(net).eval().requires_grad_(False).to(device))
    model.metadata = metadata
    model.trained_t_max = json.loads(metadata.get("train_config", "{}")).get("t_max", 1.0)
    return model


def load_default_eps_model(device="cpu"):
    """A fresh copy of the shipped default model (safe to move, fine-tune or wrap)."""
    return load_trained(DEFAULT_WEIGHTS, device)


@functools.lru_cache(maxsize=None)
def _cached_default(device):
    return load_default_eps_model(device)


def default_eps_model_for(x):
    """The default model on x's device (loaded once per device)."""
    if tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"the default model is a CIFAR-10 model for (N, 3, 32, 32) images, got {tuple(x.shape)}; "
                         "pass model=... for other images")
    return _cached_default(str(x.device))


def warn_beyond_trained_range(model, t_star, stacklevel=2):
    """A RuntimeWarning when a model trained by rdp_core (which records its t_max) is asked for a larger t*."""
    t_max = getattr(model, "trained_t_max", None)
    if t_max is not None and t_star > t_max:
        warnings.warn(f"the score model was trained for t <= {t_max}; t_star = {t_star} uses noise levels it "
                      "has not seen", RuntimeWarning, stacklevel=stacklevel + 1)
