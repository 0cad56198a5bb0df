"""pytest hooks. Shared helpers live in ``helpers.py`` (importing it sets ``TRITON_INTERPRET=1``
without a GPU, which must happen before any kernel module is imported)."""
from helpers import HAS_CUDA, TRITON_DEVICE

from importlib import metadata  # noqa: E402

import pytest  # noqa: E402

# The releases that have broken us before (transformers 5.25 through its new `kernels` dependency): their
# resolved versions head every test log, `.ci/run`'s included, so an upstream break is read, not guessed.
WATCHED_PACKAGES = ("torch", "triton", "transformers", "trl", "peft", "kernels", "deepspeed", "accelerate",
                    "liger-kernel", "numpy")


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def pytest_report_header(config):
    return "resolved: " + ", ".join(f"{name} {_version(name)}" for name in WATCHED_PACKAGES)


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
