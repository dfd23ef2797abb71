"""GroupNorm+SiLU: every backend against stock torch ops and the float64 reference."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.ops import GroupNormSiLU, group_norm_silu, group_norm_silu_torch

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
    for backend in ("torch", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = group_norm_silu(leaves[0], 8, leaves[1], leaves[2], backend=backend)
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
    assert type(y.grad_fn).__name__.startswith("_GroupNormSiLUCpp") == CPP_BUILT


def test_environment_forces_a_backend(monkeypatch):
    x = torch.randn(1, 32, 2, 2)
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    assert _backend.select("group_norm_silu", x, "auto", ("torch", "cpp")) == "torch"
    monkeypatch.setattr(_backend, "cpp_extension", lambda: pytest.fail("the cpp backend ran under RDP_CORE_BACKEND=torch"))
    torch.testing.assert_close(group_norm_silu(x, 32), stock(x, 32, None, None), atol=2e-5, rtol=1e-4)
    monkeypatch.setenv("RDP_CORE_BACKEND", "triton")
    with pytest.raises(ValueError, match="no 'triton' backend"):
        group_norm_silu(x, 32)


def test_unavailable_or_unknown_backends_are_errors():
    x = torch.randn(1, 32, 2, 2)
    with pytest.raises(ValueError, match="no 'triton' backend"):
        group_norm_silu(x, 32, backend="triton")
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


def test_without_the_extension_ops_fall_back_to_torch_and_warn_once():
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
    subprocess.run([sys.executable, "-c", code], check=True)
