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


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) with the device synchronised inside the timed call and the device name recorded."""

    def run(fn, device, **extra_info):
        benchmark.extra_info.update(device=device_name(device), **extra_info)

        def call():
            out = fn()
            synchronize(device)
            return out

        return benchmark(call)

    return run
