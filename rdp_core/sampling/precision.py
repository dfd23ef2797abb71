"""Mixed precision for the score model with the sampler's state kept in float32.

`with_precision(model, "bf16")` runs the epsilon model under torch.autocast: its convolutions and matmuls in
bfloat16 (or float16), its norms in float32 (autocast's policy; the fused GroupNorm keeps float32 statistics
whatever its input), and the epsilon it returns cast back to the state's dtype, so the solver's arithmetic
(and the adjoint's) stays in float32. The wrapper is cached per model, so CUDA graphs captured for it are
reused across calls.
"""
import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The wrappers are kept on the model itself, in a plain dict attribute (not a submodule, so the module tree and
# state dict are unchanged): a WeakKeyDictionary from model to wrapper would keep every model alive, and with
# it its CUDA graphs, since each wrapper holds its model.
_ATTRIBUTE = "_rdp_core_precision_wrappers"


class AutocastEps(nn.Module):
    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x, t):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t).to(x.dtype)


def with_precision(model, precision):
    """`model` itself for "fp32" (or None), else its (cached) autocast wrapper."""
    if precision is None or precision == "fp32":
        return model
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    try:
        per_model = vars(model).setdefault(_ATTRIBUTE, {})
    except TypeError:  # a callable without attributes: a new wrapper each call (and so new graphs)
        return AutocastEps(model, PRECISIONS[precision])
    if precision not in per_model:
        per_model[precision] = AutocastEps(model, PRECISIONS[precision])
    return per_model[precision]
