"""Mixed precision: the score model under autocast, the sampler's state in float32."""
import pytest
import torch

import rdp_core
from rdp_core.models.adm import ADMConfig, UNetModel
from rdp_core.models.ncsnpp import DDPMppConfig, NCSNpp, ScoreSDEEpsModel
from rdp_core.sampling.precision import AutocastEps, _CastRecorder, with_precision


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



def _randomized(model):
    # Random weights everywhere (the zero-initialised output layers would hide differences).
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval().requires_grad_(False)


def _ddpmpp():
    return ScoreSDEEpsModel(NCSNpp(DDPMppConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                                                image_size=16)))


def _adm():
    return UNetModel(ADMConfig(image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                               num_head_channels=16, num_res_blocks=1, use_fp16=False))


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([0.05, 0.3])


def _autocast(model, x, t):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return model(x, t).to(x.dtype)


def _weight_casts(model, call):
    """The parameters that `call` casts to bfloat16."""
    recorder = _CastRecorder(dict(model.named_parameters()), torch.bfloat16)
    with recorder:
        call()
    return recorder.cast


@pytest.mark.parametrize("build", [_ddpmpp, _adm], ids=["ddpmpp", "adm"])
def test_kept_weight_casts_give_autocasts_result_bit_for_bit_without_casting(build):
    model, (x, t) = _randomized(build()), _inputs()
    wrapped = AutocastEps(model, torch.bfloat16)
    with torch.no_grad():
        expected = _autocast(model, x, t)
        assert len(_weight_casts(model, lambda: _autocast(model, x, t))) > 10  # what the wrapper saves
        first = wrapped(x, t)  # records what autocast casts
        second = wrapped(x, t)  # makes the copies
        assert _weight_casts(model, lambda: wrapped(x, t)) == set()
        assert torch.equal(first, expected) and torch.equal(second, expected) and torch.equal(wrapped(x, t), expected)


def test_kept_casts_follow_weights_loaded_or_moved():
    model, (x, t) = _randomized(_ddpmpp()), _inputs()
    wrapped = AutocastEps(model, torch.bfloat16)
    with torch.no_grad():
        wrapped(x, t)
        wrapped(x, t)
        model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
        assert torch.equal(wrapped(x, t), _autocast(model, x, t))
        for p in model.parameters():
            p.data = p.data * 0.5  # new tensors at new addresses
        assert torch.equal(wrapped(x, t), _autocast(model, x, t))


def test_weights_that_require_grad_get_autocasts_exact_gradients():
    model, (x, t) = _randomized(_ddpmpp()).requires_grad_(True), _inputs()
    wrapped = AutocastEps(model, torch.bfloat16)
    wrapped(x, t)
    parameters = list(model.parameters())
    got = torch.autograd.grad(wrapped(x, t).square().sum(), parameters)
    expected = torch.autograd.grad(_autocast(model, x, t).square().sum(), parameters)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


class ReadsAWeightTwice(torch.nn.Module):
    """linear.weight goes to a bf16 matmul and to a float32 sum: a bf16 copy would change the sum."""

    def __init__(self):
        super().__init__()
        self.linear, self.other = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x, t):
        return self.other(self.linear(x)) + self.linear.weight.sum() * 1e-3


class AddsABiasInPlace(ReadsAWeightTwice):
    """other.bias goes to a bf16 matmul and, in place, to a float32 sum (the result's storage is not the bias')."""

    def forward(self, x, t):
        return self.linear(self.other(x).float().add_(self.other.bias))


@pytest.mark.parametrize("module, kept", [(ReadsAWeightTwice, ["linear.bias", "other.bias", "other.weight"]),
                                          (AddsABiasInPlace, ["linear.bias", "linear.weight", "other.weight"])])
def test_a_weight_also_read_uncast_is_not_kept(module, kept):
    model, x = _randomized(module()), torch.randn(4, 16)
    wrapped = AutocastEps(model, torch.bfloat16)
    with torch.no_grad():
        wrapped(x, None)
        assert wrapped._casts["cpu"].names == kept
        assert torch.equal(wrapped(x, None), _autocast(model, x, None))


def test_a_model_built_under_inference_mode_keeps_its_casts_too():
    # Inference tensors have no version counter to check the copies against.
    x, t = _inputs()
    with torch.inference_mode():
        model = _randomized(_ddpmpp())
        wrapped = AutocastEps(model, torch.bfloat16)
        results = [wrapped(x, t) for _ in range(3)]
        assert all(torch.equal(r, _autocast(model, x, t)) for r in results)
        assert wrapped._casts["cpu"].sources is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kept_weight_casts_give_autocasts_result_on_cuda(monkeypatch):
    # CUDA's autocast lists, the Triton kernels and cuDNN's bf16 convolutions.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, (x, t) = _randomized(_ddpmpp()).cuda(), (v.cuda() for v in _inputs())
    wrapped = AutocastEps(model, torch.bfloat16)
    with torch.no_grad():
        expected = _autocast(model, x, t)
        results = [wrapped(x, t) for _ in range(3)]
        assert _weight_casts(model, lambda: wrapped(x, t)) == set()
    assert all(torch.equal(r, expected) for r in results)
