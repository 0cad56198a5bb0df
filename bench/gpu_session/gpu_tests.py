"""Phase ``tests``: the ``gpu``-marked test files, one pytest process per folder, so that a hang or a
device fault (after which every CUDA call of the process fails) costs that group only. Each group:
``-v -rA --durations`` (the log names every test, its last line the one that hung), a per-test
timeout (pytest-timeout, thread method), its own junit XML; the phase record sums the groups."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ..environment import REPO_ROOT
from .record import PhaseRecord, run_step

DRY_TEST_GROUPS = {"bench": ("bench/test_kernel_report.py",), "tests": ("tests/test_architecture.py",)}
GPU_MARK = re.compile(r"pytest\.mark\.gpu\b|\bmark\.gpu\b")
# a device fault makes every later CUDA call of the same process fail: such a group ends there
STICKY_CUDA_ERROR = re.compile(r"illegal memory access|device-side assert|unspecified launch failure|"
                               r"misaligned address|CUDA error: an illegal instruction", re.I)  # fmt: skip


def gpu_test_groups(root: Path = REPO_ROOT) -> dict[str, list[str]]:
    """The test files that hold ``gpu``-marked tests, grouped by folder (``tests/kernels``,
    ``tests/ops``, ..., ``bench``). Each group runs in its own pytest process, so a hang or a
    device fault costs that group only. Found by reading the files (nothing is imported)."""
    groups: dict[str, list[str]] = {}
    for folder in ("tests", "bench"):
        for path in sorted((root / folder).rglob("test_*.py")):
            if "cuemu" in path.parts or not GPU_MARK.search(path.read_text(errors="replace")):
                continue
            rel = path.relative_to(root)
            groups.setdefault(str(rel.parent), []).append(str(rel))
    return groups


def pytest_command(work: Path, group: str, files, dry_run: bool, per_test_timeout: int) -> list[str]:
    """One group's pytest: ``-v -rA --durations`` so the log names every test (the last line names
    a test that hung), a per-test timeout (pytest-timeout, ``thread`` method: it also ends a test
    stuck in a CUDA call, by ending the group's process), junit XML per group."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rA", "--durations=15", "-p", "no:cacheprovider",
           f"--junitxml={work / f'junit-{group_slug(group)}.xml'}",
           "-o", "faulthandler_timeout=" + str(per_test_timeout + 15)]  # fmt: skip
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={per_test_timeout}", "--timeout-method=thread"]
    return cmd + ([] if dry_run else ["-m", "gpu"]) + list(files)


def group_slug(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", group).strip("-") or "root"


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (message[0] if message else "")[:300]})  # fmt: skip
    return {**counts, "failed": failed}


def last_test_started(log_text: str) -> str | None:
    """The last test ``pytest -v`` started in a log (``path::name`` before its result word)."""
    found = re.findall(r"^(\S+::\S+)", log_text, re.M)
    return found[-1] if found else None


def merge_groups(groups: list[dict]) -> dict:
    """The tests phase's totals over its groups (each group a ``run_group`` result)."""
    total = {k: sum(g.get(k, 0) or 0 for g in groups) for k in ("tests", "passed", "failures", "errors", "skipped")}
    failed = [f for g in groups for f in g.get("failed", [])]
    bad = [g for g in groups if g["status"] not in ("ok", "skipped")]
    status = "failed" if bad else ("ok" if all(g["status"] == "ok" for g in groups) else "incomplete")
    return {**total, "failed": failed, "groups": groups, "exit_code": 0 if not bad else 1, "status": status}


def run_group(work: Path, group: str, files, dry_run: bool, per_test_timeout: int, deadline: float) -> dict:
    """Run one group in its own process, append its output to ``pytest.log``; never raises."""
    cmd = pytest_command(work, group, files, dry_run, per_test_timeout)
    junit = work / f"junit-{group_slug(group)}.xml"
    glog = work / f"pytest-{group_slug(group)}.log"
    limit = deadline - time.time() - 3
    if limit < 10:
        return {"group": group, "status": "skipped", "note": f"only {limit + 3:.0f} s left in the phase"}
    with open(glog, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, timeout=limit,
                                env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = glog.read_text(errors="replace")
    with open(work / "pytest.log", "a") as f:
        f.write(f"\n===== group {group} (exit {rc}) =====\n{text}")
    result = {"group": group, "files": list(files), "exit_code": rc, "command": " ".join(cmd[1:])}
    if junit.is_file():
        result.update(parse_junit(junit))
    else:  # killed (hang, per-test timeout's thread method, a crash): name the test that was running
        result["note"] = f"no junit XML (pytest did not finish); last test started: {last_test_started(text)}"
    fault = STICKY_CUDA_ERROR.search(text)
    if fault:
        result["device_fault"] = fault.group(0)
    # pytest: 0 all passed, 1 some failed, 5 nothing collected (a broken selection)
    result["status"] = "ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed")
    return result


def phase_tests(args) -> int:
    record = PhaseRecord(args.work, "tests")
    work = Path(args.work)
    groups = {k: list(v) for k, v in DRY_TEST_GROUPS.items()} if args.dry_run else gpu_test_groups()
    done: list[dict] = []
    for group, files in groups.items():
        run_step(record, f"pytest:{group}", args.deadline, lambda g=group, f=files: run_group(
            work, g, f, args.dry_run, args.per_test_timeout, args.deadline), min_left_s=10)  # fmt: skip
        step = record.data["steps"][f"pytest:{group}"]
        done.append({"group": group, **step} if "group" not in step else step)
        record.step("pytest", merge_groups(done))
    return 0
