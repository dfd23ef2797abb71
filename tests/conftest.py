import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels can still be checked for indexing and masking in Triton's interpreter,
# which reads this variable once, when triton is first imported: set it before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The real data folder beside the project (../shared/data), or $RDP_CORE_DATA.
SHARED_DATA = Path(os.environ.get("RDP_CORE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def data_root():
    """../shared/data; tests that read real data fail loudly (never skip) when it is missing."""
    if not (SHARED_DATA / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.fail(f"real CIFAR-10 data not found at {SHARED_DATA}: expected ../shared/data beside the project")
    return SHARED_DATA
