"""Replayable noise for the samplers.

Every random draw of a purification is a pure function of one 63-bit seed and a draw index: index -1 is
the forward-diffusion noise, index i >= 0 the noise of reverse step i, index -2 - i the guidance's own noise
at reverse step i (GDMP diffuses the input with it). So any run can be replayed exactly,
step by step and in any order (the adjoint backward recomputes segments; the CUDA-graph path and the tests
compare against eager runs), without keeping all noise tensors in memory.
"""
import torch

DIFFUSION_DRAW = -1


def guidance_draw(step):
    """The draw index of reverse step `step`'s guidance noise: negative and distinct from the diffusion draw."""
    return DIFFUSION_DRAW - 1 - step


def guidance_step(index):
    """The reverse step whose guidance noise has draw index `index` (the inverse of guidance_draw)."""
    return DIFFUSION_DRAW - 1 - index
_MASK64 = (1 << 64) - 1


def _splitmix64(value):
    """A well-mixed 63-bit seed from any integer, so that seeds (s, i) and (s, i + 1) are unrelated."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def seed_from(generator=None):
    """A 63-bit seed drawn from `generator` (any device), or from torch's global RNG when None."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


class StepNoise:
    """Standard-normal draws of a fixed shape, indexed by draw number and reproducible from `seed`."""

    def __init__(self, shape, *, seed, device="cpu", dtype=torch.float32):
        self.shape = tuple(shape)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def like(cls, x, generator=None):
        """Noise shaped like `x`, on its device and in its dtype, seeded from `generator`."""
        return cls(x.shape, seed=seed_from(generator), device=x.device, dtype=x.dtype)

    def __call__(self, index):
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_splitmix64(self.seed * 1_000_003 + index + 1))
        return torch.randn(self.shape, generator=generator, device=self.device, dtype=self.dtype)
