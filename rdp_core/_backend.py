"""Which implementation runs an op, decided per call from the tensor it gets, never at import.

Order for backend="auto": a CUDA tensor with triton installed -> "triton"; a CPU tensor with the
compiled extension built -> "cpp"; otherwise stock torch ops, "torch". The environment
variable RDP_CORE_BACKEND replaces "auto" everywhere (for A/B runs and debugging). Asking for a backend
that cannot run on the given tensor is a ValueError, never a silent fallback.
"""
import contextlib
import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("torch", "cpp", "triton")


@functools.lru_cache(maxsize=None)
def cpp_extension():
    """The compiled module rdp_core._C, or None after one warning when it was not built."""
    try:
        from rdp_core import _C
    except ImportError as err:
        warnings.warn(
            f"rdp_core._C is not built ({err}); CPU ops run on the slower torch reference. "
            "Reinstall with a C++17 compiler available to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


@functools.lru_cache(maxsize=None)
def triton_installed():
    return importlib.util.find_spec("triton") is not None


def _unavailable_reason(backend, x):
    """Why `backend` cannot run on tensor `x`, or None when it can."""
    if backend == "cpp":
        if x.device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got a tensor on {x.device}"
        if cpp_extension() is None:
            return "rdp_core._C was not built"
    if backend == "triton":
        if not x.is_cuda:
            return f"the triton backend runs on CUDA tensors, got a tensor on {x.device}"
        if not triton_installed():
            return "triton is not installed"
    return None


def environment_backend():
    """The backend RDP_CORE_BACKEND names, or "auto"."""
    return os.environ.get("RDP_CORE_BACKEND", "auto") or "auto"


def select(op, x, requested="auto", implemented=BACKENDS, environment=True):
    """The backend that runs `op` on `x`: one of `implemented`, chosen as the module docstring says (without
    reading RDP_CORE_BACKEND when `environment` is False: for ops that interpret it themselves)."""
    if requested == "auto" and environment:
        requested = environment_backend()
    if requested == "auto":
        for backend in ("triton", "cpp"):
            if backend in implemented and _unavailable_reason(backend, x) is None:
                return backend
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r}; expected 'auto' or one of {BACKENDS}")
    if requested not in implemented:
        raise ValueError(f"{op}: no {requested!r} backend; this op has {tuple(implemented)}")
    reason = _unavailable_reason(requested, x)
    if reason is not None:
        raise ValueError(f"{op}: backend {requested!r} was requested but {reason}")
    return requested


def profiled(name):
    """A profiler range named `name` while torch's profiler runs, else nothing: calls into rdp_core._C are not
    aten ops, so without it their time would be missing from torch.profiler tables."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def peak_cpu_tensor_bytes(fn):
    """Peak bytes of CPU tensors alive while fn() runs, above those alive before it, from torch.profiler's memory
    events (the CPU allocator keeps no peak statistic of its own, unlike CUDA's)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
