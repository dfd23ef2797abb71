"""Input checks shared by the purifier and the attacks: bad input is a clear ValueError, never a wrong answer."""
import torch

# How far outside [0, 1] an input may stray (rounding of attack iterates) before it is an error.
RANGE_TOLERANCE = 1e-3


def check_images(x):
    """ValueError unless `x` is a finite floating NCHW batch with values in [0, 1] (within RANGE_TOLERANCE)."""
    if not torch.is_tensor(x):
        raise ValueError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        hint = " (convert uint8 pixels with x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"expected a floating-point tensor with values in [0, 1], got dtype {x.dtype}{hint}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf; expected finite values in [0, 1]")
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"expected images with values in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(map [-1, 1] data with (x + 1) / 2, or uint8 pixels with x.float() / 255)"
        )


def check_labels(y, x):
    """ValueError unless `y` holds one int64 class index per image of `x`, on x's device."""
    if not torch.is_tensor(y) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        dtype = y.dtype if torch.is_tensor(y) else ""
        raise ValueError(f"expected labels as an int64 tensor of shape ({x.shape[0]},), got {shape} {dtype}")
    if y.device != x.device:
        raise ValueError(f"labels are on {y.device} but the images are on {x.device}")
