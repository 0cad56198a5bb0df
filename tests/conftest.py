"""Test configuration.

Without a GPU, Triton kernels run in the interpreter on CPU tensors. ``TRITON_INTERPRET`` is read
when ``@triton.jit`` decorates a function, so it must be set before any kernel module is
imported -- here, at the very top of conftest.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The device the "triton" backend runs on in this session: real GPU, or the CPU interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device():
    return TRITON_DEVICE
