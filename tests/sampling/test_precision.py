"""Mixed precision: the score model under autocast, the sampler's state in float32."""
import pytest
import torch

import rdp_core
from rdp_core.sampling.precision import AutocastEps, with_precision


class DtypeRecorder(torch.nn.Module):
    """An epsilon model that records the dtype its matmul ran in."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 32)
        self.seen = []

    def forward(self, x, t):
        y = self.linear(x)
        self.seen.append(y.dtype)
        return y


def test_bf16_runs_the_model_in_bf16_and_keeps_the_state_in_float32():
    model, x = DtypeRecorder(), torch.rand(2, 3, 32, 32)
    out = rdp_core.purify(x, 0.05, model=model, steps=3, grad="none", precision="bf16",
                          generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and set(model.seen) == {torch.bfloat16}


def test_bf16_purification_stays_close_to_float32_and_differentiates():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runs = {p: rdp_core.purify(x, 0.05, steps=5, grad="none", precision=p, generator=torch.Generator().manual_seed(0))
            for p in ("fp32", "bf16")}
    assert 0 < (runs["fp32"] - runs["bf16"]).abs().max() < 0.02
    leaf = x.clone().requires_grad_()
    out = rdp_core.purify(leaf, 0.05, steps=3, precision="bf16", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.autograd.grad(out.sum(), leaf)[0]).all()


def test_the_wrapper_is_cached_per_model_and_precision_is_checked():
    model = DtypeRecorder()
    assert with_precision(model, "fp32") is model
    wrapped = with_precision(model, "fp16")
    assert isinstance(wrapped, AutocastEps) and with_precision(model, "fp16") is wrapped
    with pytest.raises(ValueError, match="precision must be one of"):
        with_precision(model, "int8")


def test_a_cached_wrapper_does_not_keep_its_model_alive():
    import gc
    import weakref

    model = DtypeRecorder()
    with_precision(model, "bf16")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert isinstance(with_precision(lambda x, t: x, "bf16"), AutocastEps)  # a plain function works too

