import os
import pickle

import numpy as np
import pytest
import torch

from rdp_core.data import CLASSES, load_cifar10


def test_test_split_is_complete_and_balanced(data_root):
    x, y = load_cifar10("test", root=data_root)
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert len(CLASSES) == 10


def test_layout_matches_the_independent_nhwc_subset(data_root):
    # The shared subset stores the first 1000 test images NHWC: a check of the channel-major decoding.
    subset = np.load(data_root / "cifar10-test-subset" / "cifar10_test_first1000.npz", allow_pickle=False)
    x, y = load_cifar10("test", root=data_root, limit=1000)
    assert torch.equal(x, torch.from_numpy(subset["x"]).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.from_numpy(subset["y"]).long())


def test_float_images_are_scaled_to_unit_range(data_root):
    raw, _ = load_cifar10("test", root=data_root, limit=64)
    x, _ = load_cifar10("test", root=data_root, limit=64, dtype=torch.float32)
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert torch.equal(x, raw.float() / 255)


def test_train_split_reads_all_five_batches(data_root):
    x, y = load_cifar10("train", root=data_root)
    assert x.shape == (50_000, 3, 32, 32)
    assert torch.bincount(y, minlength=10).tolist() == [5000] * 10


def test_root_may_be_the_batches_folder_itself_or_come_from_the_environment(data_root, monkeypatch):
    _, y_direct = load_cifar10("test", root=data_root / "cifar-10-batches-py", limit=10)
    monkeypatch.setenv("RDP_CORE_DATA", str(data_root))
    _, y_env = load_cifar10("test", limit=10)
    assert torch.equal(y_direct, y_env)


def test_default_root_is_a_cache_folder_and_missing_data_is_explained(tmp_path, monkeypatch):
    monkeypatch.delenv("RDP_CORE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10("test")
    message = str(err.value)
    assert "test_batch" in message and str(tmp_path / ".cache" / "rdp_core" / "data") in message
    assert "cifar-10-python.tar.gz" in message and "RDP_CORE_DATA" in message


def test_train_uses_whichever_batches_are_present(data_root, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    os.symlink(data_root / "cifar-10-batches-py" / "data_batch_3", folder / "data_batch_3")
    x, y = load_cifar10("train", root=tmp_path)
    assert x.shape[0] == 10_000 == y.shape[0]
    full_x, _ = load_cifar10("train", root=data_root)
    assert torch.equal(x[:5], full_x[20_000:20_005])
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10("train", root=tmp_path / "nowhere")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_cifar10("test", root=tmp_path)


def test_malformed_batches_and_arguments_are_rejected(tmp_path, data_root):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        load_cifar10("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar10("validation", root=data_root)
    with pytest.raises(ValueError, match="dtype"):
        load_cifar10("test", root=data_root, dtype=torch.int32)
