"""The auxiliary network of adversarial guidance: loading the shipped TRADES-trained weights.

The weights are fp16 safetensors written by `rdp-core train-guidance`; their metadata holds the
architecture, the training configuration, the command that made them and the measured accuracies.
"""
import functools
import json
from pathlib import Path

from rdp_core.models.checkpoint import float_weights, load_strict
from rdp_core.models.classifiers import CifarResNet

DEFAULT_AUXILIARY = Path(__file__).resolve().parent.parent / "weights" / "agdm_aux_cifar10_cpu.safetensors"


def load_auxiliary(path=None, device="cpu"):
    """A frozen, eval-mode CifarResNet (float32) from a file written by rdp-core train-guidance."""
    from safetensors import safe_open

    path = Path(path or DEFAULT_AUXILIARY)
    if not path.is_file():
        raise FileNotFoundError(f"auxiliary network weights not found: {path}; train them with "
                                "`rdp-core train-guidance` (see README) or pass network=...")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = float_weights({k: f.get_tensor(k) for k in f.keys()})
    if "depth" not in metadata:
        raise ValueError(f"{path} has no 'depth' metadata: it was not written by rdp-core train-guidance")
    network = CifarResNet(int(metadata["depth"]))
    load_strict(network, state, source=str(path))
    network = network.eval().requires_grad_(False).to(device)
    network.metadata = {k: _maybe_json(v) for k, v in metadata.items()}
    return network


@functools.lru_cache(maxsize=None)
def cached_auxiliary(device):
    return load_auxiliary(device=device)


def _maybe_json(value):
    try:
        return json.loads(value)
    except ValueError:
        return value
