"""Fused ops with per-call backend dispatch (see rdp_core._backend). Nothing here loads a kernel at import."""
from rdp_core.ops.group_norm_silu import (
    GroupNormAct,
    GroupNormSiLU,
    group_norm,
    group_norm_act,
    group_norm_act_eager,
    group_norm_act_torch,
    group_norm_silu,
    group_norm_silu_torch,
)

__all__ = [
    "GroupNormAct",
    "GroupNormSiLU",
    "group_norm",
    "group_norm_act",
    "group_norm_act_eager",
    "group_norm_act_torch",
    "group_norm_silu",
    "group_norm_silu_torch",
]
