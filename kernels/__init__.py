"""Triton kernels, shipped as rdp_core.kernels (see pyproject.toml).

Only @triton.jit functions and plain launchers live here; rdp_core.ops imports these modules lazily, and
only for CUDA tensors, so `import rdp_core` never imports triton. The kernels issue adds the sources.
"""
