"""Shared test set-up: GPU tests skip cleanly without CUDA; CPU kernel tests use the Triton interpreter."""
import os

import pytest
import torch

# The Triton interpreter must be chosen before triton compiles anything; on a CUDA machine the
# kernels run for real instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fp32 references must be fp32: cuDNN and cuBLAS would otherwise use TF32 on the GPU (~1e-3 error).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """CUDA where there is one, else CPU (kernels then run in the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
