"""Presenting a run: rich tables, the JSON record, and PNG plots.

JSON (``results.json`` in the output folder)::

    {"meta": {<bench.environment.capture keys>, repeats, warmup, device_peaks, ...},
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

import json
from pathlib import Path

from .environment import REPO_ROOT
from .records import ResultRow, Results, peak_bytes, timed_phase


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


def table_columns(results: Results) -> list[str]:
    cols = ["provider", "shape", "dtype", "fwd ms", "fwd+bwd ms", "peak mem", "inputs", "speed-up", "mem vs eager"]
    if results["meta"].get("device") == "cuda":
        cols.append("roofline fwd / fwd+bwd")
    return cols


def table_rows(results: Results, op: str) -> list[list[str]]:
    gpu = results["meta"].get("device") == "cuda"
    out = []
    for r in results["rows"]:
        if r["op"] != op or r["status"] == "skipped":
            continue
        status = r["status"]
        peak = peak_bytes(r)
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


def op_titles(results: Results) -> dict[str, str]:
    return {r["op"]: r.get("op_title", r["op"]) for r in results["rows"]}


def print_tables(results: Results, console=None):
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


def footnotes(results: Results) -> list[str]:
    lines = [f"note: {n}" for n in results.get("notes", [])]
    methods = sorted({r.get("memory_method") for r in results["rows"] if r.get("memory_method")})
    if methods:
        lines.append("memory: " + "; ".join(methods))
    for r in results["rows"]:
        if r["status"] in ("oom", "error", "timeout"):
            lines.append(f"{r['status']}: {r['op']} {r['shape_str']} {r['provider']}: {r['note']}")
    return lines


def markdown_tables(results: Results, legend: bool = True) -> str:
    """The same tables as GitHub markdown (the README, ``docs/BENCHMARKS.md``, the GPU session's
    ``SUMMARY.md``), then the footnotes; ``legend=False`` leaves the legend to the caller."""
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
    if legend:
        parts.append(LEGEND)
    parts.extend(f"- {line}" for line in footnotes(results))
    return "\n".join(parts)


def write_json(results: Results, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def plot(results: Results, out_dir: Path) -> list[Path]:
    """One PNG per op: time (fwd+bwd, else fwd) and peak memory vs the op's sequence axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows: list[ResultRow] = [r for r in results["rows"] if r["status"] == "ok" and r.get("x") is not None]
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
                phase = timed_phase(pr[0])
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


# ------------------------------------------------------------------------------------------------
# docs/BENCHMARKS.md: every committed result, generated
# ------------------------------------------------------------------------------------------------
RESULTS_ROOT = REPO_ROOT / "bench" / "results"
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"

HOW_IT_MEASURES = """\
How `python -m bench` measures: warm-up, then on GPU CUDA events with the L2 cache flushed before
each call (median and quartiles), on CPU the median of wall-clock repeats. Peak memory above the
inputs: `torch.cuda.max_memory_allocated` reset per case and provider on GPU, peak RSS of a fresh
subprocess per case on CPU. On GPU the roofline column is achieved bytes/s over the measured copy
bandwidth (logits ops) or FLOP/s over a measured bf16 GEMM (hidden-state ops), each provider counted
by what it issues (`bench/cost.py`: 8·N·H·V for the recompute path, 6·N·H·V for a gradient formed in
the forward or for materialised logits). A GPU window's full record (tests, headline cases against
TRL / Liger / CCE, bare GEMMs, big-N memory, tuning) is `bench/results/<gpu>/SUMMARY.md`, written by
`bash bench/gpu_session.sh` (docs/GPU.md)."""


def _e2e_markdown(e2e: dict) -> list[str]:
    meta = e2e["meta"]
    rows = [r for r in e2e["rows"] if r.get("status") == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in e2e["rows"]))
    out = [f"One training step (`python -m bench --e2e`, seq_len={meta.get('seq_len')}, V={meta.get('vocab_size')}; "
           f"{meta.get('device_name') or meta.get('device')}, torch {meta.get('torch')}, "
           f"commit {(meta.get('git_commit') or meta.get('commit') or '?')[:7]}, "
           f"{meta.get('timestamp')}): step time / peak memory "
           f"({rows[0].get('memory_kind', 'peak memory') if rows else '-'})", "",
           "| trainer | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]  # fmt: skip
    for trainer in dict.fromkeys(r["trainer"] for r in e2e["rows"]):
        cells = []
        for mode in modes:
            r = next((r for r in e2e["rows"] if r["trainer"] == trainer and r["mode"] == mode), None)
            ok = r is not None and r.get("status") == "ok"
            cells.append(f"{r['step_time_s'] * 1e3:.0f} ms / {fmt_bytes(r['peak_memory_bytes'])}" if ok
                         else (r or {}).get("status", "-"))  # fmt: skip
        out.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return out


def _batch_invariant_markdown(data: dict) -> list[str]:
    """``python -m bench.batch_invariant``'s cost of ``batch_invariant=True`` beside the default path."""
    meta = data["meta"]
    out = [f"`batch_invariant=True` vs the default path (`python -m bench.batch_invariant`: fp32, forward + backward to the input (frozen weight), "
           f"backend torch, median of {data['rows'][0]['repeats'] if data['rows'] else '?'} interleaved calls; "
           f"{meta.get('device_name')}, a CPU shared with other jobs, so ±10 % is noise; torch {meta.get('torch')}, "
           f"commit {(meta.get('git_commit') or '?')[:7]}, {meta.get('timestamp')}):", "",
           "| op | shape | default ms | batch_invariant ms | ratio | matmul FLOPs default → invariant | padded rows "
           "(extra FLOPs and bytes of the row passes) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        flops = (f"{r['default_matmul_flops'] / 1e9:.2f} → {r['batch_invariant_matmul_flops'] / 1e9:.2f} G"
                 if r["default_matmul_flops"] else "— (no GEMM)")  # fmt: skip
        n = int(r["shape"].split()[0].removeprefix("N="))
        out.append(f"| {r['op']} | {r['shape']} | {r['default_ms']:.0f} | {r['batch_invariant_ms']:.0f} | "
                   f"{r['ratio']:.2f}x | {flops} | {r['padded_rows']} (+{100 * r['padded_rows'] / n:.1f} %) |")  # fmt: skip
    return out


def _static_markdown(static: dict) -> list[str]:
    from .static import cost_rows

    summary = static.get("triton_summary", [])
    regs = [r[k] for r in summary for k in r if k.startswith("registers_sm")]
    spills = sum(r.get(k, 0) for r in summary for k in r if k.startswith("local_bytes_sm"))
    cuda = static.get("cuda", [])
    out = [f"`python -m bench --static` (no GPU): {len(summary)} Triton launch configs compiled for sm_80 and "
           f"sm_90, {min(regs, default=0)}–{max(regs, default=0)} registers per thread, {spills} spill bytes in all"
           + (f"; {len(cuda)} CUDA C++ kernel builds, {min(r.get('registers', 0) for r in cuda)}–"
              f"{max(r.get('registers', 0) for r in cuda)} registers, "
              f"{sum(r.get('spill_stores', 0) + r.get('spill_loads', 0) for r in cuda)} spill bytes" if cuda else "")
           + ".", "", "Roofline lower bounds, forward+backward, bf16 (`bench/cost.py`, stated peaks):", ""]  # fmt: skip
    rows = cost_rows()
    devices = [k.removesuffix(" fwd+bwd us") for k in rows[0] if k.endswith(" fwd+bwd us")]
    out += ["| op | shape | GB moved | TFLOP | " + " | ".join(f"{d} µs" for d in devices) + " |",
            "|---|---|---|---|" + "---|" * len(devices)]  # fmt: skip
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['fwdbwd_bytes'] / 1e9:.2f} | {r['fwdbwd_flops'] / 1e12:.2f} | "
                   + " | ".join(f"{r[f'{d} fwd+bwd us']:.0f}" for d in devices) + " |")  # fmt: skip
    return out


def benchmarks_markdown(root: Path = RESULTS_ROOT) -> str:
    """docs/BENCHMARKS.md from every committed result under ``bench/results/`` (GPU folders first)."""
    parts = ["# Benchmarks", "", "<!-- generated by `python -m bench.report` from bench/results/; do not edit -->",
             "", HOW_IT_MEASURES, ""]  # fmt: skip
    folders = sorted((p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(("_", "static"))),
                     key=lambda p: (not p.name.startswith("cuda"), p.name))  # fmt: skip
    for folder in folders:
        results = folder / "results.json"
        session = folder / "SUMMARY.md"
        invariant = folder / "batch_invariant.json"
        if not (results.is_file() or session.is_file() or (folder / "e2e.json").is_file() or invariant.is_file()):
            continue
        name = folder.name
        if invariant.is_file():
            name = json.loads(invariant.read_text())["meta"]["device_name"]
        if results.is_file():
            data = json.loads(results.read_text())
            meta = data["meta"]
            name = meta["device_name"]
        parts += [f"## {name}", ""]
        if session.is_file():
            parts += [f"GPU session record: [`bench/results/{folder.name}/SUMMARY.md`]"
                      f"(../bench/results/{folder.name}/SUMMARY.md).", ""]  # fmt: skip
        if results.is_file():
            parts += [f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}; commit "
                      f"{(meta.get('git_commit') or '?')[:7]}; {meta['timestamp']}; plots in "
                      f"`bench/results/{folder.name}/`", "", markdown_tables(data), ""]  # fmt: skip
        if (folder / "e2e.json").is_file():
            parts += _e2e_markdown(json.loads((folder / "e2e.json").read_text())) + [""]
        if invariant.is_file():
            parts += _batch_invariant_markdown(json.loads(invariant.read_text())) + [""]
    static = Path(root) / "static" / "static_report.json"
    if static.is_file():
        parts += ["## Static kernel report", ""] + _static_markdown(json.loads(static.read_text())) + [""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    """``python -m bench.report``: regenerate docs/BENCHMARKS.md from bench/results/ (``--check``: fail
    if it is stale); ``python -m bench.report RESULTS.json``: print one run's tables as markdown."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, nargs="?", help="a results.json written by python -m bench")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_MD, help="where to write (default docs/BENCHMARKS.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from what it would be")
    args = parser.parse_args(argv)
    if args.results is not None:
        results = json.loads(args.results.read_text())
        meta = results["meta"]
        print(f"Device: {meta['device_name']}; torch {meta['torch']}, triton {meta['triton']}; "
              f"commit {(meta.get('git_commit') or '?')[:10]}; {meta['timestamp']}\n")
        print(markdown_tables(results))
        return 0
    text = benchmarks_markdown()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m bench.report")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
