"""pytest hooks. Shared helpers live in ``helpers.py`` (importing it sets ``TRITON_INTERPRET=1``
without a GPU, which must happen before any kernel module is imported)."""
from helpers import HAS_CUDA, TRITON_DEVICE

import pytest  # noqa: E402


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
