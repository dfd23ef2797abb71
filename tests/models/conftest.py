import importlib

import pytest
import torch

from rdp_core.ops import GroupNormAct


@pytest.fixture
def assert_norms_run_on_rdp_core_ops(monkeypatch):
    """assert_norms_run_on_rdp_core_ops(model, *inputs): every GroupNorm of `model` goes through rdp_core.ops.

    Forces the "torch" backend (so the check holds with or without the compiled extension) and counts the
    calls that reach it: one per GroupNormAct module, and nn.GroupNorm's own forward never runs.
    """
    module = importlib.import_module("rdp_core.ops.group_norm_silu")
    eager = module.group_norm_act_eager
    calls = []
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    monkeypatch.setattr(module, "group_norm_act_eager", lambda *a, **k: calls.append(1) or eager(*a, **k))
    monkeypatch.setattr(torch.nn.GroupNorm, "forward", lambda *a, **k: pytest.fail("nn.GroupNorm.forward ran"))

    def check(model, *inputs):
        norms = sum(isinstance(m, GroupNormAct) for m in model.modules())
        with torch.no_grad():
            out = model(*inputs)
        assert norms > 0 and len(calls) == norms, f"{len(calls)} norm calls reached rdp_core.ops, {norms} norms"
        return out

    return check
