"""``python -m bench``: speed and peak memory of alignkernels vs eager PyTorch and installed peers.

Examples::

    python -m bench                                   # default suite on the default device
    python -m bench --quick                           # CI-sized: tiny shapes, seconds
    python -m bench --ops linear_logprobs --preset qwen2.5-7b
    python -m bench --ops token_logprobs --shapes "N=4096,V=128256;N=8192,V=128256" --dtype bf16
    python -m bench --ops grpo --memory-profile       # GPU: also save a torch.cuda.memory snapshot
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .environment import device_slug
from .harness import DEFAULT_REGISTRY, DTYPES, RunConfig, load_registry, run_suite, shapes_for
from .report import markdown_tables, plot, print_tables, write_json

PRESETS = {
    "llama3-8b": {"H": 4096, "V": 128256},
    "qwen2.5-7b": {"H": 3584, "V": 152064},
    "gemma2-9b": {"H": 3584, "V": 256000, "softcap": 30.0},
}
DEFAULT_OPS = ("token_logprobs", "linear_logprobs", "cross_entropy", "grpo", "dpo", "gae", "prm")
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def parse_shapes(text: str) -> list[dict]:
    """``"N=1024,V=32000;N=4096,V=32000"`` -> ``[{"N": 1024, "V": 32000}, {...}]``."""
    shapes = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        shape = {}
        for item in filter(None, (i.strip() for i in chunk.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"shape item {item!r} is not KEY=VALUE")
            value = value.strip()
            shape[key.strip()] = float(value) if "." in value else int(value)
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes got no shape")
    return shapes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark alignkernels (time, peak memory, roofline fraction on GPU) against eager "
        "PyTorch (alignkernels.reference) and installed peers (TRL kernels, Liger-Kernel, Apple CCE).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument("--ops", default=",".join(DEFAULT_OPS),
                   help=f"comma-separated ops to run (default: all = {','.join(DEFAULT_OPS)})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shapes", type=parse_shapes,
                   help='shapes as "K=V,K=V;K=V,..." (keys an op does not use are ignored, missing keys '
                   "come from its default shape), e.g. \"N=8192,V=151936\" or \"B=8,T=4096\"")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="model preset: sets H and V (and Gemma's softcap) of every op that has them: "
                   + "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in PRESETS.items()))
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="input dtype (default: bf16 on CUDA, fp32 on CPU; GAE always fp32)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="device (default: CUDA if available, else CPU)")
    p.add_argument("--repeats", type=int, help="timed calls per case (default: 20 on CUDA, 3 on CPU, 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls per case (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--quick", action="store_true", help="CI-sized run: tiny shapes, 2 repeats, seconds")
    p.add_argument("--providers", help="comma-separated provider names to keep (e.g. eager,alignkernels:torch,trl)")
    p.add_argument("--out", type=Path,
                   help="output folder for results.json and PNG plots (default: bench/results/<device>/, "
                   "bench/results/<device>/quick/ with --quick)")
    p.add_argument("--memory-profile", action="store_true",
                   help="GPU only: save a torch.cuda.memory._record_memory_history snapshot (pickle, open it at "
                   "https://pytorch.org/memory_viz) of one forward+backward per provider for the first op and shape")
    p.add_argument("--no-isolate", action="store_true",
                   help="CPU: run cases in this process (faster start, but no per-case peak RSS)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per CPU case before it is recorded as timeout")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--markdown", action="store_true", help="also print the tables as GitHub markdown")
    p.add_argument("--e2e", action="store_true",
                   help="one GRPO/DPO training step of a small Qwen2-style model: eager vs stock TRL vs "
                        "alignkernels.integrations.trl.apply() (options after --e2e: see python -m bench.e2e -h)")
    p.add_argument("--static", action="store_true",
                   help="static kernel report without a GPU: registers, spills, occupancy per kernel config, analytic roofline (options after --static: see python -m bench.static -h)")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=argparse.SUPPRESS)
    return p


def memory_profile(cfg: RunConfig, out_dir: Path, console) -> list[Path]:
    """Record the CUDA caching allocator's history over one forward+backward per provider."""
    from .harness import free_device_memory, plan, tensors_in

    if cfg.device.type != "cuda":
        console.print("--memory-profile is GPU-only (torch.cuda.memory snapshots); nothing recorded on CPU.")
        return []
    ops = load_registry(cfg.registry)
    op = ops[cfg.ops[0]]
    shape = shapes_for(op, cfg)[-1]
    cases, _ = plan(RunConfig(**{**cfg.__dict__, "ops": [op.name]}), ops)
    written = []
    for case_op, case_shape, dtype, provider in cases:
        if case_shape != shape:
            continue
        path = out_dir / "memory" / f"{op.name}-{provider.name.replace(':', '_').replace('+', '_')}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            inputs = op.make_inputs(dict(shape), dtype, cfg.device)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            out = provider.run(inputs)
            if op.to_loss is not None:
                op.to_loss(out, inputs).backward()
            del out
            torch.cuda.synchronize()
            torch.cuda.memory._dump_snapshot(str(path))
            written.append(path)
            console.print(f"memory snapshot: {path}")
        except Exception as exc:  # noqa: BLE001 - OOM included: note it and continue
            console.print(f"memory snapshot of {op.name} {provider.name} failed: {type(exc).__name__}: {exc}")
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            for t in tensors_in(locals().get("inputs", {})):
                t.grad = None
            inputs = None
            free_device_memory(cfg.device)
    return written


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--e2e", "--static"):  # sub-commands with their own options (see their --help)
        if flag in raw:
            import importlib

            rest = [a for a in raw if a != flag]
            return importlib.import_module(f"bench.{flag.lstrip('-')}").main(rest)
    args = build_parser().parse_args(raw)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that the tables never wrap
        console = Console(width=max(console.width, 200))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            console.print("--device cuda: no CUDA device is available")
            return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if ops == ["all"]:
        ops = list(DEFAULT_OPS)
    known = load_registry(args.registry)
    unknown = [o for o in ops if o not in known]
    if unknown:
        console.print(f"unknown op(s) {unknown}; choose from {', '.join(known)}")
        return 2
    cfg = RunConfig(
        ops=ops, device=device, dtype=DTYPES[args.dtype] if args.dtype else None, shapes=args.shapes,
        preset=PRESETS.get(args.preset) if args.preset else None, quick=args.quick, repeats=args.repeats,
        warmup=args.warmup, isolate=False if args.no_isolate else None, timeout_s=args.timeout,
        registry=args.registry,
        providers=[p.strip() for p in args.providers.split(",")] if args.providers else None,
    )
    out_dir = args.out or (RESULTS_ROOT / device_slug(device) / ("quick" if args.quick else ""))
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        results = run_suite(cfg, progress=progress, log=lambda msg: progress.console.print(msg))
    print_tables(results, console)
    if args.markdown:
        console.print(markdown_tables(results), markup=False, highlight=False)
    # A partial run (--ops subset) into the default folder gets its own file instead of
    # overwriting the full suite's results.json.
    partial = args.out is None and not set(ops) >= set(DEFAULT_OPS)
    name = f"results-{'+'.join(ops)}.json" if partial else "results.json"
    json_path = write_json(results, Path(out_dir) / name)
    pngs = [] if args.no_plots else plot(results, out_dir)
    console.print(f"wrote {json_path}" + "".join(f"\nwrote {p}" for p in pngs))
    if args.memory_profile:
        memory_profile(cfg, Path(out_dir), console)
    return 0 if any(r["status"] == "ok" for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
