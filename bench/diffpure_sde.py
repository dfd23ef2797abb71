"""DiffPure's purification as its code runs it on torchsde, the baseline of bench_gradient and bench_purify.

The reverse VP-SDE in flipped time s = 1 - t from 1 - t* to 1 - 1e-5 on a flattened state, method "euler",
dt = 1e-3, a BrownianInterval; sdeint for purification, sdeint_adjoint for gradients.
"""
import math

import torch

from rdp_core.sampling import VP


class DiffPureReverseSDE(torch.nn.Module):
    """DiffPure's RevVPSDE for torchsde: the reverse VP-SDE in flipped time s = 1 - t, flattened state."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, model, shape):
        super().__init__()
        self.model, self.shape = model, shape

    def f(self, s, y):
        t = 1.0 - s
        beta = VP.beta(t)
        eps = self.model(y.view(self.shape), t.expand(self.shape[0])).flatten(1)
        score = -eps / VP.sigma(t)
        return 0.5 * beta * y + beta * score  # minus the reverse-time drift, for the flipped time

    def g(self, s, y):
        return torch.sqrt(VP.beta(1.0 - s)).expand_as(y)


def torchsde_purify(torchsde, model, x, t_star, adjoint=False, seed=1):
    """Images x in [0, 1] purified the DiffPure way (sdeint_adjoint when `adjoint`), clamped to [0, 1]."""
    t0, t1 = 1.0 - t_star, 1.0 - 1e-5
    alpha_bar = VP.alpha_bar(t_star)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    x_t = (x * 2 - 1) * math.sqrt(alpha_bar) + z * math.sqrt(1 - alpha_bar)
    flat = x_t.flatten(1)
    bm = torchsde.BrownianInterval(t0=t0, t1=t1, size=flat.shape, device=x.device)
    solve = torchsde.sdeint_adjoint if adjoint else torchsde.sdeint
    ys = solve(DiffPureReverseSDE(model, tuple(x.shape)), flat, torch.tensor([t0, t1], device=x.device),
               method="euler", dt=1e-3, bm=bm)
    return ((ys[-1].view(x.shape) + 1) * 0.5).clamp(0, 1)
