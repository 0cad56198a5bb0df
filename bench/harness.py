"""The measuring machinery of ``python -m bench``: what a benchmark case is, how it is timed, how
its peak memory is measured, and how failures (missing peers, out-of-memory) become table rows
instead of crashes.

Definitions used everywhere in this package:

- An :class:`OpBench` is one operation (``token_logprobs``, ``linear_logprobs``, ``grpo``, ...):
  how to build its inputs for a shape, the providers that compute it, how to turn their outputs
  into a scalar for the backward pass, and its analytic cost (bytes moved, FLOPs).
- A :class:`Provider` is one implementation of that operation: an alignkernels backend, the eager
  PyTorch baseline (``alignkernels.reference``) or a peer library (TRL, Liger-Kernel, Apple CCE).
  ``available(device)`` returns ``None`` or a one-line reason to skip it.
- A *case* is (op, shape, dtype, device, provider). Each case yields one row (a dict).

Timing:
- CUDA: warm-up calls, then ``repeats`` calls each bracketed by CUDA events, with the L2 cache
  flushed (a 256 MiB buffer zeroed) before every call and input gradients reset to ``None``;
  the median and quartiles of those times are reported.
- CPU: warm-up, then ``repeats`` wall-clock timings (``time.perf_counter``); median, quartiles,
  min and max are reported.

Memory (always the peak *above* the inputs; the inputs' own footprint is reported separately):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated right before the call; one case at a time, each provider in isolation.
- CPU: peak RSS (``VmHWM``) of a fresh subprocess (``python -m bench._worker``) that runs only
  this case: the high-water mark is reset (``/proc/self/clear_refs``) right before the measured
  calls, and glibc is told to return freed memory to the OS (``MALLOC_MMAP_THRESHOLD_``,
  ``malloc_trim``) so a freed allocation cannot hide the next one.

Out of memory (``torch.OutOfMemoryError``, ``MemoryError``, or a worker killed by the kernel's
OOM killer) is recorded as status ``"oom"`` and the run goes on.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .cost import Cost
from .environment import REPO_ROOT
from .records import ResultRow, Results, Timing, peak_bytes, timed_phase
DEFAULT_REGISTRY = "bench.registry:build_ops"
RESULT_PREFIX = "BENCH_RESULT "
L2_FLUSH_BYTES = 256 << 20

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


# ------------------------------------------------------------------------------------------------
# What is benchmarked
# ------------------------------------------------------------------------------------------------
@dataclass
class Provider:
    """One implementation of an op.

    ``run(inputs)`` computes the op on the inputs dict (with autograd recording, as in training)
    and returns its outputs; the op's ``to_loss`` reduces them to a scalar for the backward pass.
    ``available(device)`` returns ``None`` when the provider can run on ``device``, else a
    one-line reason (peer not installed, op not built yet, needs CUDA, ...).
    """

    name: str
    run: Callable[[dict], Any]
    role: str = "peer"  # "eager" (the baseline), "ours" (alignkernels) or "peer"
    available: Callable[[torch.device], str | None] = lambda device: None
    note: str = ""  # shown under the table (e.g. "logp only, no entropy")
    # What this provider issues when it differs from the op's count (``bench.cost``): e.g. eager
    # materialises the logits, a fused loss forms its gradient in the forward (three GEMMs, not four).
    cost: Callable[[dict, torch.dtype], Cost] | None = None


@dataclass
class OpBench:
    """One benchmarked operation and everything needed to measure it."""

    name: str
    title: str
    make_inputs: Callable[[dict, torch.dtype, torch.device], dict]
    providers: list[Provider]
    shapes: dict[str, list[dict]]  # "cuda" / "cpu" / "quick" -> list of shape dicts
    shape_keys: tuple[str, ...]
    x_axis: str  # shape key the plots use as x (sequence length / tokens)
    to_loss: Callable[[Any, dict], torch.Tensor] | None = None  # None: forward only (no backward)
    cost: Callable[[dict, torch.dtype], Cost] | None = None  # bench.cost: bytes and FLOPs per pass
    roofline: str | None = None  # "bandwidth" (logits ops) | "matmul" (hidden-state ops) | None
    default_dtype: dict[str, torch.dtype] = field(
        default_factory=lambda: {"cuda": torch.bfloat16, "cpu": torch.float32}
    )
    fixed_dtype: torch.dtype | None = None  # ops whose inputs have one dtype whatever --dtype says (GAE: fp32)

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"op {self.name!r} has no provider {name!r}")


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def nbytes_of(obj) -> int:
    seen, total = set(), 0
    for t in tensors_in(obj):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def load_registry(spec: str = DEFAULT_REGISTRY) -> dict[str, OpBench]:
    """``"module:function"`` -> the ``{op name: OpBench}`` dict that function returns."""
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func or "build_ops")()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower() and isinstance(exc, RuntimeError)


# ------------------------------------------------------------------------------------------------
# Calling functions whose keyword names we do not control (ops still being written, peers)
# ------------------------------------------------------------------------------------------------
def call_mapped(fn: Callable, values: dict[str, Any], aliases: dict[str, tuple[str, ...]], **fixed):
    """Call ``fn`` binding each of its parameters by name from ``values``.

    ``aliases`` maps a canonical key of ``values`` to the parameter names it may be called by
    (``"hidden": ("hidden", "hidden_states", "_input")``). Parameters in ``fixed`` are passed as
    given when ``fn`` accepts them (by name, or through ``**kwargs``). A required parameter that matches nothing raises TypeError
    naming it (the provider is then reported as not comparable rather than crashing the run).
    """
    sig = inspect.signature(fn)
    args, kwargs = [], {}
    name_to_key = {name: key for key, names in aliases.items() for name in names}
    accepts_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if accepts_var_kwargs:  # e.g. fused_linear_grpo_loss(..., **grpo_kwargs): forward the fixed options
        kwargs.update({k: v for k, v in fixed.items() if k not in sig.parameters})
    for pname, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if pname in fixed:
            value, found = fixed[pname], True
        elif pname in name_to_key and name_to_key[pname] in values:
            value, found = values[name_to_key[pname]], True
        else:
            value, found = None, False
        if not found:
            if param.default is param.empty:
                raise TypeError(f"{getattr(fn, '__name__', fn)}: no value for required parameter {pname!r}")
            continue
        if param.kind == param.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[pname] = value
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Memory probes
# ------------------------------------------------------------------------------------------------
def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc_for_rss():
    """Make glibc serve big allocations with mmap and return freed memory at once (what the
    ``MALLOC_*_THRESHOLD_`` variables do for a fresh worker), so RSS follows live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 131072)
        libc.mallopt(_M_TRIM_THRESHOLD, 131072)
    except (OSError, AttributeError):
        pass


class CpuRssProbe:
    """Peak resident memory above the level at ``start()`` (bytes), for this process."""

    def __init__(self):
        self.base = 0
        self.can_reset = True
        tune_malloc_for_rss()

    def start(self):
        _malloc_trim()  # tensors are freed by refcount; gc.collect() would cost ~0.2 s per call here
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.can_reset = False
        rss = _proc_status_kib("VmRSS")
        if rss is None:  # not Linux: fall back to the process-lifetime peak (a lower bound)
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.base = peak * (1 if sys.platform == "darwin" else 1024)
        else:
            self.base = rss * 1024

    def peak(self) -> int | None:
        hwm = _proc_status_kib("VmHWM")
        if hwm is None or not self.can_reset:
            return None
        return max(0, hwm * 1024 - self.base)


class CudaProbe:
    def __init__(self, device):
        self.device = device
        self.base = 0

    def start(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def summarize_ms(times_ms: list[float]) -> Timing:
    xs = sorted(times_ms)
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = xs[0]
    return {
        "median": statistics.median(xs),
        "p25": p25,
        "p75": p75,
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
    }


def _reset_grads(grads):
    for t in grads:
        t.grad = None


def time_cpu(fn, repeats, grads, probe: CpuRssProbe | None = None):
    """Wall-clock times (ms) of ``repeats`` calls, and the peak RSS above the start over them."""
    times = []
    _reset_grads(grads)
    if probe is not None:
        probe.start()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        _reset_grads(grads)
    peak = probe.peak() if probe is not None else None
    return times, peak


def time_cuda(fn, repeats, grads, device):
    """CUDA-event times (ms) of ``repeats`` calls, L2 flushed before each (like triton's do_bench)."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        _reset_grads(grads)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    _reset_grads(grads)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


# ------------------------------------------------------------------------------------------------
# One case, in this process
# ------------------------------------------------------------------------------------------------
def measure_in_process(
    op: OpBench, provider: Provider, shape: dict, dtype: torch.dtype, device: torch.device,
    repeats: int, warmup: int, measure_memory: bool = True,
) -> dict:
    """Build the inputs, warm up, then time the forward and forward+backward and measure peaks.

    Returns the measured fields of a row (``fwd_ms``, ``fwdbwd_ms``, ``peak_fwd_bytes``,
    ``peak_fwdbwd_bytes``, ``input_bytes``). Exceptions (OOM included) propagate.
    """
    torch.manual_seed(0)
    inputs = op.make_inputs(dict(shape), dtype, device)
    grads = [t for t in tensors_in(inputs) if t.requires_grad]
    out_row = {"input_bytes": nbytes_of(inputs)}

    def forward():
        out = provider.run(inputs)
        del out

    def forward_backward():
        op.to_loss(provider.run(inputs), inputs).backward()

    has_bwd = op.to_loss is not None
    step = forward_backward if has_bwd else forward
    for _ in range(max(1, warmup)):
        step()
        _reset_grads(grads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if measure_memory:
            probe = CudaProbe(device)
            probe.start()
            forward()
            out_row["peak_fwd_bytes"] = probe.peak()
            if has_bwd:
                probe.start()
                forward_backward()
                out_row["peak_fwdbwd_bytes"] = probe.peak()
                _reset_grads(grads)
        out_row["fwd_ms"] = summarize_ms(time_cuda(forward, repeats, grads, device))
        if has_bwd:
            out_row["fwdbwd_ms"] = summarize_ms(time_cuda(forward_backward, repeats, grads, device))
    else:
        probe = CpuRssProbe() if measure_memory else None
        times, peak = time_cpu(forward, repeats, grads, probe)
        out_row["fwd_ms"], out_row["peak_fwd_bytes"] = summarize_ms(times), peak
        if has_bwd:
            times, peak = time_cpu(forward_backward, repeats, grads, probe)
            out_row["fwdbwd_ms"], out_row["peak_fwdbwd_bytes"] = summarize_ms(times), peak
    del inputs, grads
    return out_row


def free_device_memory(device: torch.device, after_error: bool = False):
    """Release what a finished case held. A failed case's traceback keeps its frames (and tensors)
    in reference cycles, hence the collection after errors."""
    if after_error or device.type == "cuda":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# One case, in a fresh subprocess (CPU peak RSS)
# ------------------------------------------------------------------------------------------------
def measure_in_subprocess(spec: dict, timeout_s: float) -> dict:
    """Run ``python -m bench._worker`` on ``spec`` and return its result dict.

    Status ``"oom"`` when the worker reports an out-of-memory error or is killed by SIGKILL (what
    the kernel's OOM killer sends), ``"timeout"`` past ``timeout_s``, ``"error"`` otherwise.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # Big allocations through mmap, returned to the OS on free: a freed buffer cannot hide the next peak.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    cmd = [sys.executable, "-m", "bench._worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"no result within {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom", "note": "worker killed by SIGKILL (out of memory)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"status": "error", "note": f"worker failed: {tail[0][:200]}"}


# ------------------------------------------------------------------------------------------------
# Roofline references measured on the device (GPU only)
# ------------------------------------------------------------------------------------------------
def measure_device_peaks(device: torch.device) -> dict:
    """Measured copy bandwidth (bytes/s, read+write of a 1 GiB buffer) and bf16 GEMM throughput
    (FLOP/s, 8192^3); the denominators of the ``roofline`` column."""
    if device.type != "cuda":
        return {}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t_copy = statistics.median(time_cuda(lambda: dst.copy_(src), 20, [], device))
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    t_mm = statistics.median(time_cuda(lambda: a @ b, 20, [], device))
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * n / (t_copy * 1e-3), "bf16_gemm_flops_per_s": 2 * m**3 / (t_mm * 1e-3)}


def roofline_fractions(op: OpBench, provider: Provider, row: ResultRow, peaks: dict):
    """Fill ``roofline_fwd`` / ``roofline_fwdbwd``: achieved bytes/s (or FLOP/s) over the measured
    peak, counting what this provider issues (``bench.cost``)."""
    cost_fn = provider.cost or op.cost
    if not peaks or cost_fn is None or op.roofline is None or row.get("status") != "ok":
        return
    cost = cost_fn(row["shape"], DTYPES[row["dtype"]])
    kind, ref = ("bytes", peaks["copy_bytes_per_s"]) if op.roofline == "bandwidth" else (
        "flops", peaks["bf16_gemm_flops_per_s"])
    for phase in ("fwd", "fwdbwd"):
        t = (row.get(f"{phase}_ms") or {}).get("median")
        amount = cost.amount(kind, phase)
        if t and amount:
            row[f"roofline_{phase}"] = amount / (t * 1e-3) / ref


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    ops: list[str]
    device: torch.device
    dtype: torch.dtype | None = None  # None: each op's default for the device
    shapes: list[dict] | None = None  # overrides (keys each op knows)
    preset: dict | None = None
    quick: bool = False
    repeats: int | None = None
    warmup: int | None = None
    isolate: bool | None = None  # CPU: one fresh subprocess per case (peak RSS); default on CPU unless quick
    timeout_s: float = 900.0
    registry: str = DEFAULT_REGISTRY
    providers: list[str] | None = None  # restrict to these provider names
    device_peaks: dict | None = None  # measured roofline references to reuse (None: measure on CUDA)


def shapes_for(op: OpBench, cfg: RunConfig) -> list[dict]:
    kind = "quick" if cfg.quick else ("cuda" if cfg.device.type == "cuda" else "cpu")
    base = [dict(s) for s in op.shapes[kind]]
    if cfg.shapes:
        merged = [{**base[0], **{k: v for k, v in s.items() if k in op.shape_keys}} for s in cfg.shapes]
        base = merged
    if cfg.preset:
        base = [{**s, **{k: v for k, v in cfg.preset.items() if k in op.shape_keys}} for s in base]
    unique = []
    for s in base:
        if s not in unique:
            unique.append(s)
    return unique


def plan(cfg: RunConfig, ops: dict[str, OpBench]):
    """The list of (op, shape, dtype, provider) cases, plus a skip note per unavailable provider."""
    cases, skipped = [], []
    for op_name in cfg.ops:
        op = ops[op_name]
        dtype = op.fixed_dtype or cfg.dtype or op.default_dtype.get(cfg.device.type, torch.float32)
        providers = [p for p in op.providers if cfg.providers is None or p.name in cfg.providers]
        reasons = {}
        for p in providers:
            try:
                reasons[p.name] = p.available(cfg.device)
            except Exception as exc:  # an availability probe must never take the run down
                reasons[p.name] = f"availability check failed: {type(exc).__name__}: {exc}"
        for shape in shapes_for(op, cfg):
            for p in providers:
                if reasons[p.name] is None:
                    cases.append((op, shape, dtype, p))
                else:
                    skipped.append((op, shape, dtype, p, reasons[p.name]))
    return cases, skipped


def base_row(op: OpBench, shape: dict, dtype: torch.dtype, provider: Provider, device: torch.device) -> ResultRow:
    return {
        "op": op.name,
        "provider": provider.name,
        "role": provider.role,
        "shape": dict(shape),
        "shape_str": shape_str(shape),
        "dtype": dtype_name(dtype),
        "device": device.type,
        "x_axis": op.x_axis,
        "x": shape.get(op.x_axis),
        "status": "ok",
        "note": provider.note,
        "fwd_ms": None,
        "fwdbwd_ms": None,
        "peak_fwd_bytes": None,
        "peak_fwdbwd_bytes": None,
        "input_bytes": None,
    }


def run_case(cfg: RunConfig, op: OpBench, shape: dict, dtype: torch.dtype, provider: Provider, repeats: int, warmup: int) -> ResultRow:
    row = base_row(op, shape, dtype, provider, cfg.device)
    isolate = cfg.isolate if cfg.isolate is not None else (cfg.device.type == "cpu" and not cfg.quick)
    if isolate and cfg.device.type == "cpu":
        row["memory_method"] = "peak RSS of a fresh subprocess"
        spec = {
            "registry": cfg.registry, "op": op.name, "provider": provider.name, "shape": shape,
            "dtype": dtype_name(dtype), "device": "cpu", "repeats": repeats, "warmup": warmup,
        }
        result = measure_in_subprocess(spec, cfg.timeout_s)
        status = result.pop("status", "error")
        note = result.pop("note", "")
        row.update(result)
        row["status"] = status
        if note:
            row["note"] = f"{row['note']}; {note}" if row["note"] else note
        return row
    row["memory_method"] = (
        "torch.cuda.max_memory_allocated" if cfg.device.type == "cuda" else "peak RSS in-process (approximate)"
    )
    try:
        row.update(measure_in_process(op, provider, shape, dtype, cfg.device, repeats, warmup))
    except Exception as exc:  # noqa: BLE001 - OOM and any failure become a row
        row["status"] = "oom" if is_oom(exc) else "error"
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        row["note"] = f"{row['note']}; {msg}" if row["note"] else msg
        del exc
        free_device_memory(cfg.device, after_error=True)
    else:
        free_device_memory(cfg.device)
    return row


def default_repeats(cfg: RunConfig) -> tuple[int, int]:
    if cfg.quick:
        repeats, warmup = 2, 1
    elif cfg.device.type == "cuda":
        repeats, warmup = 20, 3
    else:
        repeats, warmup = 3, 1
    return (cfg.repeats or repeats), (cfg.warmup if cfg.warmup is not None else warmup)


def annotate_vs_eager(rows: list[ResultRow]):
    """Speed-up (eager time / this time) and memory ratio (this peak / eager peak) per row, vs the
    eager row of the same op, shape and dtype (forward+backward when the op has a backward)."""
    eager = {}
    for r in rows:
        if r["role"] == "eager" and r["status"] == "ok":
            eager[(r["op"], r["shape_str"], r["dtype"])] = r
    for r in rows:
        e = eager.get((r["op"], r["shape_str"], r["dtype"]))
        r["speedup_vs_eager"] = r["mem_ratio_vs_eager"] = None
        if e is None or r["status"] != "ok":
            continue
        phase = timed_phase(r)
        te, tr = (e.get(f"{phase}_ms") or {}).get("median"), (r.get(f"{phase}_ms") or {}).get("median")
        if te and tr:
            r["speedup_vs_eager"] = te / tr
        me, mr = e.get(f"peak_{phase}_bytes"), peak_bytes(r)
        if me and mr is not None:
            r["mem_ratio_vs_eager"] = mr / me


def run_suite(cfg: RunConfig, progress=None, log: Callable[[str], None] = print) -> Results:
    """Run every case of ``cfg``; returns ``{"meta", "rows", "notes"}`` (see ``report``)."""
    from .environment import capture

    ops = load_registry(cfg.registry)
    unknown = [o for o in cfg.ops if o not in ops]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {sorted(ops)}")
    repeats, warmup = default_repeats(cfg)
    cases, skipped = plan(cfg, ops)
    rows, notes = [], []
    noted = set()
    for op, shape, dtype, p, reason in skipped:
        rows.append({**base_row(op, shape, dtype, p, cfg.device), "status": "skipped", "note": reason})
        if (op.name, p.name) not in noted:
            noted.add((op.name, p.name))
            notes.append(f"{op.name}: {p.name} skipped: {reason}")
            log(f"[skip] {op.name}: {p.name}: {reason}")
    peaks = cfg.device_peaks
    if peaks is None:
        peaks = measure_device_peaks(cfg.device) if cfg.device.type == "cuda" and cases else {}
    task = progress.add_task("benchmarking", total=len(cases)) if progress is not None else None
    for op, shape, dtype, p in cases:
        if progress is not None:
            progress.update(task, description=f"{op.name} {shape_str(shape)} {p.name}")
        row = run_case(cfg, op, shape, dtype, p, repeats, warmup)
        roofline_fractions(op, p, row, peaks)
        rows.append(row)
        if row["status"] in ("oom", "error", "timeout"):
            log(f"[{row['status']}] {op.name} {row['shape_str']} {p.name}: {row['note']}")
        if progress is not None:
            progress.advance(task)
    rows.sort(key=lambda r: cfg.ops.index(r["op"]))  # stable: cases keep their order within an op
    annotate_vs_eager(rows)
    meta = capture(cfg.device)
    meta.update({"repeats": repeats, "warmup": warmup, "quick": cfg.quick, "device_peaks": peaks,
                 "ops": cfg.ops, "preset": cfg.preset})
    return {"meta": meta, "rows": rows, "notes": notes}
