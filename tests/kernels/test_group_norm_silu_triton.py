"""Triton GroupNorm (+ scale-shift) (+ SiLU): launchers and the autograd.Function against the references.

Without a GPU these run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1):
small fp32 shapes, few (sample, group) programs, that check indexing and masking (7x7, 13x17, C/G = 1, no
spatial dims, a 65536-element group walked in tiles). The `gpu` tests sign off fp16/bf16 numerics at UNet shapes.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from rdp_core.kernels import group_norm_silu as K  # noqa: E402  (after the importorskip)
from rdp_core.ops import group_norm_act, group_norm_act_torch  # noqa: E402
from rdp_core.ops.group_norm_silu import _GroupNormActTriton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

# (shape, groups): 7x7 and 13x17 off every power of two, one channel per group, 1-D and no spatial extent.
SMALL = [((2, 8, 7, 7), 4), ((1, 6, 13, 17), 3), ((2, 4, 5, 5), 4), ((2, 4, 9), 2), ((3, 4), 2)]
SMALL_IDS = ["7x7", "13x17", "C/G=1", "1d", "no-spatial"]
VARIANTS = [("silu", False), (None, False), ("silu", True), (None, True)]
VARIANT_IDS = ["silu", "plain", "silu-scale-shift", "plain-scale-shift"]
PARAMS = ("weight", "bias", "scale", "shift")


def make(shape, seed, with_film=True, offset=0.0, dtype=torch.float32):
    """x, weight, bias, scale, shift (the last two None without FiLM), fresh random values."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, generator=gen) + offset
    weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    scale, shift = (torch.randn(n, c, generator=gen) * 0.5, torch.randn(n, c, generator=gen)) if with_film \
        else (None, None)
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, weight, bias, scale, shift)]


def reference(tensors, groups, activation, eps=1e-5, dtype=torch.float64):
    x, weight, bias, scale, shift = (None if t is None else t.to(dtype) for t in tensors)
    return group_norm_act_torch(x, groups, weight, bias, eps, scale, shift, activation)


def reference_grads(tensors, groups, activation, grad_y, dtype=torch.float64):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    y = reference(leaves, groups, activation, dtype=dtype)
    grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y.to(dtype)))
    return [None if t is None else next(grads) for t in leaves]


# Each awkward shape once, each variant at least once: the interpreter runs programs one by one, slowly.
CASES = [(shape, groups) + VARIANTS[i % len(VARIANTS)] for i, (shape, groups) in enumerate(SMALL)]
CASE_IDS = [f"{shape_id}-{VARIANT_IDS[i % len(VARIANTS)]}" for i, shape_id in enumerate(SMALL_IDS)]


@pytest.mark.parametrize("shape, groups, activation, with_film", CASES, ids=CASE_IDS)
def test_launchers_match_the_reference(shape, groups, activation, with_film):
    tensors = make(shape, seed=sum(shape), with_film=with_film)
    silu = activation == "silu"
    y, mean, rstd = K.group_norm_act_fwd(tensors[0], groups, *tensors[1:], eps=1e-5, silu=silu)
    assert y.shape == shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(tensors, groups, activation), atol=3e-6, rtol=1e-5)
    per_group = tensors[0].double().reshape(shape[0] * groups, -1)
    torch.testing.assert_close(mean.double(), per_group.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (per_group.var(1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    grad_y = torch.randn(shape).to(DEVICE)
    needs = tuple(t is not None for t in tensors[1:])
    ours = K.group_norm_act_bwd(grad_y, tensors[0], groups, mean, rstd, *tensors[1:], silu=silu, needs=needs)
    for name, a, exact in zip(("x",) + PARAMS, ours, reference_grads(tensors, groups, activation, grad_y)):
        assert (a is None) == (exact is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), exact, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("shape, groups", [((2, 8, 5, 7), 4), ((1, 12, 4, 4), 3)], ids=["5x7", "C/G=4"])
def test_channels_last_is_read_and_written_in_place(shape, groups):
    # What a channels-last model hands the norm on the GPU: NHWC memory, and grad_y in either layout.
    tensors = make(shape, seed=sum(shape) + 1)
    x = tensors[0].contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    y, mean, rstd = K.group_norm_act_fwd(x, groups, *tensors[1:])
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y.double(), reference(tensors, groups, "silu"), atol=3e-6, rtol=1e-5)
    grad_y = torch.randn(shape).to(DEVICE)
    exact = reference_grads(tensors, groups, "silu", grad_y)
    for layout in (torch.contiguous_format, torch.channels_last):
        grads = K.group_norm_act_bwd(grad_y.contiguous(memory_format=layout), x, groups, mean, rstd, *tensors[1:],
                                     needs=(True,) * 4)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
        for name, a, e in zip(("x",) + PARAMS, grads, exact):
            torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_backward_launcher_computes_only_the_gradients_asked_for():
    tensors = make((1, 4, 3, 3), seed=3)
    grad_y = torch.randn(1, 4, 3, 3).to(DEVICE)
    _, mean, rstd = K.group_norm_act_fwd(tensors[0], 2, *tensors[1:])
    exact = reference_grads(tensors, 2, "silu", grad_y)
    for needs in [(False,) * 4, (True, False, False, True)]:
        grads = K.group_norm_act_bwd(grad_y, tensors[0], 2, mean, rstd, *tensors[1:], needs=needs)
        torch.testing.assert_close(grads[0].double(), exact[0], atol=1e-5, rtol=1e-4)
        for need, grad, ref in zip(needs, grads[1:], exact[1:]):
            assert (grad is not None) == need
            if need:
                torch.testing.assert_close(grad.double(), ref, atol=1e-5, rtol=1e-4)


def test_a_65536_element_group_is_walked_in_tiles():
    # 16 channels of 64x64 per group, as 512 channels / 32 groups at 64x64 in the ADM UNet; one program.
    shape = (1, 16, 64, 64)
    assert K._blocks(16, 64 * 64)[0] * K._blocks(16, 64 * 64)[1] < 16 * 64 * 64  # more than one tile
    tensors = make(shape, seed=4, offset=3.0)
    grad_y = torch.randn(shape).to(DEVICE)
    y, mean, rstd = K.group_norm_act_fwd(tensors[0], 1, *tensors[1:])
    torch.testing.assert_close(y.double(), reference(tensors, 1, "silu"), atol=3e-6, rtol=1e-5)
    grads = K.group_norm_act_bwd(grad_y, tensors[0], 1, mean, rstd, *tensors[1:], needs=(True,) * 4)
    for a, exact in zip(grads, reference_grads(tensors, 1, "silu", grad_y)):
        torch.testing.assert_close(a.double(), exact, atol=2e-5, rtol=1e-4)


def test_large_mean_does_not_cancel():
    # mean 1e4, std 1: E[x^2] - E[x]^2 in float32 would lose the variance; two passes keep it.
    tensors = make((1, 8, 6, 6), seed=5, with_film=False, offset=1e4)
    y, _, rstd = K.group_norm_act_fwd(tensors[0], 2, *tensors[1:], silu=False)
    exact = reference(tensors, 2, None)
    stock_error = (F.group_norm(tensors[0], 2, tensors[1], tensors[2]).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() <= 2 * stock_error
    per_group = tensors[0].double().reshape(2, -1)
    torch.testing.assert_close(rstd.double(), (per_group.var(1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-3)


# The interpreter's numpy exp overflows to inf on purpose here (sigmoid(-huge) = 0); that warning is expected.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_large_activations_stay_finite():
    tensors = make((1, 4, 3, 3), seed=6, with_film=False)
    tensors[1], tensors[2] = torch.full((4,), 200.0, device=DEVICE), torch.linspace(-500, 500, 4, device=DEVICE)
    y, mean, rstd = K.group_norm_act_fwd(tensors[0], 2, *tensors[1:])
    grad = K.group_norm_act_bwd(torch.ones_like(y), tensors[0], 2, mean, rstd, *tensors[1:])[0]
    assert torch.isfinite(y).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(y, F.silu(F.group_norm(tensors[0], 2, tensors[1], tensors[2])), atol=1e-3, rtol=1e-5)


def test_non_contiguous_input_and_grad():
    x = make((1, 8, 5, 5), seed=7, with_film=False)[0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    grad_y = torch.randn(1, 5, 5, 8).to(DEVICE).permute(0, 3, 1, 2)
    assert not x.is_contiguous() and not grad_y.is_contiguous()
    leaf = x.clone().requires_grad_()
    y = _GroupNormActTriton.apply(leaf, None, None, None, None, 4, 1e-5, "silu")
    (ours,) = torch.autograd.grad(y, leaf, grad_y)
    ref = x.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(F.silu(F.group_norm(ref, 4)), ref, grad_y)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 4)), atol=3e-6, rtol=1e-5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation, with_film", VARIANTS, ids=VARIANT_IDS)
def test_autograd_function_gives_only_the_gradients_required(activation, with_film):
    tensors = make((2, 4, 4, 4), seed=8, with_film=with_film)
    wanted = {"x", "scale"} if with_film else {"x", "bias"}
    names = ("x",) + PARAMS
    leaves = [None if t is None else t.clone().requires_grad_(name in wanted) for name, t in zip(names, tensors)]
    y = _GroupNormActTriton.apply(*leaves, 2, 1e-5, activation)
    grad_y = torch.randn(y.shape).to(DEVICE)
    y.backward(grad_y)
    for name, leaf, exact in zip(names, leaves, reference_grads(tensors, 2, activation, grad_y)):
        if leaf is None:
            continue
        if name in wanted:
            torch.testing.assert_close(leaf.grad.double(), exact, atol=1e-5, rtol=1e-4)
        else:
            assert leaf.grad is None, name


def test_autograd_function_double_backward_is_exact():
    # create_graph=True takes a differentiable VJP, so Hessian-vector products stay exact.
    tensors = make((1, 4, 3, 3), seed=9)
    direction = torch.randn(1, 4, 3, 3).to(DEVICE)
    results = []
    for op in (lambda *t: group_norm_act_torch(t[0], 2, t[1], t[2], 1e-5, t[3], t[4]),
               lambda *t: _GroupNormActTriton.apply(*t, 2, 1e-5, "silu")):
        leaves = [t.clone().requires_grad_() for t in tensors]
        (grad_x,) = torch.autograd.grad(op(*leaves).square().sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad((grad_x * direction).sum(), leaves))
    for ours, reference_hvp in zip(results[1], results[0]):
        assert reference_hvp.abs().max() > 1e-2
        torch.testing.assert_close(ours, reference_hvp, atol=1e-5, rtol=1e-4)


# --- GPU: fp16/bf16 numerics and dispatch at UNet shapes --------------------------------------------------------

UNET = [((8, 128, 32, 32), False), ((8, 256, 16, 16), True), ((4, 512, 8, 8), True), ((2, 512, 64, 64), False)]


def _error(a, exact):
    return (a.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("shape, with_film", UNET, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("film" if v else "affine"))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_low_precision_within_twice_stock_torch_error(shape, with_film, activation, dtype):
    tensors = make(shape, seed=sum(shape), with_film=with_film, dtype=dtype)
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    y = group_norm_act(leaves[0], 32, leaves[1], leaves[2], 1e-5, leaves[3], leaves[4], activation)
    assert y.grad_fn is not None and "Triton" in type(y.grad_fn).__name__ and y.dtype == dtype
    grad_y = torch.randn(shape, device=DEVICE, dtype=dtype)
    ours = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    stock_leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    stock = F.group_norm(stock_leaves[0], 32, stock_leaves[1], stock_leaves[2])
    if with_film:
        stock = stock * (1 + stock_leaves[3][:, :, None, None]) + stock_leaves[4][:, :, None, None]
    stock = F.silu(stock) if activation == "silu" else stock
    stock_grads = torch.autograd.grad(stock, [t for t in stock_leaves if t is not None], grad_y)
    exact_y = reference(tensors, 32, activation)
    assert _error(y, exact_y) <= 2 * _error(stock, exact_y)
    exact = [g for g in reference_grads(tensors, 32, activation, grad_y) if g is not None]
    for name, a, s, e in zip(("x",) + PARAMS, ours, stock_grads, exact):
        assert a.dtype == s.dtype
        assert _error(a, e) <= 3 * _error(s, e), f"grad {name}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fp32_cuda_matches_the_cpu_reference_and_dispatches_to_triton():
    tensors = make((4, 256, 16, 16), seed=10)
    y = group_norm_act(tensors[0].requires_grad_(), 32, *tensors[1:3], 1e-5, *tensors[3:])
    assert type(y.grad_fn).__name__.startswith("_GroupNormActTriton")
    torch.testing.assert_close(y.double(), reference(tensors, 32, "silu"), atol=1e-5, rtol=1e-5)


# Compiled, not interpreted, for an H100 (sm_90) without one: catches what only the real compiler rejects (types,
# layouts, constexpr branches). A fresh interpreter, since TRITON_INTERPRET=1 replaces the jit functions here.
_AOT = """
import inspect, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rdp_core.kernels import group_norm_silu as K

def compile_kernel(kernel, pointers, constexprs, num_warps):
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        signature[name] = ("*" + pointers[name] if name in pointers else "fp32" if name == "eps"
                           else "constexpr" if name in constexprs else "i32")
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

for cpg, spatial in [(16, 4096), (1, 49)]:
    block_c, block_hw, warps = K._blocks(cpg, spatial)
    flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True, BLOCK_C=block_c,
                 BLOCK_HW=block_hw)
    io = dict(X="fp16", W="fp32", B="fp32", SCALE="fp16", SHIFT="fp16", MEAN="fp32", RSTD="fp32")
    compile_kernel(K._group_norm_act_fwd_kernel, dict(io, Y="fp16"), flags, warps)
    compile_kernel(K._group_norm_act_bwd_kernel, dict(io, DY="fp16", DX="fp16", SUM_DZ="fp32", SUM_DZ_XHAT="fp32"),
                   dict(flags, STORE_SUMS=True), warps)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_in_fp16(tmp_path):
    import os
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                            cwd=tmp_path)  # not the checkout: `python -c` would import its uninstalled tree
    assert result.returncode == 0, result.stderr[-3000:]
