"""The one record type of a benchmark result, as stored in JSON (``results.json``, the GPU session's
``session.json``) and read by ``bench.report`` (the one renderer) and ``bench.gpu_session``.

A row is a plain dict (it goes to and from JSON unchanged, old result files included) typed as
``ResultRow``: a type checker holds every reader to these keys. ``bench.harness.base_row`` makes
rows; ``bench.harness.annotate_vs_eager`` and ``roofline_fractions`` fill the derived fields.
Imports nothing (no torch), so the renderer stays light.
"""
from __future__ import annotations

from typing import Literal, TypedDict

Status = Literal["ok", "oom", "skipped", "error", "timeout"]


class Timing(TypedDict):
    """Milliseconds over the timed calls (``bench.harness.summarize_ms``)."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int


class ResultRow(TypedDict, total=False):
    op: str  # bench.registry op name
    op_title: str
    provider: str  # "eager", "alignkernels:triton", "trl", "liger", ...
    role: Literal["eager", "ours", "peer"]
    shape: dict[str, int]
    shape_str: str  # "N=8192 V=151936"
    dtype: str  # "bf16", "fp32", ...
    device: str  # device type: "cuda" / "cpu"
    x_axis: str  # the shape key plots use as x
    x: int | None
    status: Status
    note: str
    fwd_ms: Timing | None
    fwdbwd_ms: Timing | None
    peak_fwd_bytes: int | None  # above the inputs
    peak_fwdbwd_bytes: int | None
    input_bytes: int | None
    memory_method: str
    speedup_vs_eager: float | None  # eager time / this time (forward+backward where there is one)
    mem_ratio_vs_eager: float | None  # this peak / eager peak
    roofline_fwd: float | None  # achieved bytes/s or FLOP/s over the measured ceiling
    roofline_fwdbwd: float | None


class Results(TypedDict):
    """``python -m bench``'s output: ``meta`` = ``bench.environment.capture`` + run settings."""

    meta: dict
    rows: list[ResultRow]
    notes: list[str]


def timed_phase(row: ResultRow) -> str:
    """``"fwdbwd"`` when the row has a backward timing, else ``"fwd"`` (the phase tables compare)."""
    return "fwdbwd" if row.get("fwdbwd_ms") else "fwd"


def peak_bytes(row: ResultRow) -> int | None:
    """The peak memory of the row's compared phase (``timed_phase``)."""
    return row.get(f"peak_{timed_phase(row)}_bytes")  # type: ignore[misc]
