"""The engine's GPU path end to end: a whole score model and a full gradient through purification on CUDA.

The kernel tests check each Triton kernel alone; these check that the model built on them computes what the
same model computes with stock torch ops, and that the adjoint's gradient on the GPU is the unrolled one.
"""
import pytest
import torch

import rdp_core
from rdp_core.models.ncsnpp import NCSNpp, ScoreSDEEpsModel
from rdp_core.train import CPU_MODEL
from tiny_models import layout_leaks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(seed=0):
    torch.manual_seed(seed)
    net = NCSNpp(CPU_MODEL)
    with torch.no_grad():
        for p in net.parameters():  # score_sde zero-initialises each block's last conv: make every layer count
            p.add_(torch.randn_like(p) * 0.02)
    return ScoreSDEEpsModel(net).eval().requires_grad_(False).cuda()


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def exact_float32():
    """Both paths in IEEE float32: no TF32 in the convolutions and matmuls they share."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_triton_model_matches_the_stock_torch_model(monkeypatch, exact_float32):
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 3, 32, 32, generator=gen).cuda(), torch.rand(8, generator=gen).cuda() * 0.3
    with torch.no_grad():
        ours = model(x, t)
        monkeypatch.setenv("RDP_CORE_BACKEND", "torch")
        stock = model(x, t)
    assert _relative(ours, stock) < 1e-5


def test_adjoint_gradient_on_the_gpu_is_the_unrolled_gradient(exact_float32):
    model = _model()
    gen = torch.Generator().manual_seed(2)
    x, w = torch.rand(4, 3, 32, 32, generator=gen).cuda(), torch.randn(4, 3, 32, 32, generator=gen).cuda()

    def gradient(grad, **options):
        leaf = x.clone().requires_grad_()
        out = rdp_core.purify(leaf, 0.05, model=model, steps=20, grad=grad, clip=False,
                              generator=torch.Generator().manual_seed(3), **options)
        return torch.autograd.grad((out * w).sum(), leaf)[0]

    unrolled = gradient("autograd")
    assert _relative(gradient("adjoint"), unrolled) < 1e-5
    assert _relative(gradient("adjoint", checkpoint_blocks=True), unrolled) < 1e-5  # recomputed blocks, Triton ops
    # bf16: the exact gradient of the bf16 purification (equal on the CPU; here up to cuDNN's atomics, in bf16)
    assert _relative(gradient("adjoint", precision="bf16"), gradient("autograd", precision="bf16")) < 1e-3


def test_a_channels_last_model_computes_what_the_nchw_model_does(exact_float32):
    # The Triton norms read NHWC in place and the attention its strided views: the layout changes no value
    # beyond cuDNN's choice of algorithm, forward or gradient.
    model = _model()
    channels_last = _model().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(4)
    x, w = torch.rand(4, 3, 32, 32, generator=gen).cuda(), torch.randn(4, 3, 32, 32, generator=gen).cuda()

    def gradient(eps_model):
        leaf = x.clone().requires_grad_()
        out = rdp_core.purify(leaf, 0.05, model=eps_model, steps=10, clip=False,
                              generator=torch.Generator().manual_seed(5))
        return out, torch.autograd.grad((out * w).sum(), leaf)[0]

    (out, grad), (out_cl, grad_cl) = gradient(model), gradient(channels_last)
    assert _relative(out_cl, out) < 1e-5 and _relative(grad_cl, grad) < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_the_model_keeps_its_memory_layout_on_the_gpu(memory_format, precision):
    # The layout of the weights and the input is the layout of every activation: no block hands the next one
    # the other layout (which costs cuDNN layout conversions and strided elementwise kernels).
    model = _model().to(memory_format=memory_format)
    x = torch.rand(4, 3, 32, 32, device="cuda").contiguous(memory_format=memory_format)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        assert layout_leaks(model, memory_format, x, torch.full((4,), 0.05, device="cuda")) == []
