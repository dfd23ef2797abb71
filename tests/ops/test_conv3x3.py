"""conv3x3: the Winograd cpp backend against the float64 definition and stock float32 F.conv2d."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdp_core import _backend
from rdp_core.ops.conv3x3 import (Conv2d, WinogradFilters, adjoint_filters, conv3x3, conv3x3_torch,
                                  winograd_weights)

CPP_BUILT = _backend.cpp_extension() is not None
needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason="rdp_core._C was not built")
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]

# (N, C, H, W, K): the DDPM++ CIFAR-10 shapes, and awkward ones (sides off the 4-pixel tile, a single pixel,
# channel counts off the 64-channel blocks and the 8-row blocks of the products).
UNET_SHAPES = [(2, 128, 32, 32, 128), (2, 256, 16, 16, 256), (3, 384, 8, 8, 256), (1, 512, 4, 4, 256)]
AWKWARD_SHAPES = [(2, 64, 7, 13, 32), (3, 72, 5, 6, 64), (1, 65, 1, 1, 32), (5, 96, 9, 3, 96), (1, 200, 2, 11, 160)]

# The Winograd error is larger than the direct convolution's (module docstring): allowed, relative to the largest
# output, this much; the measured figures are near 1e-5.
WINOGRAD_RTOL = 6e-5


def tensors(n, c, h, w, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=gen)
    return x, weight, bias


def max_relative_error(value, exact):
    return ((value.double() - exact).abs().max() / exact.abs().max()).item()


def allowed(backend, value, exact, stock):
    """The error bound: stock float32's (at most twice it) for torch, the Winograd tolerance for cpp."""
    stock_error = max_relative_error(stock, exact)
    bound = 2 * stock_error + 1e-7 if backend == "torch" else WINOGRAD_RTOL
    return max_relative_error(value, exact) <= bound, (max_relative_error(value, exact), stock_error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", UNET_SHAPES + AWKWARD_SHAPES, ids=str)
def test_forward_matches_the_definition(backend, shape):
    x, weight, bias = tensors(*shape, seed=sum(shape))
    out = conv3x3(x, weight, bias, backend=backend)
    assert out.shape == (shape[0], shape[4], shape[2], shape[3]) and out.dtype == torch.float32
    exact = conv3x3_torch(x.double(), weight.double(), bias.double())
    ok, errors = allowed(backend, out, exact, conv3x3_torch(x, weight, bias))
    assert ok, f"error {errors[0]:.3g} (stock float32 {errors[1]:.3g})"


@needs_cpp
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpp_reads_any_layout_and_no_bias(memory_format):
    x, weight, _ = tensors(2, 64, 10, 10, 64, seed=3)
    x = x.contiguous(memory_format=memory_format)
    strided = x[:, :, 1:-1, ::2]  # not contiguous in either layout
    for inputs in (x, strided):
        exact = conv3x3_torch(inputs.double(), weight.double())
        assert max_relative_error(conv3x3(inputs, weight, backend="cpp"), exact) <= WINOGRAD_RTOL


def gradients(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 128, 16, 16, 128), (2, 64, 7, 13, 64), (3, 72, 5, 6, 64)], ids=str)
def test_gradients_match_the_definition(backend, shape):
    # (2, 64, 7, 13, 64) takes the Winograd input gradient; C = 72 is no multiple of 32, so torch's one.
    x, weight, bias = tensors(*shape, seed=sum(shape) + 1)
    grad_out = torch.randn(shape[0], shape[4], shape[2], shape[3], generator=torch.Generator().manual_seed(1))
    ours = gradients(lambda *t: conv3x3(*t, backend=backend), (x, weight, bias), grad_out)
    exact = gradients(conv3x3_torch, (x.double(), weight.double(), bias.double()), grad_out.double())
    stock = gradients(conv3x3_torch, (x, weight, bias), grad_out)
    for name, a, e, s in zip(("x", "weight", "bias"), ours, exact, stock):
        ok, errors = allowed(backend, a, e, s)
        assert ok, f"d{name}: error {errors[0]:.3g} (stock float32 {errors[1]:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_for_inputs_that_ask(backend):
    x, weight, bias = tensors(1, 64, 6, 6, 32, seed=4)
    x.requires_grad_()
    conv3x3(x, weight, bias, backend=backend).sum().backward()
    assert x.grad is not None and weight.grad is None and bias.grad is None


@needs_cpp
def test_cpp_second_derivatives_are_exact():
    # The adjoint's guidance terms differentiate a backward: it must itself be differentiable, and exact.
    # Its input gradient is itself a Winograd convolution, so the bound is the Winograd one, against float64.
    x, weight, bias = tensors(2, 64, 5, 7, 64, seed=5)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    hvps = []
    for fn, dtype in ((lambda *t: conv3x3(*t, backend="cpp"), torch.float32), (conv3x3_torch, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        (grad_x,) = torch.autograd.grad(fn(*leaves).square().sum(), leaves[:1], create_graph=True)
        hvps.append(torch.autograd.grad((grad_x * direction.to(dtype)).sum(), leaves))
    for ours, exact in zip(*hvps):
        assert exact.abs().max() > 1e-2  # a second-order term that could be lost
        assert max_relative_error(ours, exact) <= WINOGRAD_RTOL


@needs_cpp
def test_cpp_backward_under_create_graph_is_the_plain_backward():
    # The adjoint recomputes each step's guidance gradient under create_graph: that backward must give the
    # values the plain one gives (the same Winograd input-gradient convolution, not a second forward and a
    # direct convolution), and stay differentiable.
    x, weight, bias = tensors(2, 64, 8, 8, 64, seed=6)
    grad_y = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    grads = []
    for create_graph in (False, True):
        leaf = x.clone().requires_grad_()
        y = conv3x3(leaf, weight, bias, backend="cpp")
        grads.append(torch.autograd.grad(y, leaf, grad_y, create_graph=create_graph)[0])
    assert torch.equal(grads[0], grads[1].detach())
    assert grads[1].requires_grad  # a graph back to grad_y: the input gradient is linear in it
    (second,) = torch.autograd.grad(grads[1].square().sum(), grad_y)
    exact = conv3x3_torch(conv3x3_torch(grad_y.detach().double(), adjoint_filters(weight).double()) * 2,
                          weight.double())
    assert max_relative_error(second, exact) <= WINOGRAD_RTOL


@needs_cpp
@pytest.mark.parametrize("portable", [False, True])
def test_portable_and_avx512_products_agree_with_the_definition(portable):
    # The AVX-512 kernel runs on CPUs that have it; the portable loop everywhere else, forced here. 83 images of
    # 5x5 make 332 tiles: several chunks at 512 channels, rows off the 8-row block.
    from rdp_core.ops.conv3x3 import _winograd

    x, weight, bias = tensors(83, 512, 5, 5, 64, seed=6)
    out = _winograd(x, winograd_weights(weight), bias, portable=portable)
    exact = conv3x3_torch(x.double(), weight.double(), bias.double())
    assert max_relative_error(out, exact) <= WINOGRAD_RTOL


def test_filter_transform_matches_the_data_transforms():
    # One filter and one 6x6 tile by hand: A^T [(G g G^T) * (B^T d B)] A is the valid 3x3 correlation of d.
    from rdp_core.ops.conv3x3 import _FILTER_TRANSFORM as G

    b_t = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                        [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
    a_t = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                       dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    g, d = torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randn(6, 6, generator=gen,
                                                                              dtype=torch.float64)
    y = a_t @ ((G @ g @ G.T) * (b_t @ d @ b_t.T)) @ a_t.T
    torch.testing.assert_close(y, F.conv2d(d[None, None], g[None, None])[0, 0])


@needs_cpp
def test_filters_are_repacked_after_the_weight_changes():
    x, weight, bias = tensors(1, 64, 8, 8, 32, seed=8)
    filters = WinogradFilters()
    first = conv3x3(x, weight, bias, backend="cpp", filters=filters)
    with torch.no_grad():
        weight.mul_(2)  # in place: same storage, new version
    second = conv3x3(x, weight, bias, backend="cpp", filters=filters)
    torch.testing.assert_close(second - bias[:, None, None], 2 * (first - bias[:, None, None]), atol=1e-4,
                               rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_filters_are_repacked_after_a_write_through_data(memory_format):
    # DiffPure's EMA swap writes `p.data.copy_(ema)`, which bumps no version counter.
    conv = Conv2d(64, 32, 3, padding=1).to(memory_format=memory_format)
    x = torch.randn(1, 64, 8, 8)
    before = conv(x)
    swapped = torch.randn_like(conv.weight) * 0.1
    conv.weight.data.copy_(swapped)
    torch.testing.assert_close(conv(x), conv3x3_torch(x, swapped, conv.bias), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, conv(x))


@pytest.mark.parametrize("config", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=1), dict(kernel_size=3, padding=1, groups=2)], ids=str)
def test_module_is_nn_conv2d_with_its_keys(config):
    torch.manual_seed(9)
    ours, stock = Conv2d(64, 64, **config), nn.Conv2d(64, 64, **config)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 9, 9)
    torch.testing.assert_close(ours(x), stock(x), atol=1e-4, rtol=1e-4)


def test_dispatch(monkeypatch):
    monkeypatch.delenv("RDP_CORE_BACKEND", raising=False)
    x, weight, bias = tensors(1, 64, 4, 4, 32, seed=10)
    assert (type(conv3x3(x.requires_grad_(), weight, bias).grad_fn).__name__.startswith("_Conv3x3Cpp")
            == CPP_BUILT)
    small = tensors(1, 32, 4, 4, 32, seed=11)  # 32 input channels: the direct convolution serves better
    assert not type(conv3x3(small[0].requires_grad_(), *small[1:]).grad_fn).__name__.startswith("_Conv3x3")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # precision="bf16": the convolution autocast asked for
        assert conv3x3(x, weight, bias).dtype == torch.bfloat16
    for forced in ("cpp", "triton"):  # forcing the other ops' backends leaves every convolution working
        monkeypatch.setenv("RDP_CORE_BACKEND", forced)
        for inputs in ((x, weight, bias), small):
            torch.testing.assert_close(conv3x3(*inputs), conv3x3_torch(*inputs), atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    monkeypatch.setattr(_backend, "cpp_extension", lambda: pytest.fail("cpp ran under RDP_CORE_BACKEND=torch"))
    torch.testing.assert_close(conv3x3(x, weight, bias), conv3x3_torch(x, weight, bias))


def test_bad_arguments_are_explained():
    x, weight, bias = tensors(1, 64, 4, 4, 32, seed=12)
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        conv3x3(x, weight[:, :16], bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        conv3x3(x, weight, bias[:5])
    if CPP_BUILT:
        with pytest.raises(ValueError, match="float32"):
            conv3x3(x.double(), weight.double(), bias.double(), backend="cpp")
        with pytest.raises(ValueError, match="multiple of 32 output channels and at least 64 input"):
            conv3x3(x, weight[:16], bias[:16], backend="cpp")
