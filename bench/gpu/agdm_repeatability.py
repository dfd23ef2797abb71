"""How far apart two eager AGDM purifications with the same noise land on a GPU, beside graphed vs eager.

    python bench/gpu/agdm_repeatability.py

The graph tests compare graphed with eager AGDM at a float32-rounding tolerance; this measures what the eager
path itself gives twice (backward kernels may accumulate with atomics), so a graphed-vs-eager difference can
be read against it. Each comparison runs twice, the second time with cuDNN restricted to deterministic
algorithms (some of its backward-data convolutions accumulate with atomics): a spread that vanishes then
names its cause.
"""
import torch

import rdp_core
from rdp_core.models.ncsnpp import NCSNpp, ScoreSDEEpsModel
from rdp_core.train import CPU_MODEL


def purified(x, model, graphs, solver):
    return rdp_core.purify(x, 0.05, model=model, grad="none", steps=10, solver=solver, guidance="agdm",
                           graphs=graphs, generator=torch.Generator().manual_seed(1))


def main():
    torch.manual_seed(0)
    model = ScoreSDEEpsModel(NCSNpp(CPU_MODEL)).eval().requires_grad_(False).cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    for deterministic in (False, True):
        torch.backends.cudnn.deterministic = deterministic
        for solver in ("sde", "ode-heun"):
            eager = [purified(x, model, False, solver) for _ in range(3)]
            graphed = [purified(x, model, True, solver) for _ in range(2)]
            eager_spread = max((e - eager[0]).abs().max().item() for e in eager[1:])
            graphed_gap = max((g - eager[0]).abs().max().item() for g in graphed)
            graphed_spread = (graphed[1] - graphed[0]).abs().max().item()
            print(f"agdm {solver}, cudnn.deterministic={deterministic}: max |eager - eager| {eager_spread:.3g}, "
                  f"max |graphed - eager| {graphed_gap:.3g}, max |graphed - graphed| {graphed_spread:.3g}")


if __name__ == "__main__":
    main()
