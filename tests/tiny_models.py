"""Tiny float64 models and helpers shared by the gradient tests (tests/ is on sys.path through its conftest)."""
import torch
from torch import nn

import rdp_core


class TinyEps(nn.Module):
    """A small nonlinear, time-conditioned epsilon model (float64): every step has a non-trivial Jacobian."""

    def __init__(self, channels=2, hidden=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1).double()
        self.time = nn.Linear(1, hidden).double()
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1).double()
        with torch.no_grad():
            self.conv_in.weight.mul_(4.0)  # tanh well inside its curved range: Jacobians vary with the state
        self.requires_grad_(False)

    def forward(self, x, t):
        h = torch.tanh(self.conv_in(x) + self.time(t[:, None].to(x.dtype))[:, :, None, None])
        return self.conv_out(h) + 0.3 * x


class TinyBlock(nn.Module):
    """A time-conditioned residual block that block checkpointing may recompute (float64)."""

    checkpoint_unit = True

    def __init__(self, hidden):
        super().__init__()
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1).double()
        self.time = nn.Linear(1, hidden).double()

    def forward(self, h, t):
        return h + torch.tanh(self.conv(h) + self.time(t[:, None].to(h.dtype))[:, :, None, None])


class TinyBlockEps(nn.Module):
    """TinyEps with two checkpoint-unit blocks between its convolutions, one nested in a plain container."""

    def __init__(self, channels=2, hidden=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1).double()
        self.blocks = nn.ModuleList([TinyBlock(hidden), nn.ModuleList([TinyBlock(hidden)])])
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1).double()
        with torch.no_grad():
            self.conv_in.weight.mul_(4.0)
        self.requires_grad_(False)

    def forward(self, x, t):
        h = torch.tanh(self.conv_in(x))
        h = self.blocks[1][0](self.blocks[0](h, t), t)
        return self.conv_out(h) + 0.3 * x


def images(n=3, seed=1, channels=2, size=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=gen, dtype=torch.float64) * 0.8 + 0.1


def input_gradient(x, weights, **purify_args):
    x = x.clone().requires_grad_(True)
    out = rdp_core.purify(x, generator=torch.Generator().manual_seed(3), **purify_args)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


def assert_relative_close(actual, expected, tol):
    error = (actual - expected).norm() / expected.norm()
    assert error < tol, f"relative error {error:.3g} >= {tol}"


def layout_leaks(model, memory_format, *inputs):
    """Runs model(*inputs) and names each submodule whose 4-D output is not laid out in `memory_format`: a model
    whose input and weights are in one layout should keep it, or every later kernel mixes layouts."""
    leaks, hooks = [], []
    for name, module in model.named_modules():
        def hook(module, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and not out.is_contiguous(memory_format=memory_format):
                leaks.append(f"{name} ({type(module).__name__}): strides {out.stride()} for shape {tuple(out.shape)}")
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return leaks
