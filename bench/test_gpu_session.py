"""``bash bench/gpu_session.sh --dry-run``: every phase of the GPU session on CPU (tiny shapes, Triton
interpreted), so the one command that spends a GPU window cannot rot between windows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_session import forced_config, parse_junit, read_status, tuning_markdown

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "gpu_session.sh"
MAX_FILES, MAX_BYTES = 8, 16 << 20


def run_session(out: Path, budget: int, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--budget", str(budget)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)  # fmt: skip


def check_outputs(out: Path) -> list[str]:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert all((out / f).is_file() and (out / f).stat().st_size < MAX_BYTES for f in files)
    return files


@pytest.mark.slow
def test_dry_run_runs_every_phase(tmp_path):
    proc = run_session(tmp_path, budget=300, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = check_outputs(tmp_path)
    assert {"SUMMARY.md", "session.json", "tuning.md", "pytest.log", "phases.log", "headline.png"} <= set(files)
    session = json.loads((tmp_path / "session.json").read_text())
    assert session["dry_run"] is True
    status = {s["phase"]: s["exit"] for s in session["status"]}
    assert status == {"install": "skip", "env": "0", "build": "0", "tests": "0", "bench": "0", "tune": "0"}
    tests = session["tests"]["steps"]["pytest"]
    assert tests["exit_code"] == 0 and tests["passed"] > 0 and tests["failures"] == 0
    bench = session["bench"]["steps"]
    for op in ("token_logprobs", "linear_logprobs", "cross_entropy", "grpo", "dpo"):
        rows = {r["provider"]: r for r in bench[f"headline:{op}"]["rows"]}
        assert rows["eager"]["status"] == "ok", op
        assert all(r["status"] in ("ok", "skipped") for r in rows.values()), (op, rows)
    # the Triton kernels really ran, interpreted, and agree with the eager row's shape of output
    assert {r["provider"]: r["status"] for r in bench["headline:token_logprobs"]["rows"]}["alignkernels:triton"] == "ok"
    assert bench["bare_gemms"]["four_gemms_ms"] > bench["bare_gemms"]["three_gemms_ms"] > 0
    assert len({r["shape_str"] for r in bench["memory:linear_logprobs"]["rows"]}) == 2
    tune = session["tune"]["steps"]
    assert all(r["status"] == "ok" for r in tune["token_logprobs"]["rows"])
    assert all(r["status"] == "ok" for r in tune["linear_logprobs"]["rows"] + tune["linear_logprobs"]["fold"]["rows"])
    assert "**proposed:" in (tmp_path / "tuning.md").read_text()
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "DRY RUN" in summary and "### headline:linear_logprobs" in summary


def test_a_spent_budget_still_writes_the_summary(tmp_path):
    """With no time for any phase (the summary's reserve is 25 s), every phase is skipped and the
    summary says so: the run ends inside its budget and leaves its files."""
    t0 = time.time()
    proc = run_session(tmp_path, budget=26, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 26 + 10
    check_outputs(tmp_path)
    session = json.loads((tmp_path / "session.json").read_text())
    assert {s["phase"]: s["exit"] for s in session["status"]} == {
        "install": "skip", "env": "skip", "build": "skip", "tests": "skip", "bench": "skip", "tune": "skip"}
    assert "skipped" in (tmp_path / "SUMMARY.md").read_text()


def test_junit_counts_and_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure message="assert 1 == 2">'
        'tb</failure></testcase><testcase classname="b" name="boom"><error message="RuntimeError: x"/></testcase>'
        '<testcase classname="b" name="skip"><skipped/></testcase></testsuite></testsuites>'
    )
    got = parse_junit(xml)
    assert (got["passed"], got["failures"], got["errors"], got["skipped"]) == (1, 1, 1, 1)
    assert [f["test"] for f in got["failed"]] == ["a::bad", "b::boom"]
    assert got["failed"][0]["message"] == "assert 1 == 2"


def test_status_rows_name_timeouts(tmp_path):
    (tmp_path / "status.tsv").write_text("tests\t124\t150\t150\t\nbench\t0\t12\t210\t\n")
    rows = {r["phase"]: r["status"] for r in read_status(tmp_path)}
    assert rows == {"tests": "TIMEOUT (killed at its limit)", "bench": "ok"}


def test_forced_config_reaches_the_launcher_and_is_undone():
    import alignkernels.kernels.token_logprobs as kmod

    before = (kmod.TOKEN_LOGPROBS_CONFIGS, kmod.pick_config(10**6))
    with forced_config(kmod.__name__, "TOKEN_LOGPROBS_CONFIGS", (512, 2)):
        assert kmod.pick_config(10**6) == (512, 2) and kmod.TOKEN_LOGPROBS_CONFIGS == ((512, 2),)
    assert (kmod.TOKEN_LOGPROBS_CONFIGS, kmod.pick_config(10**6)) == before


def test_tuning_table_proposes_the_fastest():
    tune = {"steps": {"token_logprobs": {"status": "ok", "knob": "K", "shape": {}, "current": [1, 1], "rows": [
        {"config": [1, 1], "status": "ok", "fwd_ms": 1.0, "fwdbwd_ms": 3.0},
        {"config": [2, 2], "status": "ok", "fwd_ms": 1.0, "fwdbwd_ms": 2.0},
        {"config": [3, 3], "status": "error", "note": "OOM"}]}}}  # fmt: skip
    text = tuning_markdown(tune)
    assert "**proposed: [2, 2]**" in text and "error OOM" in text
