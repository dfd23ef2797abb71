"""3x3 convolutions with stride 1 and padding 1, where a diffusion UNet spends most of its arithmetic.

    conv3x3(x, weight, bias) = F.conv2d(x, weight, bias, padding=1)

`conv3x3_torch` is the readable reference, and the "torch" backend (oneDNN's direct convolution on the CPU,
cuDNN on a GPU). The "cpp" backend (rdp_core._C, float32 CPU tensors) is a Winograd F(4x4, 3x3) convolution
(Lavin & Gray, 2016): each 6x6 input tile and each filter are transformed so that 16 outputs per channel
pair take 36 multiplies instead of 144, and the products are 36 independent matrix products run by a
register-blocked AVX-512 kernel (a portable loop elsewhere). On the 2-core Zen 5 of bench/RESULTS.md it is
2.2-2.7x faster than oneDNN's direct convolution at DDPM++'s shapes. The price is rounding: the transforms
scale values by up to 8 and back, so the error against an exact convolution is about 1e-5 of the output's
largest magnitude where the direct one is about 2e-6 (tests/ops/test_conv3x3.py bounds it at 6e-5); for float32
purification that is far below the sampler's own noise. RDP_CORE_BACKEND=torch, or backend="torch", keeps
the direct convolution.

Gradients are the convolution's own, rounded as any backward is: the input gradient of a stride-1, padding-1 3x3
convolution is itself one (with the filter flipped and its channels swapped), run by the same Winograd
kernels; weight and bias gradients, only computed when they require grad, use torch's convolution
backward. A backward that must itself be differentiable (create_graph=True: the adjoint's second-order
guidance terms) runs that input-gradient convolution as a differentiable Winograd convolution in turn, so
its values equal the plain backward's and its own gradients are again convolutions; weight and bias
gradients then differentiate the reference.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from rdp_core import _backend

_PANEL = 32  # output channels per packed weight panel (csrc/conv3x3.h, kWinogradPanel)
_MIN_IN_CHANNELS = 64  # at 32 the kernel is only level with the direct convolution (bench/RESULTS.md)

# G of Winograd F(4x4, 3x3) for the interpolation points 0, +-1, +-2 (the inverse of csrc's B^T and A^T).
_FILTER_TRANSFORM = torch.tensor([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=torch.float64)


def conv3x3_torch(x, weight, bias=None):
    """The definition: F.conv2d with stride 1 and padding 1."""
    return F.conv2d(x, weight, bias, padding=1)


def winograd_weights(weight):
    """Packs (K, C, 3, 3) filters into the C++ kernels' layout: the transformed filters G g G^T, computed in
    float64 and rounded once, as (36, K / 32, C, 32) float32 (point, output-channel panel, input channel,
    output channel within the panel)."""
    out_channels, in_channels = weight.shape[:2]
    g = _FILTER_TRANSFORM
    u = torch.einsum("ij,kcjl,ml->imck", g, weight.detach().to(torch.float64).cpu(), g)
    u = u.reshape(36, in_channels, out_channels // _PANEL, _PANEL).permute(0, 2, 1, 3)
    return u.to(torch.float32).contiguous()


def adjoint_filters(weight):
    """The filters whose stride-1, padding-1 convolution of grad_y is the input gradient of conv3x3: each
    filter flipped in both spatial directions, input and output channels swapped."""
    return weight.flip(2, 3).transpose(0, 1)


def _winograd(x, packed, bias=None, portable=False):
    """conv3x3 of the float32 CPU tensor x with packed filters (winograd_weights), in channels-last memory."""
    n, _, height, width = x.shape
    nhwc = x.detach().permute(0, 2, 3, 1).contiguous()  # a view, no copy, when x is channels-last already
    y = torch.empty(n, packed.shape[1] * _PANEL, height, width, memory_format=torch.channels_last)
    bias = None if bias is None else bias.detach().contiguous().numpy()
    _backend.cpp_extension().winograd_conv3x3(nhwc.numpy(), packed.numpy(), bias, y.permute(0, 2, 3, 1).numpy(),
                                              portable=portable)
    return y  # a tensor of its own, not a view: autograd lets the model's in-place sums write into it


_FINGERPRINT_SIZE = 257  # weights sampled, evenly spaced over the whole tensor, to notice changes made via .data


def _fingerprint(weight):
    """A copy of a fixed sample of the weight's values. Writes through `weight.data` (DiffPure's EMA swap,
    `p.data.copy_(...)`) do not bump the weight's version, so the version alone would miss them."""
    weight = weight.detach()
    dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
    # The values in memory order, without copying a dense tensor of either layout (flatten() would copy a
    # channels-last one: a whole read and write of the weight at every call).
    flat = weight.as_strided((weight.numel(),), (1,)) if dense else weight.flatten()
    return flat[_sample_index(flat.numel())].clone()


@functools.lru_cache(maxsize=None)
def _sample_index(numel):
    return torch.linspace(0, numel - 1, min(_FINGERPRINT_SIZE, numel), dtype=torch.float64).round().long()


class WinogradFilters:
    """The packed filters of one weight tensor and of its adjoint, packed at first use and again only after the
    weight changed: an in-place update bumps its version, a replaced tensor has a new address, and a write
    through `.data` (which bumps nothing) is noticed when it changes any of 257 sampled values (a whole-tensor
    copy always does; call `clear()` after editing a few weights that way). Each packing takes 4x the
    weight's memory (36 transformed values per 9 weights)."""

    def __init__(self):
        self._packed = {}

    def clear(self):
        self._packed = {}

    def get(self, weight, adjoint=False):
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
        fingerprint = _fingerprint(weight)
        cached = self._packed.get(adjoint)
        if cached is None or cached[0] != key or not torch.equal(cached[1], fingerprint):
            filters = adjoint_filters(weight) if adjoint else weight
            self._packed[adjoint] = (key, fingerprint, winograd_weights(filters))
        return self._packed[adjoint][2]


class _Conv3x3Cpp(torch.autograd.Function):
    """Winograd forward and input backward on rdp_core._C; see the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, filters):
        ctx.save_for_backward(x, weight, bias)
        ctx.filters = filters
        return _winograd(x, filters.get(weight), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            return (*_differentiable_vjp(x, weight, bias, grad_y, needs, ctx.filters), None)
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if needs[0]:
            if _winograd_fits(in_channels=weight.shape[0], out_channels=weight.shape[1]):  # the adjoint's
                grad_x = _winograd(grad_y, ctx.filters.get(weight, adjoint=True))
            else:
                grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_y, padding=1)
        if needs[1]:
            grad_weight = torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, padding=1)
        if needs[2]:
            grad_bias = grad_y.sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


class _AdjointFilters:
    """What a WinogradFilters cache would hand out for adjoint_filters(weight): the adjoint packing of `weight`'s
    cache and, as the adjoint of the adjoint, `weight`'s own packing. Nothing is packed twice."""

    def __init__(self, filters, weight):
        self._filters, self._weight = filters, weight

    def get(self, _adjoint_weight, adjoint=False):
        return self._filters.get(self._weight, adjoint=not adjoint)


def _differentiable_vjp(x, weight, bias, grad_y, needs, filters):
    """The VJP as differentiable operations, for a backward under create_graph (the adjoint's second-order
    guidance terms). The input gradient is the convolution of grad_y with the adjoint filters, run as a
    _Conv3x3Cpp itself: differentiable to any order, rounded as the plain backward rounds, and without
    recomputing the forward. Weight and bias gradients (rarely wanted here) come from the reference."""
    grad_x = grad_weight = grad_bias = None
    if needs[0]:
        if _winograd_fits(in_channels=weight.shape[0], out_channels=weight.shape[1]):
            grad_x = _Conv3x3Cpp.apply(grad_y, adjoint_filters(weight), None, _AdjointFilters(filters, weight))
        else:
            grad_x = F.conv_transpose2d(grad_y, weight, padding=1)
    if needs[1] or needs[2]:
        _, grad_weight, grad_bias = _reference_vjp(x, weight, bias, grad_y, (False, *needs[1:]))
    return grad_x, grad_weight, grad_bias


def _reference_vjp(x, weight, bias, grad_y, needs):
    """The differentiable VJP of the reference on the saved tensors themselves (exact second derivatives)."""
    with torch.enable_grad():
        y = conv3x3_torch(x, weight, bias)
    inputs = (x, weight, bias)
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _winograd_fits(in_channels, out_channels):
    return out_channels % _PANEL == 0 and in_channels >= _MIN_IN_CHANNELS


def _unfit_reason(x, weight, bias):
    """Why the cpp backend cannot take these tensors, or None; the device is _backend.select's business."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(t.dtype != torch.float32 for t in tensors):
        return f"takes float32 tensors, got {[t.dtype for t in tensors]}"
    if x.numel() == 0:
        return "takes non-empty tensors"
    if not _winograd_fits(in_channels=weight.shape[1], out_channels=weight.shape[0]):
        return (f"takes a multiple of {_PANEL} output channels and at least {_MIN_IN_CHANNELS} input channels, got "
                f"{weight.shape[0]} and {weight.shape[1]}")
    if torch.is_autocast_enabled(x.device.type):
        return "computes in float32 only, and autocast asks for a lower precision (precision='bf16')"
    return None


def _check_arguments(x, weight, bias):
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv3x3: expected x of shape (N, C, H, W) and weight of shape (K, C, 3, 3), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv3x3: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def conv3x3(x, weight, bias=None, backend="auto", filters=None):
    """F.conv2d(x, weight, bias, padding=1) for x (N, C, H, W) and weight (K, C, 3, 3) on `backend`.

    backend: "auto" (cpp for float32 CPU tensors with K a multiple of 32 and C >= 64 outside autocast, else
    torch, which autocast then runs in its lower precision), "torch" or "cpp" (a ValueError when it cannot
    take these tensors). RDP_CORE_BACKEND=torch turns "auto" into "torch"; its other values leave "auto" as
    it is. filters: a WinogradFilters cache for `weight` (Conv2d keeps one); without it the cpp backend packs
    the filters at every call. The cpp backend returns channels-last memory whatever x's layout.
    """
    _check_arguments(x, weight, bias)
    reason = _unfit_reason(x, weight, bias)
    if backend == "cpp" and reason is not None:
        raise ValueError(f"conv3x3: the cpp backend {reason}")
    if backend == "auto" and _backend.environment_backend() == "torch":
        backend = "torch"
    # Other RDP_CORE_BACKEND values name a backend this op lacks (triton) or cannot take at every shape (cpp,
    # which a model's 3-channel first convolution does not fit): they leave its choice to "auto", so that
    # forcing the fused norms and attention does not break every model.
    implemented = ("torch",) if reason is not None else ("torch", "cpp")
    if _backend.select("conv3x3", x, backend, implemented, environment=False) == "torch":
        return conv3x3_torch(x, weight, bias)
    filters = WinogradFilters() if filters is None else filters
    with _backend.profiled("rdp_core::conv3x3_winograd"):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _Conv3x3Cpp.apply(x, weight, bias, filters)
        return _winograd(x, filters.get(weight), bias)  # no graph: without autograd.Function's overhead


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and checkpoint keys) whose 3x3, stride-1, padding-1 case runs on conv3x3's
    dispatched backends with its packed filters cached; every other configuration is nn.Conv2d's own."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self._winograd = WinogradFilters()

    def _is_conv3x3(self):
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")

    def clear_winograd_filters(self):
        """Forgets the packed filters (they are repacked at the next call): needed only after editing a few
        weights through `.data`, which the sampled check of WinogradFilters may not notice."""
        self._winograd.clear()

    def forward(self, x):
        if not self._is_conv3x3():
            return super().forward(x)
        return conv3x3(x, self.weight, self.bias, self.backend, self._winograd)
