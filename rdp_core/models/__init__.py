"""Epsilon models the samplers take (model(x_t, t) -> eps) and the classifiers the purifier feeds."""
from rdp_core.models.gaussian import GaussianEpsModel

__all__ = ["GaussianEpsModel"]
