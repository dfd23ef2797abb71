"""Attention: every CPU backend against the float64 reference and stock SDPA, forward and backward."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.ops.attention import attention, attention_reference

CPP_BUILT = _backend.cpp_extension() is not None
needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason="rdp_core._C was not built")
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]

# UNet shapes (DDPM++: one head of 256 channels at 16x16; ADM: heads of 64 over 8x8 to 32x32) and awkward ones
# (token counts off every block size, head_dims off every vector width).
UNET_SHAPES = [(2, 1, 256, 256), (2, 4, 256, 64), (1, 2, 1024, 64), (2, 1, 64, 512), (2, 1, 64, 128)]
AWKWARD_SHAPES = [(3, 1, 49, 32), (2, 2, 221, 17), (1, 3, 7, 5), (2, 1, 1, 64), (1, 1, 65, 80)]


def randn(shape, seed, count=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


def reference64(q, k, v):
    return attention_reference(q.double(), k.double(), v.double())


def gradients(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", UNET_SHAPES + AWKWARD_SHAPES, ids=str)
def test_forward_matches_the_reference(backend, shape):
    q, k, v = randn(shape, seed=sum(shape))
    out = attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    exact = reference64(q, k, v)
    error = (out.double() - exact).abs().max().item()
    stock = (F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max().item()
    assert error <= max(2 * stock, 2e-6), f"error {error:.3g} vs stock SDPA {stock:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 256, 256), (2, 4, 64, 64)] + AWKWARD_SHAPES, ids=str)
def test_gradients_match_the_reference(backend, shape):
    q, k, v, grad_out = randn(shape, seed=sum(shape) + 1, count=4)
    ours = gradients(lambda *t: attention(*t, backend=backend), q, k, v, grad_out)
    exact = gradients(attention_reference, q.double(), k.double(), v.double(), grad_out.double())
    stock = gradients(F.scaled_dot_product_attention, q, k, v, grad_out)
    for name, a, s, e in zip("qkv", ours, stock, exact):
        error = (a.double() - e).abs().max().item()
        stock_error = (s.double() - e).abs().max().item()
        assert error <= max(3 * stock_error, 5e-6), f"d{name}: error {error:.3g} vs stock SDPA {stock_error:.3g}"


def test_reference_gradients_in_float64_match_autograd_through_plain_ops():
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(2, 1, 16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(2, 1, 16, 8, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(attention(*leaves), leaves, grad_out)  # float64: the torch backend
    ref = torch.autograd.grad(F.softmax(leaves[0] @ leaves[1].transpose(-1, -2) / 8 ** 0.5, -1) @ leaves[2], leaves,
                              grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def unet_views(kind, b=2, c=64, hw=49, heads=2):
    """q, k, v as the UNets hand them over: transposed (b, 1, c, hw) views (DDPM++) or slices of one
    transposed qkv tensor (ADM's legacy layout); none is contiguous."""
    if kind == "ncsnpp":
        q, k, v = (t.reshape(b, 1, c, hw).transpose(-1, -2) for t in randn((b, c, hw), seed=5))
    else:
        (qkv,) = randn((b, heads, 3 * c, hw), seed=6, count=1)
        q, k, v = qkv.transpose(-1, -2).split(c, dim=-1)
    assert not any(t.is_contiguous() for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ncsnpp", "adm"])
def test_strided_unet_views(backend, kind):
    q, k, v = unet_views(kind)
    torch.testing.assert_close(attention(q, k, v, backend=backend).double(), reference64(q, k, v), atol=2e-6,
                               rtol=1e-5)
    grad_out = torch.randn(q.shape).transpose(0, 1).contiguous().transpose(0, 1)  # strided as well
    ours = gradients(lambda *t: attention(*t, backend=backend), q, k, v, grad_out)
    exact = gradients(attention_reference, q.double(), k.double(), v.double(), grad_out.double())
    for a, e in zip(ours, exact):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_for_inputs_that_ask(backend):
    q, k, v = randn((1, 1, 20, 16), seed=7)
    q.requires_grad_()
    attention(q, k, v, backend=backend).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_through_a_retained_graph(backend):
    q, k, v = (t.requires_grad_() for t in randn((1, 2, 33, 16), seed=9))
    out = attention(q, k, v, backend=backend).square().sum()
    first = torch.autograd.grad(out, (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_are_exact(backend):
    # A gradient penalty / Hessian-vector product (AGDM's adjoint is one): the backward runs with grad enabled
    # and must be differentiable. Stock SDPA's CPU flash kernel has no second derivative: the torch backend
    # must not hand it out. 64 tokens, head_dim 32: a shape the flash kernel takes.
    q, k, v, direction = randn((2, 2, 64, 32), seed=8, count=4)
    hvps = []
    for fn in (lambda *t: attention(*t, backend=backend), attention_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
        hvps.append(torch.autograd.grad(sum((g * direction).sum() for g in grads), leaves))
    for ours, reference in zip(*hvps):
        assert reference.abs().max() > 1e-2  # a second-order term that could be lost
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@needs_cpp
def test_cpp_kernel_gradient_agrees_with_finite_differences():
    q, k, v, grad_out, direction = randn((1, 2, 33, 24), seed=9, count=5)
    q = q.double().requires_grad_()
    (grad_q,) = torch.autograd.grad(attention(q.float(), k, v, backend="cpp"), q, grad_out)
    h = 1e-2
    with torch.no_grad():
        plus, minus = (attention((q + s * h * direction).float(), k, v, backend="cpp").double() for s in (1, -1))
    numeric = ((plus - minus) / (2 * h) * grad_out).sum().item()
    assert (grad_q * direction).sum().item() == pytest.approx(numeric, rel=2e-3)


@needs_cpp
def test_cpp_backward_splits_a_head_across_threads(tmp_path):
    # With fewer heads than threads the backward splits each head's keys into ranges with partial dQs that it
    # sums; OMP_NUM_THREADS (read at start-up) forces that on any machine.
    code = (
        "import torch\n"
        "from rdp_core.ops.attention import attention, attention_reference\n"
        "q, k, v, g = torch.randn(4, 1, 1, 200, 24, generator=torch.Generator().manual_seed(0)).unbind(0)\n"
        "def grads(fn, dtype):\n"
        "    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]\n"
        "    return torch.autograd.grad(fn(*leaves), leaves, g.to(dtype))\n"
        "for a, b in zip(grads(lambda *t: attention(*t, backend='cpp'), torch.float32),\n"
        "                grads(attention_reference, torch.float64)):\n"
        "    torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="4")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)  # not the checkout: `python -c` would import its unbuilt tree
    assert result.returncode == 0, result.stderr


@needs_cpp
def test_cpp_lse_is_the_row_logsumexp():
    q, k, v = randn((2, 3, 40, 16), seed=10)
    out, lse = torch.empty(q.shape), torch.empty(2 * 3 * 40)
    _backend.cpp_extension().attention_fwd(q.numpy(), k.numpy(), v.numpy(), out.numpy(), lse.numpy())
    exact = (q.double() @ k.double().transpose(-1, -2) / 4.0).logsumexp(dim=-1).flatten()
    torch.testing.assert_close(lse.double(), exact, atol=1e-5, rtol=1e-6)


@needs_cpp
def test_cpp_extension_rejects_bad_buffers():
    ext = _backend.cpp_extension()
    q = torch.randn(1, 1, 8, 4)
    out, lse = torch.empty(q.shape), torch.empty(8)
    with pytest.raises(ValueError, match="float32"):
        ext.attention_fwd(q.double().numpy(), q.numpy(), q.numpy(), out.numpy(), lse.numpy())
    with pytest.raises(ValueError, match="shape"):
        ext.attention_fwd(q.numpy(), q[:, :, :4].numpy(), q.numpy(), out.numpy(), lse.numpy())
    with pytest.raises(ValueError, match="lse"):
        ext.attention_fwd(q.numpy(), q.numpy(), q.numpy(), out.numpy(), torch.empty(7).numpy())


def test_dispatch_picks_cpp_for_cpu_float32_when_built(monkeypatch):
    monkeypatch.delenv("RDP_CORE_BACKEND", raising=False)
    q, k, v = randn((1, 1, 8, 4), seed=11)
    out = attention(q.requires_grad_(), k, v)
    assert type(out.grad_fn).__name__.startswith("_AttentionCpp") == CPP_BUILT
    assert not type(attention(q.double(), k.double(), v.double()).grad_fn).__name__.startswith("_AttentionCpp")


def test_environment_forces_the_torch_backend(monkeypatch):
    q, k, v = randn((1, 1, 8, 4), seed=12)
    monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
    monkeypatch.setattr(_backend, "cpp_extension", lambda: pytest.fail("cpp ran under RDP_CORE_BACKEND=torch"))
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_reference_is_softmax_attention():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    manual = F.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    torch.testing.assert_close(attention_reference(q, k, v), manual)


def test_bad_shapes_and_backends_are_explained():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, q[..., :4], q)
    with pytest.raises(ValueError, match="one shape"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="float32"):
        attention(q.double(), q.double(), q.double(), backend="cpp")
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, q, q, backend="fast")


def test_extension_is_built():
    if os.environ.get("RDP_CORE_REQUIRE_EXT") != "1":
        pytest.skip("set RDP_CORE_REQUIRE_EXT=1 where the extension must have been built (CI does)")
    assert CPP_BUILT and hasattr(_backend.cpp_extension(), "attention_bwd")
