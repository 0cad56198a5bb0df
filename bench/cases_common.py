"""Availability checks and small helpers shared by the ``cases_*`` modules.

Every check returns ``None`` when a provider can run on the device, else a one-line reason that
the run prints as a skip note (a peer that is not installed, an alignkernels op or backend that
is not built yet, a GPU-only kernel on CPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch


def import_attr(path: str):
    """``"pkg.mod:attr.sub"`` or ``"pkg.attr"`` -> the object (raises ImportError/AttributeError)."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


# ``bash bench/gpu_session.sh --dry-run`` runs the Triton providers on CPU under the interpreter
# (it sets this and TRITON_INTERPRET=1 before anything imports a kernel).
TRITON_ON_CPU_ENV = "ALIGNKERNELS_BENCH_TRITON_ON_CPU"


def triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (os.environ.get(TRITON_ON_CPU_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1")


def needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device (GPU-only kernel)"


def package_check(module: str, label: str, *, cuda_only: bool = False) -> Callable[[torch.device], str | None]:
    """A peer library: skipped when not installed (or on CPU when it only has GPU kernels)."""

    def check(device: torch.device):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{label} not installed"
        if cuda_only and device.type != "cuda":
            return f"{label}: needs a CUDA device (GPU-only kernel)"
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            return f"{label} not importable ({_first_line(exc)})"
        return None

    return check


def ours_check(
    attrs: tuple[str, ...], backend: str | None = None, probe: Callable[[torch.device], None] | None = None
) -> Callable[[torch.device], str | None]:
    """An alignkernels provider: every ``alignkernels.<attr>`` must import; ``backend`` "triton"/"cuda"
    need a CUDA device; ``probe(device)`` (a tiny call) must not raise, e.g. the CUDA extension
    must be built."""

    def check(device: torch.device):
        import alignkernels

        for attr in attrs:
            try:
                getattr(alignkernels, attr)
            except Exception as exc:  # noqa: BLE001 - op still being written, or broken import
                return f"not available (alignkernels.{attr}: {_first_line(exc)})"
        if backend == "cuda" and device.type != "cuda" or backend == "triton" and not triton_runs_on(device):
            return f"backend '{backend}' needs a CUDA device"
        if probe is not None:
            try:
                probe(device)
            except Exception as exc:  # noqa: BLE001
                return f"not available ({_first_line(exc)})"
        return None

    return check


def weighted_sum(logp, entropy, inputs) -> torch.Tensor:
    """The scalar the backward starts from: per-token weights on both outputs, as RL losses do."""
    loss = (logp * inputs["w_logp"]).sum()
    if entropy is not None:
        loss = loss + (entropy * inputs["w_entropy"]).sum()
    return loss


def weighted_logp_entropy_loss(out, inputs) -> torch.Tensor:
    """``to_loss`` of the log-prob ops: per-token weights on logp and (when returned) entropy."""
    logp, entropy = split_outputs(out)
    return weighted_sum(logp, entropy, inputs)


def split_outputs(out):
    """(logp, entropy-or-None) from whatever a provider returned."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None
