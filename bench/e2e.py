"""``python -m bench --e2e``: one training step of a small Qwen2-style model (from a config, no
download) under GRPO and DPO -- eager full logits vs stock TRL (its own fused lm-head) vs TRL with
``alignkernels.integrations.trl.apply()``: step time and peak memory.

GPU: ``torch.cuda.max_memory_allocated``. CPU: each (trainer, mode) runs in a fresh process and
reports its peak RSS (the model and inputs included, identical across modes).
Writes ``bench/results/<device>/e2e.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def run_one(trainer: str, mode: str, seq_len: int, batch_size: int, vocab_size: int, device: str, steps: int) -> dict:
    from alignkernels.integrations.trl import e2e_step_benchmark

    (row,) = e2e_step_benchmark(trainer, modes=(mode,), seq_len=seq_len, batch_size=batch_size,
                                vocab_size=vocab_size, device=device, steps=steps, warmup=1)  # fmt: skip
    if row.get("peak_memory_bytes") is None:
        row["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["memory_kind"] = "peak RSS of the process"
    else:
        row["memory_kind"] = "torch.cuda.max_memory_allocated"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --e2e", description=__doc__.splitlines()[0])
    p.add_argument("--trainers", default="grpo,dpo")
    p.add_argument("--modes", default="eager,trl,alignkernels")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=None, help="default 151936 on GPU, 32000 on CPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("TRAINER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    seq_len = args.seq_len or (8192 if device == "cuda" else 1024)
    vocab = args.vocab_size or (151936 if device == "cuda" else 32000)
    if args.worker:
        print(json.dumps(run_one(*args.worker, seq_len, args.batch_size, vocab, device, args.steps), default=str))
        return 0

    from rich.console import Console
    from rich.table import Table

    from .report import device_name, device_slug, git_commit

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    rows = []
    for trainer in args.trainers.split(","):
        for mode in args.modes.split(","):
            with console.status(f"{trainer} / {mode}: one step at seq_len={seq_len}, V={vocab} on {device}"):
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "bench.e2e", "--worker", trainer, mode, "--seq-len", str(seq_len),
                       "--batch-size", str(args.batch_size), "--vocab-size", str(vocab), "--steps",
                       str(args.steps), "--device", device]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode != 0:
                oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
                rows.append(dict(trainer=trainer, mode=mode, status="OOM" if oom else "error",
                                 error=proc.stderr.strip().splitlines()[-1:] or ["?"]))  # fmt: skip
                console.print(f"{trainer}/{mode}: {rows[-1]['status']} {rows[-1]['error'][0]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(status="ok", wall_s=time.perf_counter() - t0)
            rows.append(row)

    table = Table(title=f"One training step, seq_len={seq_len}, V={vocab}, {device_name(torch.device(device))}")
    for col in ("trainer", "mode", "step time", "peak memory", "memory vs stock TRL", "memory vs eager"):
        table.add_column(col)
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["trainer"], r["mode"], r["status"], "", "", "")
            continue
        ref = {m["mode"]: m for m in rows if m["trainer"] == r["trainer"] and m["status"] == "ok"}
        ratio = lambda base: f"{r['peak_memory_bytes'] / ref[base]['peak_memory_bytes']:.2f}x" if base in ref else "-"  # noqa: E731
        table.add_row(r["trainer"], r["mode"], f"{r['step_time_s'] * 1e3:.0f} ms",
                      f"{r['peak_memory_bytes'] / 2**20:.0f} MiB", ratio("trl"), ratio("eager"))  # fmt: skip
    console.print(table)
    out = args.out or RESULTS_ROOT / device_slug(torch.device(device)) / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(torch.device(device)), torch=torch.__version__, commit=git_commit(),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seq_len=seq_len, vocab_size=vocab)  # fmt: skip
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str) + "\n")
    console.print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
