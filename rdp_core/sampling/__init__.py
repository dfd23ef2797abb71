"""VP-SDE schedule, replayable noise and reverse solvers (see schedule.py for the conventions)."""
from rdp_core.sampling.noise import DIFFUSION_DRAW, StepNoise, seed_from
from rdp_core.sampling.schedule import VP, VPSchedule
from rdp_core.sampling.solvers import (
    DDIM,
    SOLVERS,
    DDPMAncestral,
    EulerMaruyama,
    ProbabilityFlowEuler,
    ProbabilityFlowHeun,
    ReverseSolver,
    default_steps,
    make_solver,
    respaced_indices,
    uniform_times,
)

__all__ = [
    "DDIM", "DDPMAncestral", "DIFFUSION_DRAW", "EulerMaruyama", "ProbabilityFlowEuler", "ProbabilityFlowHeun",
    "ReverseSolver", "SOLVERS", "StepNoise", "VP", "VPSchedule", "default_steps", "make_solver",
    "respaced_indices", "seed_from", "uniform_times",
]
