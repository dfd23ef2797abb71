"""rdp_core: diffusion-based adversarial purification with exact, affordable full-gradient attacks.

    import rdp_core
    x_pure = rdp_core.purify(x, t_star=0.1, model=eps_model)   # x: float NCHW in [0, 1]

Importing this package loads no kernels, imports no triton and queries no device.
"""
__version__ = "0.1.0"

from rdp_core.api import Purifier, diffuse, eot_gradient, purify

__all__ = ["Purifier", "diffuse", "eot_gradient", "purify", "__version__"]
