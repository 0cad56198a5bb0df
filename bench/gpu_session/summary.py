"""Phase ``summary`` (always run, inside the budget's reserve): whatever the phases left in the work
folder becomes at most eight files in the output folder (see the package docstring)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..environment import REPO_ROOT
from ..records import timed_phase
from .plan import MEMORY_OP
from .record import MAX_FILE_BYTES, load_phase, read_status


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rows_markdown(step: dict) -> list[str]:
    """A bench step's rows through the one renderer, ``bench.report.markdown_tables``."""
    from ..report import markdown_tables

    rows = step.get("rows", [])
    meta = {"device": rows[0].get("device") if rows else None}
    return markdown_tables({"meta": meta, "rows": rows, "notes": step.get("notes", [])}, legend=False).splitlines()


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
    env_steps = (load_phase(work, "env") or {}).get("steps") or {}
    env = {**(env_steps.get("environment") or {}), **(env_steps.get("device") or {})}
    tools = env_steps.get("toolchain") or {}
    lines = [f"# GPU session{' (DRY RUN on CPU: tiny shapes, Triton interpreted)' if dry_run else ''}", ""]
    lines += [f"- device: {env.get('device_name', '?')} (capability {env.get('capability', '-')}, "
              f"{env.get('sm_count', '-')} SMs); driver {env.get('driver') or '-'}",
              f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}",
              "- peers: " + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v),
              f"- commit {env.get('git_commit') or '?'}{' + uncommitted changes' if env.get('git_dirty') else ''}; "
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
    build = ((load_phase(work, "build") or {}).get("steps") or {}).get("cuda_extension")
    if build:
        lines += ["", f"CUDA extension: {build.get('status')} {build.get('note', '')} "
                  f"(build {build.get('build_s', '-')} s, archs {build.get('archs')})"]  # fmt: skip
    tests = ((load_phase(work, "tests") or {}).get("steps") or {}).get("pytest")
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
    bench = (load_phase(work, "bench") or {}).get("steps") or {}
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
            lines += [f"shape {step.get('shape')}", ""] + rows_markdown(step)
        elif name.startswith("memory:"):
            lines += ["peak memory above the inputs, forward+backward", ""] + rows_markdown(step)
        elif name == "bare_gemms":
            lines += ["| GEMM | median ms | TFLOP/s |", "|---|---|---|"]
            for k, v in step.items():
                if isinstance(v, dict) and "median" in v:
                    lines.append(f"| {k} | {v['median']:.3f} | {v['tflops']:.0f} |")
            lines.append(f"| **three GEMMs** (gradient in forward) | {step['three_gemms_ms']:.3f} | |")
            lines.append(f"| **four GEMMs** (with the backward's recompute) | {step['four_gemms_ms']:.3f} | |")
        elif name == "memory_snapshot":
            lines.append(f"`{step.get('path')}` ({step.get('bytes', 0) / 2**20:.1f} MiB), shape {step.get('shape')}")
    if bench:
        from ..report import LEGEND

        lines += ["", LEGEND]
    lines += ["", "## Phase 3: tuning", "", "See `tuning.md`.", ""]
    return "\n".join(lines) + "\n"


def plots(work: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = (load_phase(work, "bench") or {}).get("steps") or {}
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
            ms = [r[f"{timed_phase(r)}_ms"]["median"] for r in rows]
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

    from ..environment import device_slug

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
               **{p: load_phase(work, p) for p in ("env", "build", "tests", "bench", "tune")}}  # fmt: skip
    (out / "session.json").write_text(json.dumps(session, indent=1, default=str) + "\n")
    written.append("session.json")
    (out / "tuning.md").write_text(tuning_markdown(load_phase(work, "tune")))
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
