"""The one capture of the environment a measurement ran in (``python -m bench``, ``--e2e``, the GPU session).

Keys, the same everywhere (``results.json``'s ``meta``, ``e2e.json``'s ``meta``, the GPU session's
``env`` phase):

- ``versions()`` (touches no device, so a hung CUDA initialisation cannot take it): ``python``,
  ``torch``, ``cuda`` (``torch.version.cuda``), ``hip`` (``torch.version.hip``), ``triton``, ``cpu``,
  ``git_commit``, ``git_dirty``, ``timestamp`` (UTC, ISO 8601).
- ``device_meta(device)``: ``device`` (the type: ``cuda`` / ``cpu``), ``device_name``, and on a GPU
  ``capability``, ``sm_count``, ``memory_bytes``.
- ``capture(device)``: both.

The commit is ``ALIGNKERNELS_COMMIT`` when set (a checkout copied to a GPU machine without ``.git``),
else ``git rev-parse HEAD``. This module imports nothing else of ``bench``.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_text(cmd: list[str], timeout: float = 20) -> str | None:
    """``cmd``'s stripped stdout, or None when it fails or cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """The results folder's name for ``device``, e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    base = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{base}".lower()).strip("-")
    return slug[:60] or device.type


def git_commit() -> str | None:
    return os.environ.get("ALIGNKERNELS_COMMIT") or run_text(["git", "rev-parse", "HEAD"], timeout=10) or None


def git_dirty() -> bool | None:
    """Whether tracked files had uncommitted changes (None: not a git checkout)."""
    status = run_text(["git", "status", "--porcelain", "--untracked-files=no"], timeout=10)
    return bool(status) if status is not None else None


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no triton (or a broken one) is a fact to record
        triton_version = None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None), "triton": triton_version, "cpu": cpu_model(),
        "git_commit": git_commit(), "git_dirty": git_dirty(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def device_meta(device: torch.device) -> dict:
    meta = {"device": device.type, "device_name": device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_bytes=props.total_memory)  # fmt: skip
    return meta


def capture(device: torch.device) -> dict:
    return {**versions(), **device_meta(device)}
