"""Fixtures of the emulated CUDA tests: one cached build of ``csrc/`` per session, and, per test,
the CUDA backend switched to it for CPU tensors (the emulated mode of `alignkernels/_cuda_backend.py`), switched back afterwards."""
import pytest

from alignkernels import _cuda_backend, _utils
from cuemu import emulator


@pytest.fixture(scope="session")
def emulated_build():
    try:
        return emulator.load(emulator.build())
    except emulator.EmulatorUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def emulated(emulated_build):
    """The emulated ``_C`` behind ``backend="cuda"`` for CPU tensors, for the duration of one test."""
    emulated_build.set_seed(1234)
    _utils.allow_cuda_backend_on_cpu(True)
    _cuda_backend.install_emulated_extension(emulated_build.module)
    emulator.activate(emulated_build)
    yield emulated_build
    emulator.activate(None)
    emulated_build.free_device()
    _cuda_backend.install_emulated_extension(None)
    _utils.allow_cuda_backend_on_cpu(False)
