"""Fused ops with per-call backend dispatch (see rdp_core._backend). Nothing here loads a kernel at import."""
from rdp_core.ops.group_norm_silu import GroupNormSiLU, group_norm_silu, group_norm_silu_torch

__all__ = ["GroupNormSiLU", "group_norm_silu", "group_norm_silu_torch"]
