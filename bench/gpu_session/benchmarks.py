"""Phase ``bench``: measured ceilings (copy bandwidth, bf16 GEMM), then eager and our rows of every
headline case through ``bench.harness.run_suite`` (each provider counted by ``bench.cost``), the bare
GEMMs of the ``linear_logprobs`` shape, our peak memory at large N and one memory snapshot (Python
stacks); the peers last (Liger's ``torch.compile`` warm-ups are the slowest step), merged into the
same steps. Order = priority when the phase's limit cuts it short."""
from __future__ import annotations

from pathlib import Path

from .plan import MEMORY_OP, MEMORY_PROVIDERS, sizes
from .record import MAX_FILE_BYTES, PhaseRecord, run_step


def run_cases(op_name: str, shapes: list[dict], providers, cfg_sizes: dict, peaks: dict, repeats=None) -> dict:
    import torch

    from ..harness import DTYPES, RunConfig, run_suite

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

    from ..harness import DTYPES, summarize_ms, time_cpu, time_cuda

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

    from ..harness import DTYPES
    from ..registry import build_ops

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

    from ..harness import measure_device_peaks

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
                 lambda h=h: {"shape": h.shape, **run_cases(h.op, [h.shape], ours(h.providers), cfg, peaks)})
        if h.op == MEMORY_OP:
            run_step(record, "bare_gemms", args.deadline,
                     lambda h=h: bare_gemms(h.shape, cfg["device"], cfg["dtype"], cfg["repeats"]))
    memory = f"memory:{MEMORY_OP}"
    run_step(record, memory, args.deadline,
             lambda: run_cases(MEMORY_OP, list(cfg["memory"]), ours(MEMORY_PROVIDERS), cfg, peaks, repeats=1))
    linear = next(h for h in heads if h.op == MEMORY_OP)
    run_step(record, "memory_snapshot", args.deadline, lambda: memory_snapshot(args.work, linear.shape, cfg["dtype"]))
    for h in heads:
        if peers(h.providers):
            run_step(record, f"peers:{h.op}", args.deadline, lambda h=h: add_rows(
                record, f"headline:{h.op}", run_cases(h.op, [h.shape], peers(h.providers), cfg, peaks)))  # fmt: skip
    run_step(record, f"peers:{memory}", args.deadline, lambda: add_rows(
        record, memory, run_cases(MEMORY_OP, list(cfg["memory"]), peers(MEMORY_PROVIDERS), cfg, peaks, repeats=1)))
    return 0


def ours(providers) -> tuple[str, ...]:
    """Eager and alignkernels' providers (the first pass of the bench phase)."""
    return tuple(p for p in providers if p == "eager" or p.startswith("alignkernels"))


def peers(providers) -> tuple[str, ...]:
    return tuple(p for p in providers if p not in ours(providers))


def add_rows(record: PhaseRecord, name: str, extra: dict) -> dict:
    """Merge a later pass's rows into step ``name`` of ``record`` (speed-ups recomputed against its
    eager row); returns the later pass's own short record."""
    from ..harness import annotate_vs_eager

    step = record.data["steps"].get(name)
    if not isinstance(step, dict) or "rows" not in step:
        step = {"status": "ok", "rows": [], "notes": []}
    rows = step["rows"] + extra["rows"]
    annotate_vs_eager(rows)
    record.step(name, {**step, "rows": rows, "notes": step.get("notes", []) + extra["notes"]})
    return {"merged_into": name, "rows": len(extra["rows"]),
            "providers": sorted({r["provider"] for r in extra["rows"]})}  # fmt: skip
