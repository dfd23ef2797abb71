"""GroupNorm+SiLU forward, providers side by side per shape: stock torch eager, our torch reference, ours.

    pytest bench/bench_group_norm_silu.py --benchmark-only --benchmark-group-by=group
"""
import pytest
import torch
import torch.nn.functional as F

from rdp_core import _backend
from rdp_core.ops import group_norm_silu, group_norm_silu_torch

CPU_SHAPES = [(16, 128, 32, 32), (8, 256, 16, 16), (8, 512, 8, 8)]
PROVIDERS = {
    "torch-eager": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)),
    # The two halves of eager alone, to tell its arithmetic from the cost of its intermediate buffer.
    "torch-group_norm-only": lambda x, w, b: F.group_norm(x, 32, w, b),
    "torch-silu-only": lambda x, w, b: F.silu(x),
    "rdp-torch-reference": lambda x, w, b: group_norm_silu_torch(x, 32, w, b),
    "rdp-cpp": lambda x, w, b: group_norm_silu(x, 32, w, b, backend="cpp"),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_forward_cpu(timed, benchmark, shape, provider):
    if provider == "rdp-cpp" and _backend.cpp_extension() is None:
        pytest.skip("rdp_core._C was not built")
    benchmark.group = f"group_norm_silu-fwd-cpu-{'x'.join(map(str, shape))}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    fn = PROVIDERS[provider]
    with torch.no_grad():
        timed(lambda: fn(x, w, b), x.device, shape=list(shape), provider=provider)
    stats = benchmark.stats
    if stats is not None:  # absent under --benchmark-disable
        moved = 2 * x.numel() * x.element_size()  # one read, one write
        benchmark.extra_info["GB/s"] = moved / stats.stats.median / 1e9
