"""CIFAR-10 from the official python-pickle release (`cifar-10-batches-py/`).

Root lookup: the `root` argument, else $RDP_CORE_DATA, else ~/.cache/rdp_core/data. The root may be the
folder that contains `cifar-10-batches-py/` or that folder itself. The pickles are read with an unpickler
that can build numpy arrays and nothing else, so a tampered file cannot execute code.
"""
import numbers
import os
import pickle
from pathlib import Path

import numpy as np
import torch

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_root():
    return Path(os.environ.get("RDP_CORE_DATA") or Path.home() / ".cache" / "rdp_core" / "data")


def cifar10_folder(root=None):
    """The `cifar-10-batches-py` folder under `root` (or the lookup order of the module docstring)."""
    root = Path(root) if root is not None else default_root()
    return root if root.name == CIFAR10_FOLDER else root / CIFAR10_FOLDER


def load_cifar10(split="test", root=None, dtype=torch.uint8, limit=None):
    """Images (N, 3, 32, 32) and labels (N,) int64 of the `split` ("train" or "test").

    `dtype` torch.uint8 gives raw pixels; a floating dtype gives values in [0, 1]. "train" reads whichever
    data_batch_* files are present (at least one). `limit` keeps the first `limit` images.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a positive number of images or None, got {limit!r}")
    folder = cifar10_folder(root)
    files = _split_files(folder, split)
    images, labels = [], []
    for path in files:
        batch = _read_batch(path)
        images.append(batch[b"data"])
        labels.extend(batch[b"labels"])
        if limit is not None and len(labels) >= limit:
            break
    x = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    y = torch.tensor(labels, dtype=torch.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _to_dtype(x, dtype), y


def _split_files(folder, split):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    wanted = TRAIN_FILES if split == "train" else TEST_FILES
    present = [folder / name for name in wanted if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"CIFAR-10 {split} data not found: none of {', '.join(wanted)} is in {folder}. "
            f"Download {CIFAR10_URL} and extract it into the data root (which then holds {CIFAR10_FOLDER}/), "
            "and pass that root as `root`, set RDP_CORE_DATA, or use ~/.cache/rdp_core/data."
        )
    return present


def _to_dtype(x, dtype):
    if dtype == torch.uint8:
        return x.contiguous()
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    return x.to(dtype) / 255.0


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds the dicts, lists, bytes and numpy arrays of the CIFAR-10 pickles, refusing any other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own array reconstructor, whatever its module
        return getattr(np, name)


def _read_batch(path):
    with open(path, "rb") as f:
        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(batch[b"labels"]):
        raise ValueError(f"{path}: expected (n, 3072) uint8 data with n labels, got {data.shape}")
    return {b"data": data, b"labels": list(batch[b"labels"])}
