"""The phases of ``bash bench/gpu_session.sh`` (one GPU window -> committed numbers); see docs/GPU.md.

The shell script runs each phase as its own process under ``timeout``; each phase writes what it
has measured to ``<work>/<phase>.json`` after every step, so a phase killed at its limit still
leaves its finished steps behind, and ``summary`` (always run last) turns whatever exists into at
most eight files in the output folder:

==========================  =====================================================================
``SUMMARY.md``              device, driver, versions, commit; each phase's status; the tables
``session.json``            everything measured, machine-readable (the source of the README table)
``pytest.log``              phase 1's pytest output
``tuning.md``               phase 3's proposed launch-config table
``headline.png``            phase 2's headline cases: forward+backward time per provider
``memory.png``              ``linear_logprobs`` peak memory against N per provider
``memory_snapshot.pickle``  one ``torch.cuda.memory`` snapshot (open at pytorch.org/memory_viz)
``phases.log``              every phase's stdout and stderr
==========================  =====================================================================

Phases (``python -m bench.gpu_session PHASE --work DIR [--dry-run] [--deadline EPOCH]``):

- ``env``: device, driver, library versions, commit.
- ``build``: the CUDA extension for the local arch (first use of ``backend="cuda"``), before the
  tests so that neither the tests nor the benchmarks pay for it inside their own limits.
- ``tests``: ``pytest -m gpu`` with a per-test timeout; the junit XML is reduced to counts and the
  failures' first lines. Failures are data, never the end of the run.
- ``bench``: measured copy bandwidth and bf16 GEMM throughput, the headline cases through
  ``bench.harness.run_suite`` (each provider counted by ``bench.cost``), the bare GEMMs of the
  ``linear_logprobs`` shape, peak memory at large N, one memory snapshot.
- ``tune``: each launch knob swept on the headline shapes (``*_CONFIGS`` through the kernel
  module's ``pick_config``; ``chunk_size`` x ``vocab_block_size`` of ``linear_logprobs``).
- ``summary``: the output files above.

``--dry-run`` runs every phase on CPU with tiny shapes, the Triton providers under the interpreter;
CI runs it (``bench/test_gpu_session.py``) so the script cannot rot between GPU windows.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 15 << 20  # every output file stays under the 16 MB a window can bring back
PEER_PACKAGES = ("trl", "liger-kernel", "cut-cross-entropy", "transformers", "datasets", "accelerate")
TOOL_PACKAGES = ("pip", "setuptools", "wheel", "pytest", "pytest-timeout", "pybind11", "ninja", "numpy", "pyarrow",
                 "huggingface_hub", "fsspec")


# ------------------------------------------------------------------------------------------------
# What a phase measures: headline shapes, GPU and dry-run sizes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Headline:
    """One headline case: an op of ``bench.registry`` at one shape, with the providers to compare."""

    op: str
    shape: dict
    providers: tuple[str, ...]


GPU_HEADLINES = (
    Headline("token_logprobs", {"N": 8192, "V": 151936},
             ("eager", "alignkernels:triton", "alignkernels:cuda", "trl", "liger")),
    Headline("linear_logprobs", {"N": 8192, "H": 4096, "V": 128256},
             ("eager", "alignkernels:triton", "trl", "cce", "liger")),
    Headline("cross_entropy", {"N": 8192, "H": 4096, "V": 128256},
             ("eager", "alignkernels:fused", "alignkernels:linear_logprobs", "cce", "liger")),
    # Qwen2.5-7B head, 8 completions of 1k tokens; Llama-3-8B head, 4 pairs of 1k tokens
    Headline("grpo", {"B": 8, "T": 1024, "H": 3584, "V": 151936},
             ("eager", "alignkernels:fused", "alignkernels:linear_logprobs+grpo_loss", "liger")),
    Headline("dpo", {"B": 4, "T": 1024, "H": 4096, "V": 128256}, ("eager", "alignkernels:fused", "liger")),
)
DRY_HEADLINES = (  # the interpreter runs one Triton program at a time: a few rows only
    Headline("token_logprobs", {"N": 4, "V": 300}, ("eager", "alignkernels:triton", "alignkernels:torch")),
    Headline("linear_logprobs", {"N": 4, "H": 32, "V": 300}, ("eager", "alignkernels:triton", "alignkernels:torch")),
    Headline("cross_entropy", {"N": 4, "H": 32, "V": 300},
             ("eager", "alignkernels:fused", "alignkernels:linear_logprobs")),
    Headline("grpo", {"B": 1, "T": 4, "H": 32, "V": 300}, ("eager", "alignkernels:fused")),
    Headline("dpo", {"B": 1, "T": 4, "H": 32, "V": 300}, ("eager", "alignkernels:fused")),
)
MEMORY_OP = "linear_logprobs"
GPU_MEMORY = ({"N": 32768, "H": 4096, "V": 128256}, {"N": 131072, "H": 4096, "V": 128256})
DRY_MEMORY = ({"N": 4, "H": 32, "V": 300}, {"N": 8, "H": 32, "V": 300})
MEMORY_PROVIDERS = ("eager", "alignkernels:triton", "alignkernels:torch", "trl", "cce", "liger")


def sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(headlines=DRY_HEADLINES, memory=DRY_MEMORY, repeats=1, warmup=1, device="cpu", dtype="fp32")
    return dict(headlines=GPU_HEADLINES, memory=GPU_MEMORY, repeats=10, warmup=2, device="cuda", dtype="bf16")


# ------------------------------------------------------------------------------------------------
# Incremental phase records
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _import_check(module: str) -> str:
    try:
        return f"ok ({importlib.import_module(module).__file__})"
    except Exception as exc:  # noqa: BLE001 - recorded: an install problem shows here first
        return f"{type(exc).__name__}: {exc}"


def commit() -> dict:
    """The commit measured: ``ALIGNKERNELS_COMMIT`` when set (a checkout copied without .git),
    else ``git rev-parse HEAD``, with whether the tree had uncommitted changes."""
    sha = os.environ.get("ALIGNKERNELS_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def environment() -> dict:
    """Versions and the import check; touches no device (a hung CUDA initialisation cannot take it)."""
    import torch

    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "triton": _version("triton"), "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "commit": commit(),
        "packages": {name: _version(name) for name in PEER_PACKAGES},
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "alignkernels": _import_check("alignkernels.kernels.token_logprobs"),
    }  # fmt: skip


def _version_line(cmd: list[str], pattern: str = "") -> str | None:
    """The first line of ``cmd``'s output that contains ``pattern``."""
    lines = [ln.strip() for ln in (_run(cmd) or "").splitlines() if pattern in ln and ln.strip()]
    return lines[0] if lines else None


def toolchain() -> dict:
    """What an install or build failure needs for diagnosis: compilers, Python headers, the
    packaging tools and data libraries the peers import, and ``pip check``."""
    import sysconfig

    from alignkernels import _build

    nvcc = _build.find_nvcc()
    include = sysconfig.get_paths().get("include") or ""
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=30)
    return {
        "nvcc": nvcc, "nvcc_version": _version_line([nvcc, "--version"], "release") if nvcc else None,
        "gcc_version": _version_line([shutil.which("gcc") or "gcc", "--version"]),
        "python_headers": include if (Path(include) / "Python.h").is_file() else f"missing ({include}/Python.h)",
        "packaging": {name: _version(name) for name in TOOL_PACKAGES},
        "pythonpath": os.environ.get("PYTHONPATH"),
        "pip_check": {"exit_code": check.returncode, "output": (check.stdout + check.stderr).strip()[-2000:]},
    }  # fmt: skip


def device_info() -> dict:
    """The device, driver and TF32 flags (the first CUDA call of the phase)."""
    import torch

    info = {"tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()}}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, memory_bytes=props.total_memory)  # fmt: skip
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
        info["nvidia_smi"] = smi
        info["driver"] = smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None
    else:
        from .report import cpu_model

        info.update(device=f"CPU: {cpu_model()}", driver=None)
    return info


def phase_env(args) -> int:
    record = PhaseRecord(args.work, "env")
    run_step(record, "environment", args.deadline, environment)
    run_step(record, "toolchain", args.deadline, toolchain)
    run_step(record, "device", args.deadline, device_info)
    return 0


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------
def build_cuda_extension() -> dict:
    """First use of ``backend="cuda"`` builds the extension (cached, file-locked) for this GPU's arch."""
    import torch

    import alignkernels

    if not torch.cuda.is_available():
        return {"status": "skipped", "note": "no CUDA device: the extension is built on a GPU machine only"}
    t0 = time.time()
    logits = torch.randn(4, 1000, device="cuda")
    labels = torch.randint(0, 1000, (4,), device="cuda")
    got = alignkernels.token_logprobs(logits, labels, backend="cuda")
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    err = (got.double() - want).abs().max().item()
    return {"status": "ok" if err < 1e-4 else "error", "build_s": round(time.time() - t0, 1), "max_abs_err": err,
            "archs": os.environ.get("ALIGNKERNELS_CUDA_ARCHS")}  # fmt: skip


def phase_build(args) -> int:
    record = PhaseRecord(args.work, "build")
    run_step(record, "cuda_extension", args.deadline, build_cuda_extension)
    return 0


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------
def _run_cases(op_name: str, shapes: list[dict], providers, cfg_sizes: dict, peaks: dict, repeats=None) -> dict:
    import torch

    from .harness import DTYPES, RunConfig, run_suite

    cfg = RunConfig(ops=[op_name], device=torch.device(cfg_sizes["device"]), dtype=DTYPES[cfg_sizes["dtype"]],
                    shapes=shapes, repeats=repeats or cfg_sizes["repeats"], warmup=cfg_sizes["warmup"],
                    isolate=False, providers=list(providers), device_peaks=peaks)  # fmt: skip
    out = run_suite(cfg, log=lambda msg: print(msg, flush=True))
    return {"rows": out["rows"], "notes": out["notes"]}


def bare_gemms(shape: dict, device: str, dtype_name: str, repeats: int) -> dict:
    """The GEMMs of ``linear_logprobs`` alone, in the input dtype: ``z = h·Wᵀ`` [N,V],
    ``dh = dz·W`` [N,H], ``dW = dzᵀ·h`` [V,H]. Their sum is the floor the fused op competes with:
    three for a gradient-in-forward loss, four with the backward's recompute."""
    import torch

    from .harness import DTYPES, summarize_ms, time_cpu, time_cuda

    N, H, V = shape["N"], shape["H"], shape["V"]
    dt, dev = DTYPES[dtype_name], torch.device(device)
    h = torch.randn(N, H, device=dev, dtype=dt)
    w = torch.randn(V, H, device=dev, dtype=dt) / H**0.5
    dz = torch.randn(N, V, device=dev, dtype=dt)
    gemms = {"logits h@W^T": lambda: h @ w.T, "grad_hidden dz@W": lambda: dz @ w, "grad_weight dz^T@h": lambda: dz.T @ h}
    out = {}
    for name, fn in gemms.items():
        for _ in range(2):
            fn()
        if dev.type == "cuda":
            times = time_cuda(fn, repeats, [], dev)
        else:
            times, _ = time_cpu(fn, repeats, [])
        t = summarize_ms(times)
        out[name] = {**t, "tflops": 2 * N * H * V / (t["median"] * 1e-3) / 1e12}
    logits = out["logits h@W^T"]["median"]
    out["three_gemms_ms"] = sum(out[k]["median"] for k in gemms)
    out["four_gemms_ms"] = out["three_gemms_ms"] + logits  # + the backward's recompute of the logits
    out["shape"] = shape
    del h, w, dz
    return out


def memory_snapshot(work: Path, shape: dict, dtype_name: str) -> dict:
    """One forward+backward of ``linear_logprobs`` (Triton) under ``torch.cuda.memory._record_memory_history``
    (Python stacks)."""
    import torch

    from .harness import DTYPES
    from .registry import build_ops

    if not torch.cuda.is_available():
        return {"status": "skipped", "note": "torch.cuda.memory snapshots need a CUDA device"}
    op = build_ops()["linear_logprobs"]
    provider = op.provider("alignkernels:triton")
    inputs = op.make_inputs(dict(shape), DTYPES[dtype_name], torch.device("cuda"))
    path = Path(work) / "memory_snapshot.pickle"
    for max_entries in (20000, 5000, 1000):
        # Python stacks only: C++ stacks (the default "all") make the snapshot the slowest step of the phase
        torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
        try:
            op.to_loss(provider.run(inputs), inputs).backward()
            torch.cuda.synchronize()
            torch.cuda.memory._dump_snapshot(str(path))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        if path.stat().st_size < MAX_FILE_BYTES:
            return {"path": path.name, "bytes": path.stat().st_size, "max_entries": max_entries, "shape": shape}
    path.unlink()
    return {"status": "skipped", "note": "snapshot over 15 MB even at 1000 entries"}


def phase_bench(args) -> int:
    import torch

    from .harness import measure_device_peaks

    record = PhaseRecord(args.work, "bench")
    cfg = sizes(args.dry_run)
    peaks_step = run_step(record, "device_peaks", args.deadline, lambda: {
        "peaks": measure_device_peaks(torch.device(cfg["device"])),
        "method": "median of 20 CUDA-event timings: 1 GiB device-to-device copy (bytes read + written), "
                  "8192^3 bf16 GEMM on random data"})  # fmt: skip
    peaks = (peaks_step or {}).get("peaks") or {}
    # Order = priority when time runs short: our rows (with eager) for every headline, the bare GEMMs
    # of the linear_logprobs shape, our peak memory at large N and the snapshot; then the peers
    # (Liger's torch.compile warm-ups are the slowest step), merged into the same tables.
    heads = cfg["headlines"]
    for h in heads:
        run_step(record, f"headline:{h.op}", args.deadline,
                 lambda h=h: {"shape": h.shape, **_run_cases(h.op, [h.shape], ours(h.providers), cfg, peaks)})
        if h.op == MEMORY_OP:
            run_step(record, "bare_gemms", args.deadline,
                     lambda h=h: bare_gemms(h.shape, cfg["device"], cfg["dtype"], cfg["repeats"]))
    memory = f"memory:{MEMORY_OP}"
    run_step(record, memory, args.deadline,
             lambda: _run_cases(MEMORY_OP, list(cfg["memory"]), ours(MEMORY_PROVIDERS), cfg, peaks, repeats=1))
    linear = next(h for h in heads if h.op == MEMORY_OP)
    run_step(record, "memory_snapshot", args.deadline, lambda: memory_snapshot(args.work, linear.shape, cfg["dtype"]))
    for h in heads:
        if peers(h.providers):
            run_step(record, f"peers:{h.op}", args.deadline, lambda h=h: add_rows(
                record, f"headline:{h.op}", _run_cases(h.op, [h.shape], peers(h.providers), cfg, peaks)))  # fmt: skip
    run_step(record, f"peers:{memory}", args.deadline, lambda: add_rows(
        record, memory, _run_cases(MEMORY_OP, list(cfg["memory"]), peers(MEMORY_PROVIDERS), cfg, peaks, repeats=1)))
    return 0


def ours(providers) -> tuple[str, ...]:
    """Eager and alignkernels' providers (the first pass of the bench phase)."""
    return tuple(p for p in providers if p == "eager" or p.startswith("alignkernels"))


def peers(providers) -> tuple[str, ...]:
    return tuple(p for p in providers if p not in ours(providers))


def add_rows(record: PhaseRecord, name: str, extra: dict) -> dict:
    """Merge a later pass's rows into step ``name`` of ``record`` (speed-ups recomputed against its
    eager row); returns the later pass's own short record."""
    from .harness import annotate_vs_eager

    step = record.data["steps"].get(name)
    if not isinstance(step, dict) or "rows" not in step:
        step = {"status": "ok", "rows": [], "notes": []}
    rows = step["rows"] + extra["rows"]
    annotate_vs_eager(rows)
    record.step(name, {**step, "rows": rows, "notes": step.get("notes", []) + extra["notes"]})
    return {"merged_into": name, "rows": len(extra["rows"]),
            "providers": sorted({r["provider"] for r in extra["rows"]})}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# tune
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def forced_config(kernel_module_name: str, configs_name: str, config: tuple):
    """Make the launcher of a kernel module choose ``config``: its ``*_CONFIGS`` table is narrowed to
    that one entry and ``pick_config`` returns it (in the kernel module and wherever an op module
    bound the same function)."""
    module = importlib.import_module(kernel_module_name)
    original_configs, original_pick = getattr(module, configs_name), getattr(module, "pick_config", None)
    patched = [(module, configs_name, original_configs)]
    setattr(module, configs_name, (config,))
    if original_pick is not None:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("alignkernels") and getattr(mod, "pick_config", None) is original_pick:
                patched.append((mod, "pick_config", original_pick))
                setattr(mod, "pick_config", lambda *a, **k: config)
    try:
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)


def _time_fwd_fwdbwd(run, inputs_fn, repeats: int, device) -> dict:
    """Median forward and forward+backward ms of ``run(inputs)`` (loss = weighted sum of outputs)."""
    from .cases_common import weighted_logp_entropy_loss
    from .harness import summarize_ms, tensors_in, time_cpu, time_cuda

    inputs = inputs_fn()
    grads = [t for t in tensors_in(inputs) if t.requires_grad]
    forward = lambda: run(inputs)  # noqa: E731
    fwdbwd = lambda: weighted_logp_entropy_loss(run(inputs), inputs).backward()  # noqa: E731
    out = {}
    for name, fn in (("fwd_ms", forward), ("fwdbwd_ms", fwdbwd)):
        fn()  # warm-up (and compile)
        for t in grads:
            t.grad = None
        times = time_cuda(fn, repeats, grads, device) if device.type == "cuda" else time_cpu(fn, repeats, grads)[0]
        out[name] = summarize_ms(times)["median"]
    return out


def tune_token_logprobs(shape: dict, device, dtype, repeats: int, deadline: float, dry_run: bool) -> dict:
    import alignkernels
    import alignkernels.kernels.token_logprobs as kmod

    from .cases_token_logprobs import make_inputs

    current = kmod.pick_config(shape["V"])
    declared = list(kmod.TOKEN_LOGPROBS_CONFIGS)
    extra = [] if dry_run else [(2048, 4), (4096, 4), (8192, 8), (8192, 16), (16384, 16)]
    declared = declared[:2] if dry_run else declared
    run = lambda inputs: alignkernels.token_logprobs(inputs["logits"], inputs["labels"], return_entropy=True,  # noqa: E731
                                                     backend="triton")  # fmt: skip
    rows = []
    for config in dict.fromkeys(declared + extra):
        if time.time() > deadline - 5:
            rows.append({"config": list(config), "status": "skipped", "note": "phase deadline"})
            continue
        try:
            with forced_config(kmod.__name__, "TOKEN_LOGPROBS_CONFIGS", config):
                t = _time_fwd_fwdbwd(run, lambda: make_inputs(dict(shape), dtype, device), repeats, device)
            rows.append({"config": list(config), "status": "ok", **t})
        except Exception as exc:  # noqa: BLE001
            rows.append({"config": list(config), "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]})
    return {"knob": "TOKEN_LOGPROBS_CONFIGS (BLOCK_V, num_warps)", "shape": shape, "current": list(current),
            "declared": [list(c) for c in declared], "rows": rows}  # fmt: skip


def tune_linear_logprobs(shape: dict, device, dtype, repeats: int, deadline: float, dry_run: bool) -> dict:
    import alignkernels
    import alignkernels.kernels.linear_logprobs as kmod

    from .cases_linear_logprobs import make_inputs

    chunks = (4,) if dry_run else (2048, 4096, 8192)
    blocks = (None, 128) if dry_run else (None, 8192, 16384, 32768)
    rows = []
    for chunk in chunks:
        for block in blocks:
            if time.time() > deadline - 5:
                rows.append({"config": [chunk, block], "status": "skipped", "note": "phase deadline"})
                continue
            run = lambda inputs, c=chunk, b=block: alignkernels.linear_logprobs(  # noqa: E731
                inputs["hidden"], inputs["weight"], inputs["labels"], return_entropy=True, backend="triton",
                chunk_size=c, vocab_block_size=b)  # fmt: skip
            try:
                t = _time_fwd_fwdbwd(run, lambda: make_inputs(dict(shape), dtype, device), repeats, device)
                rows.append({"config": [chunk, block], "status": "ok", **t})
            except Exception as exc:  # noqa: BLE001 - e.g. OOM at a big tile
                rows.append({"config": [chunk, block], "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]})
    fold_rows = []
    declared = list(kmod.LINEAR_LOGPROBS_CONFIGS)
    run = lambda inputs: alignkernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"],  # noqa: E731
                                                      return_entropy=True, backend="triton")  # fmt: skip
    for config in dict.fromkeys(declared[:2] if dry_run else declared + [(4096, 8), (8192, 16)]):
        if time.time() > deadline - 5:
            fold_rows.append({"config": list(config), "status": "skipped", "note": "phase deadline"})
            continue
        try:
            with forced_config(kmod.__name__, "LINEAR_LOGPROBS_CONFIGS", config):
                t = _time_fwd_fwdbwd(run, lambda: make_inputs(dict(shape), dtype, device), repeats, device)
            fold_rows.append({"config": list(config), "status": "ok", **t})
        except Exception as exc:  # noqa: BLE001
            fold_rows.append({"config": list(config), "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]})
    return {"knob": "linear_logprobs (chunk_size, vocab_block_size)", "shape": shape, "current": [None, None],
            "rows": rows, "fold": {"knob": "LINEAR_LOGPROBS_CONFIGS (BLOCK_V, num_warps)", "declared":
                                   [list(c) for c in declared], "rows": fold_rows}}  # fmt: skip


def phase_tune(args) -> int:
    import torch

    from .harness import DTYPES

    record = PhaseRecord(args.work, "tune")
    cfg = sizes(args.dry_run)
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    repeats = 1 if args.dry_run else 5
    heads = {h.op: h for h in cfg["headlines"]}
    run_step(record, "token_logprobs", args.deadline, lambda: tune_token_logprobs(
        heads["token_logprobs"].shape, device, dtype, repeats, args.deadline, args.dry_run))  # fmt: skip
    run_step(record, "linear_logprobs", args.deadline, lambda: tune_linear_logprobs(
        heads["linear_logprobs"].shape, device, dtype, repeats, args.deadline, args.dry_run))  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
def _load(work: Path, phase: str) -> dict | None:
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


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def headline_table(step: dict) -> list[str]:
    from .report import fmt_bytes, fmt_pct

    lines = ["| provider | fwd ms | fwd+bwd ms | peak mem (fwd+bwd) | vs eager | roofline fwd / fwd+bwd | note |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in step.get("rows", []):
        if r["status"] == "skipped":
            lines.append(f"| {r['provider']} | skipped | | | | | {r.get('note', '')[:90]} |")
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['status'].upper()} | | | | | {r.get('note', '')[:90]} |")
            continue
        fwd, fb = (r.get("fwd_ms") or {}).get("median"), (r.get("fwdbwd_ms") or {}).get("median")
        peak = r.get("peak_fwdbwd_bytes") if r.get("fwdbwd_ms") else r.get("peak_fwd_bytes")
        speed = r.get("speedup_vs_eager")
        lines.append(f"| {r['provider']} | {_fmt(fwd, 3)} | {_fmt(fb, 3)} | {fmt_bytes(peak)} | "
                     f"{_fmt(speed)}x | {fmt_pct(r.get('roofline_fwd'))} / {fmt_pct(r.get('roofline_fwdbwd'))} | "
                     f"{r.get('note', '')[:60]} |")  # fmt: skip
    return lines


def memory_table(step: dict) -> list[str]:
    from .report import fmt_bytes

    shapes = list(dict.fromkeys(r["shape_str"] for r in step.get("rows", [])))
    providers = list(dict.fromkeys(r["provider"] for r in step.get("rows", [])))
    lines = ["| provider | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for p in providers:
        cells = []
        for s in shapes:
            r = next((r for r in step["rows"] if r["provider"] == p and r["shape_str"] == s), None)
            if r is None or r["status"] == "skipped":
                cells.append("skipped")
            elif r["status"] != "ok":
                cells.append(r["status"].upper())
            else:
                cells.append(fmt_bytes(r.get("peak_fwdbwd_bytes") or r.get("peak_fwd_bytes")))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def tuning_markdown(tune: dict | None) -> str:
    """Phase 3's sweep as tables, with the proposed config per knob (the fastest forward+backward)."""
    parts = ["# Proposed launch configurations", ""]
    if not tune:
        return "\n".join(parts + ["Phase 3 (tune) produced nothing.", ""])
    for name, step in tune.get("steps", {}).items():
        if not isinstance(step, dict) or step.get("status") != "ok":
            parts += [f"## {name}", "", f"not measured: {step.get('note') if isinstance(step, dict) else step}", ""]
            continue
        for sweep in (step, step.get("fold")):
            if not sweep:
                continue
            parts += [f"## {name}: {sweep['knob']}", "", f"shape {step.get('shape')}; current default "
                      f"{step.get('current') if sweep is step else sweep.get('declared')}", "",
                      "| config | fwd ms | fwd+bwd ms | status |", "|---|---|---|---|"]  # fmt: skip
            ok = [r for r in sweep["rows"] if r["status"] == "ok"]
            for r in sweep["rows"]:
                parts.append(f"| {r['config']} | {_fmt(r.get('fwd_ms'), 3)} | {_fmt(r.get('fwdbwd_ms'), 3)} | "
                             f"{r['status']} {r.get('note', '')[:80]} |")  # fmt: skip
            if ok:
                best = min(ok, key=lambda r: r["fwdbwd_ms"])
                parts += ["", f"**proposed: {best['config']}** ({best['fwdbwd_ms']:.3f} ms forward+backward)"]
            parts.append("")
    parts.append("A proposed config outside the declared table must join it (and `COMPILE_CASES`) and pass "
                 "`tests/kernels/test_compile.py` (no spills) before it becomes the default: see docs/GPU.md.")  # fmt: skip
    return "\n".join(parts) + "\n"


def summary_markdown(work: Path, dry_run: bool) -> str:
    env_steps = (_load(work, "env") or {}).get("steps") or {}
    env = {**(env_steps.get("environment") or {}), **(env_steps.get("device") or {})}
    tools = env_steps.get("toolchain") or {}
    lines = [f"# GPU session{' (DRY RUN on CPU: tiny shapes, Triton interpreted)' if dry_run else ''}", ""]
    c = env.get("commit") or {}
    lines += [f"- device: {env.get('device', '?')} (capability {env.get('capability', '-')}, "
              f"{env.get('sm_count', '-')} SMs); driver {env.get('driver') or '-'}",
              f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}",
              "- peers: " + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v),
              f"- commit {c.get('sha') or '?'}{' + uncommitted changes' if c.get('dirty') else ''}; "
              f"alignkernels.kernels: {env.get('alignkernels')}",
              f"- toolchain: nvcc {tools.get('nvcc_version')}; gcc {tools.get('gcc_version')}; Python headers "
              f"{tools.get('python_headers')}; TF32 {env.get('tf32')}",
              "- packaging / data: " + ", ".join(f"{k} {v}" for k, v in (tools.get("packaging") or {}).items()),
              f"- pip check: exit {(tools.get('pip_check') or {}).get('exit_code')}: "
              + ((tools.get("pip_check") or {}).get("output") or "").replace("\n", "; ")[:400],
              f"- written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "",
              "## Phases", "", "| phase | status | seconds | limit | note |", "|---|---|---|---|---|"]  # fmt: skip
    for s in read_status(work):
        lines.append(f"| {s['phase']} | {s['status']} | {s['seconds']} | {s['limit']} | {s['note']} |")
    build = ((_load(work, "build") or {}).get("steps") or {}).get("cuda_extension")
    if build:
        lines += ["", f"CUDA extension: {build.get('status')} {build.get('note', '')} "
                  f"(build {build.get('build_s', '-')} s, archs {build.get('archs')})"]  # fmt: skip
    tests = ((_load(work, "tests") or {}).get("steps") or {}).get("pytest")
    lines += ["", "## Phase 1: tests", ""]
    if tests:
        lines.append(f"{tests.get('status')}: {tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
                     f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped "
                     "(one pytest process per group; `pytest.log` has each group's output)")  # fmt: skip
        lines += ["", "| group | status | exit | seconds | passed / failed / errors / skipped | note |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for g in tests.get("groups", []):
            counts = "/".join(str(g.get(k, "-")) for k in ("passed", "failures", "errors", "skipped"))
            note = "; ".join(filter(None, [g.get("note"), g.get("device_fault") and f"device fault: {g['device_fault']}"]))
            lines.append(f"| {g.get('group')} | {g.get('status')} | {g.get('exit_code', '-')} | {g.get('seconds', '-')} | "
                         f"{counts} | {note} |")  # fmt: skip
        for f in tests.get("failed", [])[:40]:
            lines.append(f"- {f['kind'].upper()} `{f['test']}`: {f['message']}")
    else:
        lines.append("no result")
    bench = (_load(work, "bench") or {}).get("steps") or {}
    lines += ["", "## Phase 2: benchmarks", ""]
    peaks = (bench.get("device_peaks") or {}).get("peaks") or {}
    if peaks:
        lines.append(f"Measured ceilings: copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                     f"bf16 GEMM {peaks['bf16_gemm_flops_per_s'] / 1e12:.0f} TFLOP/s "
                     f"({(bench['device_peaks'] or {}).get('method')}). Roofline = achieved over these, counting "
                     "each provider's own bytes / FLOPs (`bench/cost.py`).")  # fmt: skip
    for name, step in bench.items():
        if name == "device_peaks":
            continue
        if name.startswith("peers:"):  # merged into the table it names
            lines += ["", f"{name}: {step.get('status')} ({step.get('seconds', '-')} s) "
                      f"{step.get('note') or ', '.join(step.get('providers') or [])}"]  # fmt: skip
            continue
        lines += ["", f"### {name}", ""]
        if not isinstance(step, dict) or step.get("status") not in ("ok", None):
            lines.append(f"{step.get('status')}: {step.get('note')}" if isinstance(step, dict) else str(step))
            continue
        if name.startswith("headline:"):
            lines += [f"shape {step.get('shape')}", ""] + headline_table(step)
        elif name.startswith("memory:"):
            lines += ["peak memory above the inputs, forward+backward", ""] + memory_table(step)
        elif name == "bare_gemms":
            lines += ["| GEMM | median ms | TFLOP/s |", "|---|---|---|"]
            for k, v in step.items():
                if isinstance(v, dict) and "median" in v:
                    lines.append(f"| {k} | {v['median']:.3f} | {v['tflops']:.0f} |")
            lines.append(f"| **three GEMMs** (gradient in forward) | {step['three_gemms_ms']:.3f} | |")
            lines.append(f"| **four GEMMs** (with the backward's recompute) | {step['four_gemms_ms']:.3f} | |")
        elif name == "memory_snapshot":
            lines.append(f"`{step.get('path')}` ({step.get('bytes', 0) / 2**20:.1f} MiB), shape {step.get('shape')}")
    lines += ["", "## Phase 3: tuning", "", "See `tuning.md`.", ""]
    return "\n".join(lines) + "\n"


def plots(work: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = (_load(work, "bench") or {}).get("steps") or {}
    written = []
    heads = [(k.split(":", 1)[1], v) for k, v in bench.items() if k.startswith("headline:") and isinstance(v, dict)]
    heads = [(op, [r for r in v.get("rows", []) if r["status"] == "ok"]) for op, v in heads]
    heads = [(op, rows) for op, rows in heads if rows]
    if heads:
        cols = min(3, len(heads))
        nrows = -(-len(heads) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 3.2 * nrows), squeeze=False)
        for ax in axes.flat[len(heads):]:
            ax.axis("off")
        for ax, (op, rows) in zip(axes.flat, heads):
            names = [r["provider"] for r in rows]
            ms = [(r.get("fwdbwd_ms") or r.get("fwd_ms"))["median"] for r in rows]
            ax.barh(names, ms, color=["tab:gray" if r["role"] == "eager" else
                                      ("tab:blue" if r["role"] == "ours" else "tab:orange") for r in rows])  # fmt: skip
            ax.set_title(f"{op}\n{rows[0]['shape_str']} {rows[0]['dtype']}", fontsize=8)
            ax.set_xlabel("forward+backward median ms", fontsize=8)
            ax.tick_params(labelsize=7)
            for y, t in enumerate(ms):
                ax.text(t, y, f" {t:.3g}", va="center", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "headline.png", dpi=100)
        plt.close(fig)
        written.append("headline.png")
    rows = [r for r in (bench.get(f"memory:{MEMORY_OP}") or {}).get("rows", []) if r["status"] == "ok"]
    head = next((v for k, v in heads if k == MEMORY_OP), [])
    rows = rows + [r for r in head if r.get("peak_fwdbwd_bytes") is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["shape"]["N"], r["peak_fwdbwd_bytes"] / 2**30) for r in rows if r["provider"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("peak memory above inputs (GiB)")
        ax.set_title(f"{MEMORY_OP} forward+backward, H={rows[0]['shape']['H']} V={rows[0]['shape']['V']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=100)
        plt.close(fig)
        written.append("memory.png")
    return written


def _copy_capped(src: Path, dst: Path) -> bool:
    """Copy ``src``; a file over the cap keeps its last 15 MB (logs end with what matters)."""
    if not src.is_file():
        return False
    size = src.stat().st_size
    if size <= MAX_FILE_BYTES:
        shutil.copyfile(src, dst)
    else:
        with open(src, "rb") as f:
            f.seek(size - MAX_FILE_BYTES + 200)
            dst.write_bytes(f"[... first {size - MAX_FILE_BYTES + 200} bytes cut ...]\n".encode() + f.read())
    return True


def default_out_dir(dry_run: bool) -> Path:
    import torch

    from .report import device_slug

    if dry_run:
        return REPO_ROOT / "bench" / "results" / "_scratch" / "dry-run"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return REPO_ROOT / "bench" / "results" / device_slug(device)


def phase_summary(args) -> int:
    work = Path(args.work)
    out = Path(args.out) if args.out else default_out_dir(args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    (out / "SUMMARY.md").write_text(summary_markdown(work, args.dry_run))
    written.append("SUMMARY.md")
    session = {"dry_run": args.dry_run, "status": read_status(work),
               **{p: _load(work, p) for p in ("env", "build", "tests", "bench", "tune")}}  # fmt: skip
    (out / "session.json").write_text(json.dumps(session, indent=1, default=str) + "\n")
    written.append("session.json")
    (out / "tuning.md").write_text(tuning_markdown(_load(work, "tune")))
    written.append("tuning.md")
    for name in ("pytest.log", "phases.log", "memory_snapshot.pickle"):
        if _copy_capped(work / name, out / name):
            written.append(name)
    try:
        written += plots(work, out)
    except Exception as exc:  # noqa: BLE001 - no plots is not the end of the summary
        print(f"plots failed: {type(exc).__name__}: {exc}", flush=True)
    print("wrote " + ", ".join(str(out / w) for w in written), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
PHASES = {"env": phase_env, "build": phase_build, "tests": phase_tests, "bench": phase_bench, "tune": phase_tune,
          "summary": phase_summary}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=sorted(PHASES))
    p.add_argument("--work", type=Path, required=True, help="scratch folder shared by the phases")
    p.add_argument("--out", type=Path, help="summary: output folder (default bench/results/<device>/)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the phase must end")
    p.add_argument("--per-test-timeout", type=int, default=60)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.deadline is None:
        args.deadline = time.time() + 600
    return PHASES[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
