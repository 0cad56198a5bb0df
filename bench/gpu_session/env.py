"""Phase ``env``: what a failure needs for diagnosis, in three steps recorded as each ends (versions and
the import check; compilers, Python headers, packaging tools, ``pip check``; device, driver, TF32
flags), so a hung CUDA initialisation in the last one keeps the first two. The keys of
``bench.environment`` plus the session's own."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .record import PhaseRecord, run_step

PEER_PACKAGES = ("trl", "liger-kernel", "cut-cross-entropy", "transformers", "datasets", "accelerate")
TOOL_PACKAGES = ("pip", "setuptools", "wheel", "pytest", "pytest-timeout", "pybind11", "ninja", "numpy", "pyarrow",
                 "huggingface_hub", "fsspec")


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_check(module: str) -> str:
    try:
        return f"ok ({importlib.import_module(module).__file__})"
    except Exception as exc:  # noqa: BLE001 - recorded: an install problem shows here first
        return f"{type(exc).__name__}: {exc}"


def environment() -> dict:
    """``bench.environment.versions()`` plus the peers' versions and whether the kernels import;
    touches no device (a hung CUDA initialisation cannot take it)."""
    from ..environment import versions

    return {
        **versions(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "packages": {name: package_version(name) for name in PEER_PACKAGES},
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "alignkernels": import_check("alignkernels.kernels.token_logprobs"),
    }  # fmt: skip


def version_line(cmd: list[str], pattern: str = "") -> str | None:
    """The first line of ``cmd``'s output that contains ``pattern``."""
    from ..environment import run_text

    lines = [ln.strip() for ln in (run_text(cmd) or "").splitlines() if pattern in ln and ln.strip()]
    return lines[0] if lines else None


def toolchain() -> dict:
    """What an install or build failure needs for diagnosis: compilers, Python headers, the
    packaging tools and data libraries the peers import, and ``pip check``."""
    import sysconfig

    from alignkernels import _build

    nvcc = _build.find_nvcc()
    include = sysconfig.get_paths().get("include") or ""
    try:  # within the phase's 20 s, leaving the device step its time
        check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=8)
        pip_check = {"exit_code": check.returncode, "output": (check.stdout + check.stderr).strip()[-2000:]}
    except subprocess.TimeoutExpired:
        pip_check = {"exit_code": None, "output": "pip check did not finish in 8 s"}
    return {
        "nvcc": nvcc, "nvcc_version": version_line([nvcc, "--version"], "release") if nvcc else None,
        "gcc_version": version_line([shutil.which("gcc") or "gcc", "--version"]),
        "python_headers": include if (Path(include) / "Python.h").is_file() else f"missing ({include}/Python.h)",
        "packaging": {name: package_version(name) for name in TOOL_PACKAGES},
        "pythonpath": os.environ.get("PYTHONPATH"),
        "pip_check": pip_check,
    }  # fmt: skip


def device_info() -> dict:
    """``bench.environment.device_meta`` of the GPU (else the CPU), driver, TF32 flags: the phase's
    first CUDA call."""
    import torch

    from ..environment import device_meta, run_text

    gpu = torch.cuda.is_available()
    info = {**device_meta(torch.device("cuda" if gpu else "cpu")),
            "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()}}  # fmt: skip
    smi = run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]) \
        if gpu else None  # fmt: skip
    info.update(nvidia_smi=smi, driver=smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None)
    return info


def phase_env(args) -> int:
    record = PhaseRecord(args.work, "env")
    run_step(record, "environment", args.deadline, environment)
    run_step(record, "toolchain", args.deadline, toolchain)
    run_step(record, "device", args.deadline, device_info)
    return 0
