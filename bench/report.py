"""Presenting a run: rich tables, the JSON record, and PNG plots.

JSON (``results.json`` in the output folder)::

    {"meta": {device, device_name, torch, triton, cuda, cpu, git_commit, timestamp, repeats, ...},
     "rows": [{op, provider, role, shape, shape_str, dtype, status ("ok"|"oom"|"skipped"|"error"|
               "timeout"), note, fwd_ms: {median, p25, p75, min, max, n}, fwdbwd_ms: {...},
               peak_fwd_bytes, peak_fwdbwd_bytes, input_bytes, speedup_vs_eager,
               mem_ratio_vs_eager, roofline_fwd, roofline_fwdbwd}, ...],
     "notes": ["<op>: <provider> skipped: <reason>", ...]}

Peaks are bytes above the inputs (``input_bytes``, reported separately). Plots (``<op>.png``):
forward+backward median time and peak memory against the op's sequence axis (N or T), one line
per provider, one row of panels per remaining shape (e.g. per vocabulary size).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .harness import REPO_ROOT


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
    base = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{base}".lower()).strip("-")
    return slug[:60] or device.type


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_meta(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------
def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if n < 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def fmt_ms(t: dict | None) -> str:
    if not t:
        return "-"
    med = t["median"]
    lo, hi = (t["p25"], t["p75"]) if t["n"] >= 5 else (t["min"], t["max"])
    digits = 3 if med < 1 else (2 if med < 100 else 1)
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt_ratio(x, suffix="x") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table_columns(results: dict) -> list[str]:
    cols = ["provider", "shape", "dtype", "fwd ms", "fwd+bwd ms", "peak mem", "inputs", "speed-up", "mem vs eager"]
    if results["meta"].get("device") == "cuda":
        cols.append("roofline fwd / fwd+bwd")
    return cols


def table_rows(results: dict, op: str) -> list[list[str]]:
    gpu = results["meta"].get("device") == "cuda"
    out = []
    for r in results["rows"]:
        if r["op"] != op or r["status"] == "skipped":
            continue
        status = r["status"]
        peak = r.get("peak_fwdbwd_bytes") if r.get("fwdbwd_ms") else r.get("peak_fwd_bytes")
        if status == "ok":
            cells = [fmt_ms(r.get("fwd_ms")), fmt_ms(r.get("fwdbwd_ms")), fmt_bytes(peak), fmt_bytes(r.get("input_bytes")),
                     fmt_ratio(r.get("speedup_vs_eager")), fmt_ratio(r.get("mem_ratio_vs_eager"))]
        else:
            label = status.upper()
            cells = [label, label, label, fmt_bytes(r.get("input_bytes")), "-", "-"]
        row = [r["provider"], r["shape_str"], r["dtype"], *cells]
        if gpu:
            row.append(f"{fmt_pct(r.get('roofline_fwd'))} / {fmt_pct(r.get('roofline_fwdbwd'))}" if status == "ok" else "-")
        out.append(row)
    return out


def op_titles(results: dict) -> dict[str, str]:
    return {r["op"]: r.get("op_title", r["op"]) for r in results["rows"]}


def print_tables(results: dict, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    meta = results["meta"]
    console.print(f"[bold]device[/bold]: {meta['device_name']}  torch {meta['torch']}  triton {meta['triton']}"
                  f"  cuda {meta['cuda']}  commit {(meta.get('git_commit') or '?')[:10]}  {meta['timestamp']}")
    cols = table_columns(results)
    for op in dict.fromkeys(r["op"] for r in results["rows"]):
        rows = table_rows(results, op)
        table = Table(title=op, title_justify="left", show_lines=False)
        for c in cols:
            table.add_column(c, justify="left" if c in ("provider", "shape", "dtype") else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(LEGEND, markup=False, highlight=False)
    for line in footnotes(results):
        console.print(f"  {line}", markup=False, highlight=False)


LEGEND = (
    "Times: median [p25-p75 with >= 5 repeats, else min-max] in ms. peak mem: peak above the inputs "
    "(forward+backward when the op has a backward). speed-up = eager time / time; "
    "mem vs eager = peak / eager peak (lower is better)."
)


def footnotes(results: dict) -> list[str]:
    lines = [f"note: {n}" for n in results.get("notes", [])]
    methods = sorted({r.get("memory_method") for r in results["rows"] if r.get("memory_method")})
    if methods:
        lines.append("memory: " + "; ".join(methods))
    for r in results["rows"]:
        if r["status"] in ("oom", "error", "timeout"):
            lines.append(f"{r['status']}: {r['op']} {r['shape_str']} {r['provider']}: {r['note']}")
    return lines


def markdown_tables(results: dict) -> str:
    """The same tables as GitHub markdown (for the README)."""
    cols = table_columns(results)
    parts = []
    for op in dict.fromkeys(r["op"] for r in results["rows"]):
        rows = table_rows(results, op)
        if not rows:
            continue
        parts.append(f"**{op}**\n")
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + "|".join("---" for _ in cols) + "|")
        parts.extend("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows)
        parts.append("")
    parts.append(LEGEND)
    parts.extend(f"- {line}" for line in footnotes(results))
    return "\n".join(parts)


def write_json(results: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def plot(results: dict, out_dir: Path) -> list[Path]:
    """One PNG per op: time (fwd+bwd, else fwd) and peak memory vs the op's sequence axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = [r for r in results["rows"] if r["status"] == "ok" and r.get("x") is not None]
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        x_axis = op_rows[0]["x_axis"]

        def group_key(r):
            return (r["dtype"],) + tuple((k, v) for k, v in r["shape"].items() if k != x_axis)

        groups = list(dict.fromkeys(group_key(r) for r in op_rows))
        fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
        for gi, g in enumerate(groups):
            g_rows = [r for r in op_rows if group_key(r) == g]
            label = " ".join(f"{k}={v}" for k, v in g[1:]) + f" {g[0]}"
            ax_t, ax_m = axes[gi]
            for provider in dict.fromkeys(r["provider"] for r in g_rows):
                pr = sorted((r for r in g_rows if r["provider"] == provider), key=lambda r: r["x"])
                xs = [r["x"] for r in pr]
                phase = "fwdbwd" if pr[0].get("fwdbwd_ms") else "fwd"
                ts = [r[f"{phase}_ms"]["median"] for r in pr]
                ax_t.plot(xs, ts, marker="o", label=provider)
                ms = [(r.get(f"peak_{phase}_bytes"), r["x"]) for r in pr]
                ms = [(x, m / (1 << 20)) for m, x in ms if m is not None]
                if ms:
                    ax_m.plot([x for x, _ in ms], [m for _, m in ms], marker="o", label=provider)
            phase_name = "fwd+bwd" if any(r.get("fwdbwd_ms") for r in g_rows) else "fwd"
            for ax, ylabel in ((ax_t, f"{phase_name} median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(x_axis)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op}: {label}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        meta = results["meta"]
        fig.suptitle(f"{op} on {meta['device_name']} ({meta['timestamp'][:10]})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    """``python -m bench.report RESULTS.json``: print a saved run's tables as markdown (for the README)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a results.json written by python -m bench")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    meta = results["meta"]
    print(f"Device: {meta['device_name']}; torch {meta['torch']}, triton {meta['triton']}; "
          f"commit {(meta.get('git_commit') or '?')[:10]}; {meta['timestamp']}\n")
    print(markdown_tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
