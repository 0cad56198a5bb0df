"""``python -m bench --static``: performance evidence without a GPU.

1. Every Triton kernel at every launch config its launcher can choose (``COMPILE_CASES``),
   compiled for sm_80 and sm_90: registers per thread, local memory (spills), shared memory and
   the theoretical occupancy per SM (``bench.kernel_report``).
2. The CUDA C++ kernels in ``csrc/`` (when nvcc is present): ``ptxas -v`` registers and spills.
3. The analytic cost of each op at the benchmark shapes (bytes, FLOPs: ``bench.cost``, the same
   model as the GPU runs' roofline column) and its roofline lower bound on A100, H100 and H200,
   so any GPU timing can be read as a fraction of its roofline.

Writes ``bench/results/static/static_report.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .cost import DEVICE_PEAKS, HeadPath, linear_logprobs_cost, roofline_seconds, token_logprobs_cost

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "bench" / "results" / "static"

TOKEN_SHAPES = [(8192, 32000), (8192, 128256), (8192, 151936), (8192, 256000)]
LINEAR_SHAPES = [(8192, 4096, 128256), (8192, 3584, 152064), (8192, 3584, 256000)]


def triton_report(ccs) -> dict:
    """Compile every case in a subprocess with TRITON_INTERPRET unset (see kernel_report)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_report", *map(str, ccs)],
                          capture_output=True, text=True, env=env, check=True, cwd=REPO_ROOT)  # fmt: skip
    return json.loads(proc.stdout)


def summarize_triton(results: dict, ccs) -> list[dict]:
    """One row per (kernel, constexprs, warps): the worst case over the dtype variants."""
    rows: dict[tuple, dict] = {}
    for key, r in results.items():
        case_id, cc = key.rsplit("@sm", 1)
        module, kernel = case_id.split("-")[:2]
        ident = (module, kernel, json.dumps(r.get("constexprs", {}), sort_keys=True), r.get("num_warps"))
        row = rows.setdefault(ident, dict(module=module, kernel=kernel, constexprs=r.get("constexprs", {}),
                                          num_warps=r.get("num_warps"), ok=True, variants=0))  # fmt: skip
        row["variants"] += 1
        row["ok"] &= bool(r["ok"])
        if not r["ok"]:
            continue
        for field, worst in (("registers", max), ("local_bytes", max), ("shared_bytes", max), ("occupancy", min)):
            name = f"{field}_sm{cc}"
            row[name] = worst(row.get(name, r[field]), r[field])
    return list(rows.values())


def cuda_report(ccs) -> list[dict]:
    """``ptxas -v`` for each kernel of csrc/*.cu; empty when nvcc is missing."""
    from alignkernels._build import find_csrc, find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        return []
    csrc = find_csrc()
    rows = []
    for cc in ccs:
        for src in sorted(csrc.glob("*.cu")):
            cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{csrc}", "-cubin",
                   f"-arch=sm_{cc}", "-Xptxas", "-v", "-o", os.devnull, str(src)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True).stderr
            current = None
            for line in out.splitlines():
                m = re.search(r"Compiling entry function '([^']+)'", line)
                if m:
                    function = _demangle(m.group(1)).replace("alignkernels::(anonymous namespace)::", "")
                    current = dict(source=src.name, function=function.removeprefix("void "), cc=cc)
                    rows.append(current)
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m and current is not None:
                    current.update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
                m = re.search(r"Used (\d+) registers", line)
                if m and current is not None:
                    current["registers"] = int(m.group(1))
    return rows


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name


def cost_rows() -> list[dict]:
    rows = []
    for N, V in TOKEN_SHAPES:
        cost = token_logprobs_cost(N, V, elem_bytes=2)
        rows.append(dict(op="token_logprobs", shape=f"N={N} V={V} bf16", **cost.as_dict(),
                         **{f"{dev} fwd+bwd us": 1e6 * roofline_seconds(cost, dev) for dev in DEVICE_PEAKS}))  # fmt: skip
    for path in (HeadPath.RECOMPUTE, HeadPath.GRAD_IN_FORWARD):
        for N, H, V in LINEAR_SHAPES:
            cost = linear_logprobs_cost(N, H, V, elem_bytes=2, path=path)
            rows.append(dict(op=f"linear_logprobs ({path.value})", shape=f"N={N} H={H} V={V} bf16", **cost.as_dict(),
                             **{f"{dev} fwd+bwd us": 1e6 * roofline_seconds(cost, dev) for dev in DEVICE_PEAKS}))  # fmt: skip
    return rows


def print_report(triton_rows, cuda_rows, costs, ccs, console):
    from rich.table import Table

    t = Table(title="Triton kernels: worst case over dtype variants (regs/thread, spill bytes, occupancy)")
    for col in ("kernel", "config", "warps", *[f"regs sm{cc}" for cc in ccs], *[f"spill sm{cc}" for cc in ccs],
                *[f"occ sm{cc}" for cc in ccs]):  # fmt: skip
        t.add_column(col, justify="right" if col not in ("kernel", "config") else "left")
    for r in sorted(triton_rows, key=lambda r: (r["module"], r["kernel"], r["num_warps"])):
        config = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items()) or "-"
        t.add_row(r["kernel"], config, str(r["num_warps"]),
                  *[str(r.get(f"registers_sm{cc}", "ERR")) for cc in ccs],
                  *[str(r.get(f"local_bytes_sm{cc}", "ERR")) for cc in ccs],
                  *[f"{r[f'occupancy_sm{cc}']:.2f}" if f"occupancy_sm{cc}" in r else "ERR" for cc in ccs])  # fmt: skip
    console.print(t)
    if cuda_rows:
        c = Table(title="CUDA C++ kernels (ptxas -v)")
        for col in ("source", "function", "sm", "regs", "spill st/ld"):
            c.add_column(col)
        for r in cuda_rows:
            c.add_row(r["source"], r["function"][:100], str(r["cc"]), str(r.get("registers", "?")),
                      f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}")  # fmt: skip
        console.print(c)
    else:
        console.print("CUDA C++ kernels: nvcc not found, skipped")
    k = Table(title="Analytic cost and roofline lower bound (forward+backward)")
    for col in ("op", "shape", "GB moved", "TFLOP", *[f"{d} us" for d in DEVICE_PEAKS]):
        k.add_column(col)
    for r in costs:
        k.add_row(r["op"], r["shape"], f"{r['fwdbwd_bytes'] / 1e9:.2f}", f"{r['fwdbwd_flops'] / 1e12:.2f}",
                  *[f"{r[f'{d} fwd+bwd us']:.0f}" for d in DEVICE_PEAKS])  # fmt: skip
    console.print(k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --static", description=__doc__.splitlines()[0])
    p.add_argument("--cc", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc resource report of csrc/")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that the tables never wrap
        console = Console(width=max(console.width, 160))
    ccs = [int(c) for c in args.cc.split(",")]
    with console.status("compiling every Triton kernel config for " + ", ".join(f"sm_{c}" for c in ccs)):
        raw = triton_report(ccs)
    triton_rows = summarize_triton(raw, ccs)
    with console.status("ptxas -v on csrc/ kernels"):
        cuda_rows = [] if args.no_cuda else cuda_report(ccs)
    costs = cost_rows()
    print_report(triton_rows, cuda_rows, costs, ccs, console)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "static_report.json"
    path.write_text(json.dumps(dict(triton=raw, triton_summary=triton_rows, cuda=cuda_rows, costs=costs,
                                    device_peaks=DEVICE_PEAKS), indent=1, default=str))  # fmt: skip
    console.print(f"wrote {path}")
    failed = [r for r in triton_rows if not r["ok"]]
    spilling = [r for r in triton_rows if any(r.get(f"local_bytes_sm{cc}", 0) for cc in ccs)]
    if failed or spilling:
        console.print(f"[red]{len(failed)} config(s) failed to compile, {len(spilling)} spill[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
