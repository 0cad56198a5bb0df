"""What a phase leaves behind: ``<work>/<phase>.json``, rewritten atomically after every step, so a
phase killed at its limit keeps its finished steps; ``status.tsv`` (written by the shell) with each
phase's exit code, seconds and limit."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

MAX_FILE_BYTES = 15 << 20  # every output file stays under the 16 MB a window can bring back


class PhaseRecord:
    """``<work>/<phase>.json``, rewritten atomically after every step."""

    def __init__(self, work: Path, phase: str):
        self.path = Path(work) / f"{phase}.json"
        self.data: dict = {"phase": phase, "steps": {}, "started": time.time()}

    def step(self, name: str, value) -> None:
        self.data["steps"][name] = value
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.time()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def run_step(record: PhaseRecord, name: str, deadline: float, fn, *, min_left_s: float = 5.0):
    """Run one step unless the phase's deadline is too close; an exception becomes the step's record."""
    left = deadline - time.time()
    if left < min_left_s:
        record.step(name, {"status": "skipped", "note": f"only {left:.0f} s left in the phase"})
        return None
    t0 = time.time()
    print(f"[{record.data['phase']}] {name} ...", flush=True)
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - a failed step is data; the phase goes on
        value = {"status": "error", "note": f"{type(exc).__name__}: {str(exc).strip()[:400]}"}
    if isinstance(value, dict):
        value.setdefault("status", "ok")
        value["seconds"] = round(time.time() - t0, 2)
    record.step(name, value)
    print(f"[{record.data['phase']}] {name}: {value.get('status') if isinstance(value, dict) else 'ok'}"
          f" ({time.time() - t0:.1f} s)", flush=True)  # fmt: skip
    return value


def load_phase(work: Path, phase: str) -> dict | None:
    path = Path(work) / f"{phase}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_status(work: Path) -> list[dict]:
    """``status.tsv`` lines written by the shell: phase, exit code, seconds, limit."""
    rows = []
    path = Path(work) / "status.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                rc = parts[1]
                meaning = {"0": "ok", "124": "TIMEOUT (killed at its limit)", "137": "KILLED",
                           "skip": "skipped (no time left)"}.get(rc, f"exit code {rc}")  # fmt: skip
                rows.append({"phase": parts[0], "exit": rc, "seconds": parts[2], "limit": parts[3],
                             "status": meaning, "note": parts[4] if len(parts) > 4 else ""})  # fmt: skip
    return rows
