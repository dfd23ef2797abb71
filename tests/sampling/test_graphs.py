"""The CUDA-graph-captured reverse solve equals the eager one; on the CPU only the switch is tested."""
import pytest
import torch

import rdp_core
from rdp_core.models.ncsnpp import NCSNpp, ScoreSDEEpsModel
from rdp_core.sampling.graphs import cached_graphs, graphs_wanted
from rdp_core.train import CPU_MODEL

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def test_graphs_are_chosen_for_cuda_tensors_unless_disabled(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("RDP_CORE_DISABLE_GRAPHS", raising=False)
    assert not graphs_wanted(cpu, None) and not graphs_wanted(cpu, False)
    with pytest.raises(ValueError, match="graphs=True needs CUDA"):
        graphs_wanted(cpu, True)
    with pytest.raises(ValueError, match="guided purification is not graph-captured"):
        rdp_core.purify(torch.rand(1, 3, 32, 32), 0.01, steps=1, guidance="gdmp", graphs=True)


def _model():
    torch.manual_seed(0)
    return ScoreSDEEpsModel(NCSNpp(CPU_MODEL)).eval().requires_grad_(False).cuda()


def _purified(x, model, seed, **options):
    return rdp_core.purify(x, 0.05, model=model, steps=10, grad="none", generator=torch.Generator().manual_seed(seed),
                           **options)


@needs_cuda
@pytest.mark.parametrize("solver", ["sde", "ddpm", "ode-heun"])
def test_graphed_equals_eager_for_the_same_noise(solver):
    model, x = _model(), torch.rand(4, 3, 32, 32, device="cuda")
    steps = {"ddpm": None}.get(solver, 10)
    options = dict(solver=solver, steps=steps)
    graphed = _purified(x, model, 1, graphs=True, **options)
    eager = _purified(x, model, 1, graphs=False, **options)
    assert torch.equal(graphed, eager)
    # A second replay with other images and other noise is right too, from the same graph.
    y = torch.rand(4, 3, 32, 32, device="cuda")
    assert torch.equal(_purified(y, model, 2, graphs=True, **options), _purified(y, model, 2, graphs=False, **options))
    assert cached_graphs(model) == 1


@needs_cuda
def test_a_new_shape_builds_a_new_graph():
    model = _model()
    for batch in (2, 3, 2):
        _purified(torch.rand(batch, 3, 32, 32, device="cuda"), model, 0)
    assert cached_graphs(model) == 2


@needs_cuda
def test_disabling_graphs_by_environment(monkeypatch):
    monkeypatch.setenv("RDP_CORE_DISABLE_GRAPHS", "1")
    model = _model()
    _purified(torch.rand(2, 3, 32, 32, device="cuda"), model, 0)
    assert cached_graphs(model) == 0
