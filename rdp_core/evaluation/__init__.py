"""Robustness evaluation: clean and robust accuracy of a (randomized) defense, with sanity checks.

See rdp_core.evaluation.runner for the procedure and rdp_core.evaluation.summary for the figures.
"""
from rdp_core.evaluation.runner import ATTACKS, DEFENSES, EvalConfig, evaluate
from rdp_core.evaluation.summary import summarize, wilson_interval

__all__ = ["ATTACKS", "DEFENSES", "EvalConfig", "evaluate", "summarize", "wilson_interval"]
