"""The GPU machine's Triton: every ``COMPILE_CASES`` kernel also compiles to sm_90 cubin, without
spills, with the Triton release of the machine ``bench/gpu_session.sh`` runs on (3.6; CI runs 3.9).

A virtual environment holding only that Triton (no torch: ``bench.kernel_report --kernels-only``
loads ``kernels/`` without the ``alignkernels`` package) is built once and cached outside the
repository, keyed by Triton and Python version:
``~/.cache/alignkernels/triton-<version>-py<major><minor>-venv`` (``ALIGNKERNELS_CACHE`` moves the
root; ``ALIGNKERNELS_COMPAT_TRITON`` picks another version). Where pip cannot install that wheel for
this Python, the test is skipped and the skip says why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_report import iter_compile_cases

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_VERSION = os.environ.get("ALIGNKERNELS_COMPAT_TRITON", "3.6.0")
CC = 90
CACHE = Path(os.environ.get("ALIGNKERNELS_CACHE", Path.home() / ".cache" / "alignkernels"))
VENV = CACHE / f"triton-{TRITON_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-venv"
CASE_IDS = [case_id for case_id, _ in iter_compile_cases()]
pytestmark = pytest.mark.slow  # ~20 s for the venv once, ~30 s to compile every case on 2 cores


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _venv_env() -> dict:
    """This process's environment minus what would change the venv's Triton: TRITON_INTERPRET (the
    interpreter needs numpy, which the venv does not hold) and PYTHONPATH (CI's packages)."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}


def _installed_version() -> str | None:
    if not _venv_python().exists():
        return None
    out = subprocess.run([str(_venv_python()), "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True, env=_venv_env())  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv() -> str | None:
    """Build the cached venv if needed; ``None`` when ready, else why it could not be built."""
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(VENV) + ".lock", timeout=600):
        if _installed_version() == TRITON_VERSION:
            return None
        made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], capture_output=True, text=True)
        if made.returncode != 0:
            return f"could not create a venv: {made.stderr.strip()[-300:]}"
        env = dict(_venv_env(), PIP_CONSTRAINT="")  # a site constraint pinning CI's triton must not apply here
        pip = subprocess.run([str(_venv_python()), "-m", "pip", "install", "-q", "--no-cache-dir",
                              f"triton=={TRITON_VERSION}"], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
        if pip.returncode != 0:
            return (f"pip cannot install triton=={TRITON_VERSION} for Python "
                    f"{sys.version_info.major}.{sys.version_info.minor}: {pip.stderr.strip()[-300:]}")  # fmt: skip
        if _installed_version() != TRITON_VERSION:  # installed but not importable: a failure, not a skip
            raise RuntimeError(f"pip installed triton=={TRITON_VERSION} but the venv imports {_installed_version()}")
    return None


@pytest.fixture(scope="module")
def compat_results():
    reason = ensure_venv()
    if reason is not None:
        pytest.skip(reason)
    proc = subprocess.run([str(_venv_python()), "-m", "bench.kernel_report", "--kernels-only", str(CC)],
                          capture_output=True, text=True, env=_venv_env(), cwd=REPO_ROOT, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_compat_venv_holds_only_triton(compat_results):
    out = subprocess.run([str(_venv_python()), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                         capture_output=True, text=True, env=_venv_env())  # fmt: skip
    assert out.stdout.strip() == "None", "the compatibility venv must not hold torch"
    assert _installed_version() == TRITON_VERSION
    assert set(compat_results) == {f"{case_id}@sm{CC}" for case_id in CASE_IDS}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_compiles_with_gpu_machine_triton(compat_results, case_id):
    result = compat_results[f"{case_id}@sm{CC}"]
    assert result["ok"], f"triton {TRITON_VERSION}: {result['error']}"
    assert result["cubin_bytes"] > 0 and result["registers"] > 0
    assert result["local_bytes"] == 0, f"triton {TRITON_VERSION}: {result['local_bytes']} bytes of spills per thread"
