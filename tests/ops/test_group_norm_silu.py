"""GroupNorm (+ scale-shift) (+ SiLU): the CPU backends against stock torch ops and the float64 reference.

The Triton kernels have their own file, tests/kernels/test_group_norm_silu_triton.py."""
import functools
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.ops import (GroupNormAct, GroupNormSiLU, group_norm, group_norm_act, group_norm_act_torch,
                          group_norm_silu, group_norm_silu_torch)

gns_module = importlib.import_module("rdp_core.ops.group_norm_silu")  # the module, not the function it exports

CPP_BUILT = _backend.cpp_extension() is not None
needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason="rdp_core._C was not built")
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]

UNET_SHAPES = [(2, 128, 32, 32), (4, 256, 16, 16), (1, 512, 8, 8), (3, 256, 8, 8)]
AWKWARD_SHAPES = [(2, 64, 7, 7), (3, 96, 13, 17), (2, 32, 5, 5), (5, 64), (2, 64, 19), (1, 32, 2, 1)]


def stock(x, groups, weight, bias, eps=1e-5):
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def inputs(shape, seed, affine=True, offset=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale + offset
    c = shape[1]
    weight = torch.randn(c, generator=gen) if affine else None
    bias = torch.randn(c, generator=gen) if affine else None
    return x, weight, bias


def assert_matches_reference(y, x, groups, weight, bias, tolerance):
    """Against the float64 reference; the error of stock float32 torch sets the scale of what is fine."""
    exact = group_norm_silu_torch(x.double(), groups, *(None if t is None else t.double() for t in (weight, bias)))
    ours = (y.double() - exact).abs().max().item()
    baseline = (stock(x, groups, weight, bias).double() - exact).abs().max().item()
    assert ours <= max(2 * baseline, tolerance), f"error {ours:.3g} vs stock torch {baseline:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", UNET_SHAPES + AWKWARD_SHAPES)
def test_forward_matches_stock_torch(backend, shape):
    groups = 32 if shape[1] % 32 == 0 else 16
    x, weight, bias = inputs(shape, seed=sum(shape))
    y = group_norm_silu(x, groups, weight, bias, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, stock(x, groups, weight, bias), atol=2e-5, rtol=1e-4)
    assert_matches_reference(y, x, groups, weight, bias, tolerance=1e-5)


def test_empty_batch_goes_to_the_reference():
    x = torch.randn(0, 32, 4, 4)
    assert group_norm_silu(x, 8).shape == x.shape
    with pytest.raises(ValueError, match="non-empty"):
        group_norm_silu(x, 8, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_channel_per_group_and_no_affine(backend):
    x, _, _ = inputs((2, 32, 6, 6), seed=3)
    torch.testing.assert_close(group_norm_silu(x, 32, backend=backend), stock(x, 32, None, None), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_does_not_cancel(backend):
    # mean 1e4, std 1e-1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    x, weight, bias = inputs((2, 64, 8, 8), seed=4, offset=1e4, scale=0.1)
    y = group_norm_silu(x, 32, weight, bias, backend=backend)
    exact = group_norm_silu_torch(x.double(), 32, weight.double(), bias.double())
    stock_error = (stock(x, 32, weight, bias).double() - exact).abs().max()
    error = (y.double() - exact).abs().max()
    assert error <= 2 * stock_error
    if backend == "cpp":  # it keeps the float64 mean's rounding in the shift: near-exact even here
        assert error < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_activations_stay_finite(backend):
    x, _, _ = inputs((2, 32, 4, 4), seed=5)
    weight, bias = torch.full((32,), 200.0), torch.linspace(-500, 500, 32)
    y = group_norm_silu(x, 32, weight, bias, backend=backend)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, stock(x, 32, weight, bias), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, weight, bias = inputs((2, 64, 16, 16), seed=6)
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last memory, NCHW view
    assert not x.is_contiguous()
    torch.testing.assert_close(group_norm_silu(x, 32, weight, bias, backend=backend), stock(x, 32, weight, bias),
                               atol=2e-5, rtol=1e-4)
    sliced = inputs((2, 128, 8, 8), seed=7)[0][:, ::2]
    torch.testing.assert_close(group_norm_silu(sliced, 32, backend=backend), stock(sliced, 32, None, None),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_gradients_match_autograd_through_stock_ops(backend, affine):
    x, weight, bias = inputs((2, 64, 5, 7), seed=8, affine=affine)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    grad_y = torch.randn(x.shape)
    y = group_norm_silu(leaves[0], 32, *(leaves[1:] or [None, None]), backend=backend)
    ref = stock(ref_leaves[0], 32, *(ref_leaves[1:] or [None, None]))
    ours = torch.autograd.grad(y, leaves, grad_y)
    theirs = torch.autograd.grad(ref, ref_leaves, grad_y)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradients_only_when_asked(backend):
    x, weight, bias = inputs((2, 64, 4, 4), seed=9)
    x.requires_grad_()
    y = group_norm_silu(x, 32, weight, bias, backend=backend)  # frozen weights, as in an attack
    y.sum().backward()
    assert x.grad is not None and weight.grad is None and bias.grad is None


@needs_cpp
def test_cpp_second_derivatives_match_the_reference():
    # What a gradient-norm penalty or a Hessian-vector product through the purifier computes.
    x, weight, bias = inputs((2, 32, 3, 3), seed=12)
    direction = torch.randn(x.shape)
    hvps = []
    # Against the readable reference, not the torch backend: the cpp double backward differentiates the latter's ops.
    for op in (group_norm_silu_torch, lambda *t: group_norm_silu(*t, backend="cpp")):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = op(leaves[0], 8, leaves[1], leaves[2])
        (grad_x,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
        hvps.append(torch.autograd.grad((grad_x * direction).sum() + leaves[0].sum(), leaves))
    for ours, reference in zip(*reversed(hvps)):
        assert reference.abs().max() > 1e-2  # a second-order term that can be lost
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_cpp_gradient_agrees_with_finite_differences_of_its_own_forward():
    if not CPP_BUILT:
        pytest.skip("rdp_core._C was not built")
    x, weight, bias = inputs((1, 32, 3, 3), seed=10)
    x.requires_grad_()
    direction = torch.randn(x.shape)
    grad_y = torch.randn(x.shape)
    (grad_x,) = torch.autograd.grad(group_norm_silu(x, 8, weight, bias, backend="cpp"), x, grad_y)
    h = 1e-2
    with torch.no_grad():
        plus = group_norm_silu(x + h * direction, 8, weight, bias, backend="cpp").double()
        minus = group_norm_silu(x - h * direction, 8, weight, bias, backend="cpp").double()
    numeric = ((plus - minus) / (2 * h) * grad_y).sum().item()
    assert (grad_x * direction).sum().item() == pytest.approx(numeric, rel=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_use_the_reference_with_float32_statistics(dtype):
    x, weight, bias = inputs((2, 64, 8, 8), seed=11)
    y = group_norm_silu(x.to(dtype), 32, weight.to(dtype), bias.to(dtype))
    assert y.dtype == dtype
    exact = group_norm_silu_torch(x.double(), 32, weight.double(), bias.double())
    stock_error = (stock(x.to(dtype), 32, weight.to(dtype), bias.to(dtype)).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() <= 2 * stock_error + 1e-12


def test_module_keeps_group_norm_keys_and_matches_it():
    fused = GroupNormSiLU(32, 128)
    plain = torch.nn.GroupNorm(32, 128)
    assert list(fused.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        plain.weight.normal_(), plain.bias.normal_()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 128, 8, 8)
    torch.testing.assert_close(fused(x), F.silu(plain(x)), atol=2e-5, rtol=1e-4)


def test_dispatch_picks_cpp_for_cpu_float32_when_built(monkeypatch):
    monkeypatch.delenv("RDP_CORE_BACKEND", raising=False)
    x = torch.randn(1, 32, 2, 2)
    expected = "cpp" if CPP_BUILT else "torch"
    assert _backend.select("group_norm_silu", x, "auto", ("torch", "cpp")) == expected
    assert _backend.select("group_norm_silu", x.double(), "auto", ("torch",)) == "torch"
    y = group_norm_silu(x.requires_grad_(), 8)  # the public op follows the same choice
    assert type(y.grad_fn).__name__.startswith("_GroupNormActCpp") == CPP_BUILT


@pytest.mark.skipif(not CPP_BUILT, reason="rdp_core._C was not built")
def test_kernel_time_is_visible_to_torch_profiler():
    # A call into rdp_core._C is no aten op: without its own profiler range its time would vanish from tables.
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad(), torch.profiler.profile() as prof:
        group_norm_silu(x, 32, backend="cpp")
    assert "rdp_core::group_norm_act_cpp" in {event.key for event in prof.key_averages()}


def test_environment_forces_a_backend(monkeypatch):
    x = torch.randn(1, 32, 2, 2)
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    assert _backend.select("group_norm_silu", x, "auto", ("torch", "cpp")) == "torch"
    monkeypatch.setattr(_backend, "cpp_extension",
                        lambda: pytest.fail("the cpp backend ran under RDP_CORE_BACKEND=torch"))
    torch.testing.assert_close(group_norm_silu(x, 32), stock(x, 32, None, None), atol=2e-5, rtol=1e-4)
    monkeypatch.setenv("RDP_CORE_BACKEND", "triton")
    with pytest.raises(ValueError, match="triton backend runs on CUDA tensors"):
        group_norm_silu(x, 32)


def test_unavailable_or_unknown_backends_are_errors():
    x = torch.randn(1, 32, 2, 2)
    with pytest.raises(ValueError, match="triton backend runs on CUDA tensors"):
        group_norm_silu(x, 32, backend="triton")
    with pytest.raises(ValueError, match="triton backend takes non-empty float32, float16 or bfloat16"):
        group_norm_silu(x.double(), 32, backend="triton")
    with pytest.raises(ValueError, match="triton backend runs on CUDA tensors"):
        _backend.select("some_op", x, "triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        group_norm_silu(x, 32, backend="cuda")
    with pytest.raises(ValueError, match="cpp backend takes non-empty float32 CPU tensors"):
        group_norm_silu(x.double(), 32, backend="cpp")


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4), 2), "shape \\(N, C, ...\\)"),
        ((torch.randn(2, 30, 4), 32), "cannot be split"),
        ((torch.randn(2, 32, 4), 0), "cannot be split"),
        ((torch.randn(2, 32, 4), 8, torch.ones(16)), "weight must have shape \\(32,\\)"),
        ((torch.randn(2, 32, 4), 8, None, torch.ones(32, 1)), "bias must have shape"),
    ],
)
def test_bad_arguments_are_explained(args, message):
    with pytest.raises(ValueError, match=message):
        group_norm_silu(*args)


@needs_cpp
def test_extension_rejects_wrong_buffers():
    ext = _backend.cpp_extension()
    x, y = torch.randn(2, 8, 3), torch.empty(2, 8, 3)
    mean, rstd = torch.empty(4), torch.empty(4)

    def call(x=x, y=y, mean=mean, rstd=rstd, weight=None, groups=2):
        ext.group_norm_silu_fwd(x.numpy(), weight, None, y.numpy(), mean.numpy(), rstd.numpy(), groups, 1e-5)

    with pytest.raises(ValueError, match="x: expected float32"):
        call(x=x.double())
    with pytest.raises(ValueError, match="x: expected a C-contiguous"):
        call(x=x.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="y: expected 48 elements, got 40"):
        call(y=torch.empty(2, 4, 5))
    with pytest.raises(ValueError, match="y: expected the shape of x"):
        call(y=torch.empty(2, 3, 8))
    with pytest.raises(ValueError, match="mean: expected 4 elements"):
        call(mean=torch.empty(2))
    with pytest.raises(ValueError, match="weight: expected 8 elements"):
        call(weight=torch.ones(4).numpy())
    with pytest.raises(ValueError, match="8 channels cannot be split into 3"):
        call(groups=3)
    with pytest.raises(ValueError, match="shape \\(N, C, \\*spatial\\)"):
        call(x=torch.randn(8), y=torch.empty(8))
    with pytest.raises(ValueError, match="no spatial elements"):
        call(x=torch.randn(2, 8, 0), y=torch.empty(2, 8, 0))


@needs_cpp
def test_extension_writes_the_group_statistics():
    x = torch.randn(3, 64, 5, 5) * 3 + 2
    y, mean, rstd = torch.empty_like(x), torch.empty(3 * 16), torch.empty(3 * 16)
    _backend.cpp_extension().group_norm_silu_fwd(x.numpy(), None, None, y.numpy(), mean.numpy(), rstd.numpy(), 16, 1e-5)
    groups = x.double().reshape(3 * 16, -1)
    torch.testing.assert_close(mean.double(), groups.mean(dim=1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (groups.var(dim=1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-6)


def test_extension_is_built():
    if os.environ.get("RDP_CORE_REQUIRE_EXT") != "1":
        pytest.skip("set RDP_CORE_REQUIRE_EXT=1 where the extension must have been built (CI does)")
    assert CPP_BUILT, "rdp_core._C was not built on a machine where it must be"


def test_without_the_extension_ops_fall_back_to_torch_and_warn_once(tmp_path):
    # A fresh interpreter in which `import rdp_core._C` fails, as after a failed compile.
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['rdp_core._C'] = None\n"
        "from rdp_core import _backend\n"
        "from rdp_core.ops import group_norm_silu\n"
        "x = torch.randn(2, 32, 4, 4)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    group_norm_silu(x, 8)\n"
        "    group_norm_silu(x, 8)\n"
        "assert [str(w.message)[:22] for w in caught] == ['rdp_core._C is not bui'], caught\n"
        "assert _backend.select('group_norm_silu', x, 'auto', ('torch', 'cpp')) == 'torch'\n"
        "try:\n"
        "    group_norm_silu(x, 8, backend='cpp')\n"
        "except ValueError as err:\n"
        "    assert 'was not built' in str(err)\n"
        "else:\n"
        "    raise AssertionError('an explicit cpp request must fail without the extension')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # import the installed package


# --- The general op: plain group norm and ADM's scale-shift variant, and the C++ backward -----------------------

VARIANTS = [("silu", False), (None, False), ("silu", True), (None, True)]
VARIANT_IDS = ["silu", "plain", "silu-scale-shift", "plain-scale-shift"]


def stock_act(x, groups, weight, bias, scale=None, shift=None, activation="silu", eps=1e-5):
    """The same function from stock torch ops, as a user would write it (ADM's ResBlock for the FiLM)."""
    y = F.group_norm(x, groups, weight, bias, eps)
    trailing = (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.reshape(scale.shape[:2] + trailing)) + shift.reshape(shift.shape[:2] + trailing)
    return F.silu(y) if activation == "silu" else y


def film(shape, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(shape[:2], generator=gen) * 0.5, torch.randn(shape[:2], generator=gen)


def variant_inputs(shape, seed, with_film, **kwargs):
    x, weight, bias = inputs(shape, seed, **kwargs)
    scale, shift = film(shape, seed) if with_film else (None, None)
    return x, weight, bias, scale, shift


def reference_grads(tensors, groups, grad_y, activation, dtype=torch.float64):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    y = group_norm_act_torch(leaves[0], groups, leaves[1], leaves[2], 1e-5, leaves[3], leaves[4], activation)
    present = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, present, grad_y.to(dtype))


def stock_grads(tensors, groups, grad_y, activation):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y = stock_act(leaves[0], groups, leaves[1], leaves[2], leaves[3], leaves[4], activation)
    return torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)


def assert_grads_match(ours, exact, stock_float32, factor=3.0, floor=2e-5):
    """Each gradient within `factor` times stock float32 torch's error against float64 (or a tiny floor)."""
    for name, a, e, s in zip(("x", "weight", "bias", "scale", "shift"), ours, exact, stock_float32):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        error = (a.double() - e).abs().max().item()
        baseline = (s.double() - e).abs().max().item()
        assert error <= max(factor * baseline, floor * max(1.0, e.abs().max().item())), \
            f"grad {name}: error {error:.3g} vs stock torch {baseline:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation, with_film", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(2, 128, 16, 16), (2, 64, 7, 7), (3, 32, 13, 17), (2, 32, 5), (1, 32, 2, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_variant_forward_and_backward_match_stock_and_float64(backend, activation, with_film, shape):
    check_variant(backend, activation, with_film, shape, torch.contiguous_format)


@needs_cpp
@pytest.mark.parametrize("activation, with_film", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(2, 128, 32, 32), (1, 512, 8, 8), (3, 96, 13, 17), (2, 32, 1, 300), (1, 32, 2, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpp_channels_last_forward_and_backward(activation, with_film, shape):
    # The layout of a channels-last model on the CPU (rdp_core.models.engine_layout): NHWC read in place, in
    # position chunks whose moments are merged (unequal chunks at 1x300, several at 8x8 with 512 channels).
    check_variant("cpp", activation, with_film, shape, torch.channels_last)


def check_variant(backend, activation, with_film, shape, memory_format):
    groups = 32 if shape[1] >= 64 else 16
    tensors = variant_inputs(shape, seed=sum(shape) + 7, with_film=with_film)
    tensors = (tensors[0].contiguous(memory_format=memory_format),) + tensors[1:]
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    y = group_norm_act(leaves[0], groups, leaves[1], leaves[2], 1e-5, leaves[3], leaves[4], activation, backend)
    grad_y = torch.randn(shape)
    exact_y, exact = reference_grads(tensors, groups, grad_y, activation)
    stock_y = stock_act(tensors[0], groups, *tensors[1:], activation)
    assert y.shape == shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=memory_format)
    assert (y.double() - exact_y).abs().max() <= max(2 * (stock_y.double() - exact_y).abs().max(), 1e-5)
    ours = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    assert_grads_match(ours, exact, stock_grads(tensors, groups, grad_y, activation))


@needs_cpp
@pytest.mark.parametrize("activation, with_film", VARIANTS, ids=VARIANT_IDS)
def test_cpp_backward_runs_the_kernel_not_the_reference(monkeypatch, activation, with_film):
    tensors = variant_inputs((2, 32, 6, 6), seed=20, with_film=with_film)
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    y = group_norm_act(leaves[0], 8, leaves[1], leaves[2], 1e-5, leaves[3], leaves[4], activation, "cpp")
    monkeypatch.setattr(gns_module, "group_norm_act_torch", lambda *a, **k: pytest.fail("backward recomputed"))
    grad_y = torch.randn(y.shape)
    ours = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    monkeypatch.undo()
    exact = reference_grads(tensors, 8, grad_y, activation)[1]
    assert_grads_match(ours, exact, stock_grads(tensors, 8, grad_y, activation))


@needs_cpp
@pytest.mark.parametrize("wanted", ["x", "weight", "scale", "shift", "x+bias"])
def test_cpp_backward_returns_only_the_gradients_asked_for(wanted):
    tensors = variant_inputs((2, 32, 4, 4), seed=21, with_film=True)
    names = ("x", "weight", "bias", "scale", "shift")
    leaves = [t.clone().requires_grad_(name in wanted.split("+")) for name, t in zip(names, tensors)]
    y = group_norm_act(*leaves[:1], 8, *leaves[1:3], 1e-5, *leaves[3:], activation="silu", backend="cpp")
    grad_y = torch.randn(y.shape)
    y.backward(grad_y)
    exact = dict(zip(names, reference_grads(tensors, 8, grad_y, "silu")[1]))
    for name, leaf in zip(names, leaves):
        if name in wanted.split("+"):
            torch.testing.assert_close(leaf.grad.double(), exact[name], atol=1e-4, rtol=1e-4)
        else:
            assert leaf.grad is None, name


@needs_cpp
def test_cpp_backward_skips_parameter_gradients_for_frozen_weights(monkeypatch):
    # An attack's backward: only grad_x; the extension must be handed no parameter-gradient buffers.
    calls = []
    ext = _backend.cpp_extension()

    class Spy:
        group_norm_act_fwd = staticmethod(ext.group_norm_act_fwd)

        @staticmethod
        def group_norm_act_bwd(*args):
            calls.append(args[9:13])
            return ext.group_norm_act_bwd(*args)

    monkeypatch.setattr(_backend, "cpp_extension", lambda: Spy)
    x, weight, bias = inputs((2, 32, 4, 4), seed=22)
    x.requires_grad_()
    group_norm_silu(x, 8, weight, bias, backend="cpp").sum().backward()
    assert calls == [(None, None, None, None)]
    assert x.grad is not None and weight.grad is None


@needs_cpp
def test_cpp_backward_with_non_contiguous_input_and_grad():
    x, weight, bias = inputs((2, 64, 9, 9), seed=23)
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()
    grad_y = torch.randn(2, 9, 9, 64).permute(0, 3, 1, 2)
    assert not x.is_contiguous() and not grad_y.is_contiguous()
    (ours,) = torch.autograd.grad(group_norm_silu(x, 32, weight, bias, backend="cpp"), x, grad_y)
    (theirs,) = torch.autograd.grad(stock(x, 32, weight, bias), x, grad_y)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpp_large_mean_does_not_cancel_in_either_layout(memory_format):
    x, weight, bias = inputs((2, 64, 24, 24), seed=4, offset=1e4, scale=0.1)
    y = group_norm_silu(x.contiguous(memory_format=memory_format), 32, weight, bias, backend="cpp")
    exact = group_norm_silu_torch(x.double(), 32, weight.double(), bias.double())
    assert (y.double() - exact).abs().max() < 1e-4


@needs_cpp
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_cpp_backward_large_mean(activation, memory_format):
    # mean 1e3, std 1: the float32 mean/rstd the forward saves still give gradients as good as stock torch's.
    tensors = variant_inputs((2, 64, 8, 8), seed=24, with_film=True, offset=1e3)
    tensors = (tensors[0].contiguous(memory_format=memory_format),) + tensors[1:]
    leaves = [t.clone().requires_grad_() for t in tensors]
    y = group_norm_act(leaves[0], 32, *leaves[1:3], 1e-5, *leaves[3:], activation=activation, backend="cpp")
    grad_y = torch.randn(y.shape)
    ours = torch.autograd.grad(y, leaves, grad_y)
    exact = reference_grads(tensors, 32, grad_y, activation)[1]
    assert_grads_match(ours, exact, stock_grads(tensors, 32, grad_y, activation))


@needs_cpp
@pytest.mark.parametrize("activation", ["silu", None])
def test_cpp_double_backward_through_scale_shift_is_exact(activation):
    # create_graph=True takes a differentiable VJP: second derivatives, also to scale and shift.
    tensors = variant_inputs((2, 32, 3, 3), seed=25, with_film=True)
    direction = torch.randn(tensors[0].shape)
    results = []
    for op in (group_norm_act_torch, functools.partial(group_norm_act, backend="cpp")):
        leaves = [t.clone().requires_grad_() for t in tensors]
        y = op(leaves[0], 8, *leaves[1:3], 1e-5, *leaves[3:], activation=activation)
        (grad_x,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad((grad_x * direction).sum(), leaves))
    for ours, reference in zip(results[1], results[0]):
        assert reference.abs().max() > 1e-2
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@needs_cpp
def test_cpp_plain_group_norm_matches_stock_on_awkward_shapes():
    for shape, groups in [((3, 96, 13, 17), 32), ((2, 16, 7, 7), 16), ((4, 8), 2)]:
        x, weight, bias = inputs(shape, seed=sum(shape))
        torch.testing.assert_close(group_norm(x, groups, weight, bias, 1e-6, backend="cpp"),
                                   F.group_norm(x, groups, weight, bias, 1e-6), atol=2e-5, rtol=1e-4)


def test_scale_shift_shapes_and_activation_are_checked():
    x = torch.randn(2, 32, 4, 4)
    scale = torch.randn(2, 32, 1, 1)
    torch.testing.assert_close(group_norm_act(x, 8, scale=scale, shift=scale, activation=None),
                               stock_act(x, 8, None, None, scale, scale, None), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="scale must have shape \\(2, 32\\)"):
        group_norm_act(x, 8, scale=torch.randn(32))
    with pytest.raises(ValueError, match="shift must have shape"):
        group_norm_act(x, 8, shift=torch.randn(2, 32, 2, 1))
    with pytest.raises(ValueError, match="activation must be one of"):
        group_norm_act(x, 8, activation="gelu")
    with pytest.raises(ValueError, match="cpp backend takes non-empty float32"):
        group_norm_act(x, 8, scale=scale.double(), backend="cpp")


def test_group_norm_act_module_keeps_keys_and_takes_scale_shift():
    plain = torch.nn.GroupNorm(8, 32, eps=1e-6)
    fused = GroupNormAct(8, 32, eps=1e-6, activation=None)
    assert list(fused.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        plain.weight.normal_(), plain.bias.normal_()
    fused.load_state_dict(plain.state_dict())
    x, scale, shift = torch.randn(2, 32, 5, 5), torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(fused(x), plain(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused(x, scale, shift), stock_act(x, 8, plain.weight, plain.bias, scale, shift, None,
                                                                  1e-6), atol=2e-5, rtol=1e-4)
    assert "activation=None" in repr(fused)


@needs_cpp
def test_extension_backward_rejects_wrong_buffers():
    ext = _backend.cpp_extension()
    x, grad = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    mean, rstd = torch.zeros(4), torch.ones(4)

    def call(grad_x=torch.empty(2, 8, 3), grad_weight=None, grad_scale=None, mean=mean, scale=None):
        ext.group_norm_act_bwd(x.numpy(), None, None, scale, None, mean.numpy(), rstd.numpy(), grad.numpy(),
                               grad_x.numpy(), grad_weight, None, grad_scale, None, 2, True)

    with pytest.raises(ValueError, match="grad_x: expected the shape of x"):
        call(grad_x=torch.empty(2, 3, 8))
    with pytest.raises(ValueError, match="grad_weight: expected 8 elements"):
        call(grad_weight=torch.empty(4).numpy())
    with pytest.raises(ValueError, match="grad_scale: expected 16 elements"):
        call(grad_scale=torch.empty(8).numpy())
    with pytest.raises(ValueError, match="scale: expected 16 elements"):
        call(scale=torch.empty(2, 4).numpy())
    with pytest.raises(ValueError, match="mean: expected 4 elements"):
        call(mean=torch.empty(3))


@needs_cpp
def test_cpp_gradients_reach_scale_shift_given_as_chunks_of_an_embedding():
    # ADM's ResBlock: scale, shift = emb_out.chunk(2, dim=1), (N, C, 1, 1) strided views of one tensor.
    x, weight, bias = inputs((2, 32, 5, 5), seed=26)
    emb_out = torch.randn(2, 64, 1, 1, requires_grad=True)
    grad_y = torch.randn(x.shape)
    grads = []
    for backend in ("torch", "cpp"):
        scale, shift = emb_out.chunk(2, dim=1)
        assert not scale.is_contiguous()
        y = group_norm_act(x, 8, weight, bias, 1e-5, scale, shift, activation="silu", backend=backend)
        grads.append(torch.autograd.grad(y, emb_out, grad_y)[0])
    assert grads[0].abs().max() > 1e-2
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
