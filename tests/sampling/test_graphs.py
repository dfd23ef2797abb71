"""The CUDA-graph-captured reverse solve equals the eager one; on the CPU only the switch is tested."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import rdp_core
from rdp_core import api
from rdp_core.guidance import cached_auxiliary
from rdp_core.models.ncsnpp import NCSNpp, ScoreSDEEpsModel
from rdp_core.sampling import graphs
from rdp_core.sampling.graphs import cached_graphs, graphs_wanted
from rdp_core.train import CPU_MODEL

TINY = replace(CPU_MODEL, nf=16, num_res_blocks=1)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def test_graphs_are_chosen_for_cuda_tensors_unless_disabled(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("RDP_CORE_DISABLE_GRAPHS", raising=False)
    assert not graphs_wanted(cpu, None) and not graphs_wanted(cpu, False)
    with pytest.raises(ValueError, match="graphs=True needs CUDA"):
        graphs_wanted(cpu, True)
    with pytest.raises(ValueError, match="graphs=True needs CUDA"):
        rdp_core.purify(torch.rand(1, 3, 32, 32), 0.01, steps=1, guidance="gdmp", graphs=True)


def use_stand_in_capture(monkeypatch):
    """CUDA graph capture replaced by a stand-in whose replay reruns the captured function and writes its
    results into the captured outputs: everything but the capture itself (static buffers, noise indices,
    reference tensors, checkpoint copies) runs on the CPU as it would on a GPU."""
    def stand_in(fn, device):
        outputs = fn()

        def replay():
            results = fn()
            with torch.no_grad():
                for buffer, value in zip(outputs, results):
                    buffer.copy_(value)

        return SimpleNamespace(replay=replay), outputs

    monkeypatch.setattr(graphs, "capture", stand_in)
    monkeypatch.setattr(api, "graphs_wanted", lambda x, wanted: bool(wanted))


def _tiny_model():
    torch.manual_seed(0)
    return ScoreSDEEpsModel(NCSNpp(TINY)).eval().requires_grad_(False)


@pytest.mark.parametrize("guidance, solver", [(None, "sde"), ("gdmp", "sde"), ("agdm", "ode-heun"), ("agdm", "ddpm")])
def test_static_buffers_replay_the_eager_solve(monkeypatch, guidance, solver):
    # The graphed path must equal the eager one exactly, for new images and noise on the second call too.
    use_stand_in_capture(monkeypatch)
    model = _tiny_model()
    options = dict(solver=solver, steps=None if solver == "ddpm" else 3, guidance=guidance)
    for seed in (1, 2):
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        graphed = _purified(x, model, seed, t_star=0.003, graphs=True, **options)
        eager = _purified(x, model, seed, t_star=0.003, graphs=False, **options)
        assert torch.equal(graphed, eager)
    assert cached_graphs(model) == 1


@pytest.mark.parametrize("flag", ["allow_tf32", "deterministic", "benchmark"])
def test_changing_a_cudnn_switch_builds_a_new_graph(monkeypatch, flag):
    # A graph replays the kernels it recorded: one captured with TF32 off must not serve a call with TF32 on
    # (seen on an H200: the "tf32" bench row replayed the fp32 capture at the fp32 time), nor one captured with
    # cuDNN's nondeterministic algorithms a call made after asking for deterministic ones.
    use_stand_in_capture(monkeypatch)
    model, x = _tiny_model(), torch.rand(2, 3, 32, 32)
    monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    for allowed in (False, True, False):
        setattr(torch.backends.cudnn, flag, allowed)
        _purified(x, model, 0, t_star=0.003, steps=2, graphs=True)
    assert cached_graphs(model) == 2


def test_changing_the_backend_by_environment_builds_a_new_graph(monkeypatch):
    # RDP_CORE_BACKEND is meant for A/B runs: a graph captured on one backend must not answer for another.
    use_stand_in_capture(monkeypatch)
    model, x = _tiny_model(), torch.rand(2, 3, 32, 32)
    for backend in ("torch", "auto", "torch"):
        monkeypatch.setenv("RDP_CORE_BACKEND", backend)
        _purified(x, model, 0, t_star=0.003, steps=2, graphs=True)
    assert cached_graphs(model) == 2


def _count_captures(monkeypatch):
    captures = []
    stand_in = graphs.capture
    monkeypatch.setattr(graphs, "capture", lambda fn, device: captures.append(1) or stand_in(fn, device))
    return captures


@pytest.mark.parametrize("guidance", [None, "agdm"])
def test_moved_or_edited_weights_build_a_new_graph(monkeypatch, guidance):
    # A graph reads the weights at their addresses at capture time: after model.cpu().cuda() or `p.data = ...`
    # a replay would read freed memory. A tracked in-place edit (load_state_dict, an optimizer step) builds a
    # new graph too: a bf16 wrapper's graph reads the casts it made at capture. Likewise for AGDM's network.
    use_stand_in_capture(monkeypatch)
    captures = _count_captures(monkeypatch)
    model, x = _tiny_model(), torch.rand(2, 3, 32, 32)
    network = cached_auxiliary("cpu")
    options = {} if guidance is None else dict(guidance=guidance, guidance_options={"network": network})

    def purify():
        _purified(x, model, 0, t_star=0.003, steps=2, graphs=True, **options)

    purify()
    purify()
    assert len(captures) == 1
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    purify()
    assert len(captures) == 2
    moved = [model] if guidance is None else [model, network]
    for module in moved:
        for p in module.parameters():
            p.data = p.data.clone()  # the same values at new addresses
        purify()
    assert len(captures) == 2 + len(moved)
    assert cached_graphs(model) == (1 if guidance is None else 2)  # the model's own move dropped its old graphs


@pytest.mark.parametrize("guidance, solver, options", [(None, "sde", None), ("gdmp", "sde", None),
                                                       ("agdm", "ode-heun", None),
                                                       ("agdm", "sde", {"latent": False})],
                         ids=["plain", "gdmp", "agdm", "agdm-without-latent"])
def test_graphed_adjoint_gives_the_eager_adjoint_gradient(monkeypatch, guidance, solver, options):
    # agdm-without-latent: the input's features are a reference tensor that requires grad and is never read.
    # Two purifications through one graph before either backward: each gradient must still be its own (the
    # checkpoints and the noise are reloaded for the backward, not read from buffers the second forward reused).
    use_stand_in_capture(monkeypatch)
    model = _tiny_model()
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def purified(x, seed, graphs):
        leaf = x.clone().requires_grad_()
        out = rdp_core.purify(leaf, 0.003, model=model, solver=solver, steps=3, guidance=guidance, grad="adjoint",
                              guidance_options=options, generator=torch.Generator().manual_seed(seed), graphs=graphs)
        return leaf, out

    graphed = [purified(x, seed, True) for seed, x in enumerate(images)]
    graphed_grads = [torch.autograd.grad((out * weights).sum(), leaf)[0] for leaf, out in graphed]
    for seed, (x, (_, graphed_out), graphed_grad) in enumerate(zip(images, graphed, graphed_grads)):
        leaf, out = purified(x, seed, False)
        assert torch.equal(graphed_out.detach(), out.detach())
        assert torch.equal(graphed_grad, torch.autograd.grad((out * weights).sum(), leaf)[0])
    assert cached_graphs(model) == 1


def _model():
    torch.manual_seed(0)
    return ScoreSDEEpsModel(NCSNpp(CPU_MODEL)).eval().requires_grad_(False).cuda()


def _purified(x, model, seed, t_star=0.05, **options):
    options = {"steps": 10, **options}
    return rdp_core.purify(x, t_star, model=model, grad="none", generator=torch.Generator().manual_seed(seed),
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
def test_a_model_moved_off_the_gpu_and_back_is_not_replayed_from_freed_memory():
    # New weights at new addresses (the old ones, freed, still hold the old values): a stale graph would
    # replay the old model.
    model, x = _model(), torch.rand(2, 3, 32, 32, device="cuda")
    _purified(x, model, 0, graphs=True)
    model.cpu()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.cuda()
    assert torch.equal(_purified(x, model, 0, graphs=True), _purified(x, model, 0, graphs=False))


@needs_cuda
def test_a_bf16_graph_follows_weights_edited_in_place():
    # The bf16 wrapper keeps its casts of the weights, and a graph reads the casts made at its capture: after
    # load_state_dict a replay of that graph would still purify with the old weights.
    model, x = _model(), torch.rand(2, 3, 32, 32, device="cuda")
    _purified(x, model, 0, graphs=True, precision="bf16")
    model.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    assert torch.equal(_purified(x, model, 0, graphs=True, precision="bf16"),
                       _purified(x, model, 0, graphs=False, precision="bf16"))


@needs_cuda
def test_disabling_graphs_by_environment(monkeypatch):
    monkeypatch.setenv("RDP_CORE_DISABLE_GRAPHS", "1")
    model = _model()
    _purified(torch.rand(2, 3, 32, 32, device="cuda"), model, 0)
    assert cached_graphs(model) == 0


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """cuDNN restricted to deterministic algorithms. Some of its backward-data convolutions accumulate with
    atomics, which guidance (a backward pass inside every step) amplifies: on an H200 (2026-11-28,
    bench/gpu/agdm_repeatability.py) eager AGDM differed from itself by up to 1.4e-4 with the default
    algorithms, and graphed equalled eager bit for bit with the deterministic ones."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def assert_as_close_as_eager_to_itself(graphed, eager, eager_again, atol, rtol=0.0):
    """graphed within atol + rtol |eager| of eager elementwise, or within 4x the largest distance between two
    eager runs when GPU kernels (atomics) make eager differ from itself: a graph bug shows as a gap far beyond
    eager's own spread."""
    spread = (eager_again - eager).abs().max().item()
    gap = (graphed - eager).abs()
    allowed = (atol + rtol * eager.abs()).clamp(min=4 * spread)
    assert (gap <= allowed).all(), (f"graphed is up to {gap.max().item():.3g} from eager, over the tolerance at "
                                    f"{(gap > allowed).sum().item()} elements; eager is {spread:.3g} from itself")


@needs_cuda
@pytest.mark.parametrize("guidance, solver", [("gdmp", "sde"), ("agdm", "sde"), ("agdm", "ode-heun")])
def test_guided_graphed_equals_eager(deterministic_cudnn, guidance, solver):
    # The guidance gradient's backward pass is captured with the steps; guided no-grad solves are graphed by
    # default on CUDA.
    model, x = _model(), torch.rand(4, 3, 32, 32, device="cuda")
    options = dict(solver=solver, guidance=guidance)
    for seed in (1, 2):
        graphed = _purified(x, model, seed, **options)
        assert torch.equal(graphed, _purified(x, model, seed, graphs=False, **options))
        x = torch.rand(4, 3, 32, 32, device="cuda")
    assert cached_graphs(model) == 1


@needs_cuda
@pytest.mark.parametrize("guidance", [None, "agdm"])
def test_graphed_adjoint_gradient_equals_the_eager_adjoint_on_the_gpu(deterministic_cudnn, guidance):
    model, x = _model(), torch.rand(4, 3, 32, 32, device="cuda")
    weights = torch.randn(4, 3, 32, 32, device="cuda")

    def gradient(graphs):
        leaf = x.clone().requires_grad_()
        out = _purified_with_grad(leaf, model, 5, guidance=guidance, graphs=graphs)
        return torch.autograd.grad((out * weights).sum(), leaf)[0]

    eager, eager_again = gradient(False), gradient(False)
    assert eager.abs().max() > 0
    assert_as_close_as_eager_to_itself(gradient(True), eager, eager_again, atol=1e-5, rtol=1e-4)
    # a replay of the cached graphs
    assert_as_close_as_eager_to_itself(gradient(True), eager, eager_again, atol=1e-5, rtol=1e-4)
    assert cached_graphs(model) == 1


def _purified_with_grad(x, model, seed, **options):
    return rdp_core.purify(x, 0.05, model=model, steps=10, grad="adjoint",
                           generator=torch.Generator().manual_seed(seed), **options)
