import platform

import pytest
import torch


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} x{torch.get_num_threads()} threads"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphed(fn, calls):
    """One CUDA graph holding `calls` back-to-back calls of fn (warmed up on a side stream first, so Triton's
    JIT and autotuning stay out of the capture): replaying it costs the device work without the host's
    per-launch overhead, which at UNet shapes is larger than the kernels themselves."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


@pytest.fixture
def timed(benchmark):
    """timed(fn, device, graph_calls=0, **extra_info): benchmark fn with the device synchronised inside the
    timed call and the device name recorded; returns the median seconds per call of fn (None under
    --benchmark-disable).

    graph_calls > 0 on a CUDA device times replays of a CUDA graph of that many calls instead (extra_info says
    so): the kernels' own time, for comparing kernels with each other and with the copy bandwidth.
    """

    def run(fn, device, graph_calls=0, **extra_info):
        calls = graph_calls if device.type == "cuda" and graph_calls > 0 else 1
        benchmark.extra_info.update(device=device_name(device), **extra_info)
        if calls > 1:
            fn = _graphed(fn, calls)
            benchmark.extra_info["timing"] = f"CUDA graph replay of {calls} calls, per call"

        def call():
            out = fn()
            synchronize(device)
            return out

        benchmark(call)
        if benchmark.stats is None:  # --benchmark-disable
            return None
        seconds = benchmark.stats.stats.median / calls
        benchmark.extra_info["seconds per call"] = seconds
        return seconds

    return run
