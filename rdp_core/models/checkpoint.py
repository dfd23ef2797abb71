"""Safe, loud checkpoint loading.

Files are read without executing code: safetensors, or torch.load with weights_only=True (which refuses any
pickle that would build something other than tensors and plain containers). Loading into a module is
strict, and a mismatch is reported by name: the first missing and unexpected keys, the shapes that differ
and the values of another kind (not a tensor; an integer or bool tensor where the model has floats, or the
reverse); a state dict that matches none of the module's keys is an error of its own (wrong model family).
Floating-point precisions convert (checkpoints are often stored in half precision).
"""
from pathlib import Path

import torch

SHOWN = 5  # how many names of each kind of mismatch an error message lists


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the module it is loaded into."""


def read_state(path, key=None):
    """The tensors of the checkpoint at `path`; `key` selects a sub-dict (e.g. "state_dict", "ema")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and zip errors come as many types
            raise ValueError(
                f"{path} could not be read as a weights-only torch checkpoint ({type(err).__name__}: {err}); "
                "files that need arbitrary code to load are refused"
            ) from err
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            found = sorted(state)[:SHOWN] if isinstance(state, dict) else type(state).__name__
            raise CheckpointMismatch(f"{path} has no entry {key!r} (found {found})")
        state = state[key]
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def strip_prefix(state, prefix="module."):
    """Keys without `prefix` where every key has it (DataParallel checkpoints); unchanged otherwise."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_strict(module, state, source="checkpoint"):
    """Loads `state` into `module`, or raises CheckpointMismatch naming what does not fit."""
    expected = module.state_dict()
    weights = [k for k in state if k in expected and not _is_step_counter(k)]
    if not weights:
        raise CheckpointMismatch(
            f"{source} matches nothing in {type(module).__name__}: none of its {len(state)} keys "
            f"(first {list(state)[:SHOWN]}) names a weight of the model (first {list(expected)[:SHOWN]})"
        )
    # BatchNorm's step counter is not a weight, and checkpoints saved before torch 0.4.1 lack it.
    state = {**{k: v for k, v in expected.items() if _is_step_counter(k)}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    present = [k for k in expected if k in state]
    wrong_kinds = [f"{k}: checkpoint {_kind(state[k])} vs model {_kind(expected[k])}"
                   for k in present if _kind(state[k]) != _kind(expected[k])]
    wrong_shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in present
        if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, first {missing[:SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first {unexpected[:SHOWN]}")
    if wrong_kinds:
        problems.append(f"{len(wrong_kinds)} values of another kind, first {wrong_kinds[:SHOWN]}")
    if wrong_shapes:
        problems.append(f"{len(wrong_shapes)} shapes differ, first {wrong_shapes[:SHOWN]}")
    if problems:
        raise CheckpointMismatch(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def _kind(value):
    """What must agree between a checkpoint's value and the model's: a tensor of floating point, complex,
    integer or bool values (precisions within a kind convert), or something that is no tensor at all."""
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    if value.dtype == torch.bool:
        return "bool tensor"
    if value.is_floating_point():
        return "floating-point tensor"
    return "complex tensor" if value.is_complex() else "integer tensor"


def float_weights(state):
    """`state` with its floating-point tensors in float32 (stored half-precision weights), others as they are
    (BatchNorm's integer step counters)."""
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


def _is_step_counter(key):
    return key.endswith(".num_batches_tracked")
