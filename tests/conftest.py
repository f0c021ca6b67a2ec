"""Test configuration shared by every test module.

Kernels are tested on CPU through Triton's interpreter unless a CUDA GPU is present;
``TRITON_INTERPRET`` must be set before Triton decorates the kernels, i.e. before the
package is imported, hence here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Tests cover many shape keys once each; autotuning every key would dominate the run.
    os.environ.setdefault("STREAM_ATTENTION_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
