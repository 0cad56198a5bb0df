"""``python -m bench.batch_invariant``: the cost of ``batch_invariant=True`` beside the default path.

For ``linear_logprobs``, ``token_logprobs`` and ``fused_linear_cross_entropy`` (fp32, forward +
backward through logp and entropy -- the fused loss: through its loss, on the three-GEMM head -- to
the input; the weight frozen) it times both modes (median of ``--repeats`` wall-clock calls after one warm-up, interleaved so load
on a shared machine hits both alike), counts the matmul FLOPs each issues
(``alignkernels.flops.MatmulFlopCounter``) and the padded rows, and writes
``bench/results/<device>/batch_invariant.json``; ``python -m bench.report`` renders it into
``docs/BENCHMARKS.md``. N = 1000 is off the tile multiples (1024 = 4·256 = 8·128), so 24 padded
rows are paid.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import alignkernels as ak
from alignkernels.flops import MatmulFlopCounter

from .environment import capture, device_slug

CASES = (("linear_logprobs", dict(N=1000, H=256, V=16384)), ("token_logprobs", dict(N=1000, V=32768)),
         ("fused_linear_cross_entropy", dict(N=1000, H=256, V=16384)))
# the fixed CPU tiles at these shapes (token_logprobs, V = 32768: 4M // V; the three-GEMM head: min(512, 8M // V))
TILE_ROWS = {"linear_logprobs": 256, "token_logprobs": 128, "fused_linear_cross_entropy": 512}


def _inputs(op, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, shape["V"], (shape["N"],), generator=g)
    if op != "token_logprobs":
        return (torch.randn(shape["N"], shape["H"], generator=g), torch.randn(shape["V"], shape["H"], generator=g) / 16,
                labels)  # fmt: skip
    return (torch.randn(shape["N"], shape["V"], generator=g) * 3, labels)


def _step(op, inputs, batch_invariant):
    leaf = inputs[0].clone().requires_grad_(True)
    if op == "fused_linear_cross_entropy":  # the three-GEMM head: the loss's gradient formed in the forward
        ak.fused_linear_cross_entropy(leaf, *inputs[1:], backend="torch", batch_invariant=batch_invariant).backward()
        return
    fn = ak.linear_logprobs if op == "linear_logprobs" else ak.token_logprobs
    logp, entropy = fn(leaf, *inputs[1:], return_entropy=True, backend="torch", batch_invariant=batch_invariant)
    (logp.sum() + entropy.sum()).backward()


def measure(repeats: int = 5) -> list[dict]:
    rows = []
    for op, shape in CASES:
        inputs = _inputs(op, shape)
        flops = {}
        for mode in (False, True):
            with MatmulFlopCounter() as counter:
                _step(op, inputs, mode)  # also the warm-up
            flops[mode] = counter.total
        times = {False: [], True: []}
        for _ in range(repeats):
            for mode in (False, True):
                t0 = time.perf_counter()
                _step(op, inputs, mode)
                times[mode].append(time.perf_counter() - t0)
        default_ms, invariant_ms = (statistics.median(times[m]) * 1e3 for m in (False, True))
        rows.append(dict(op=op, shape=" ".join(f"{k}={v}" for k, v in shape.items()), default_ms=default_ms,
                         batch_invariant_ms=invariant_ms, ratio=invariant_ms / default_ms,
                         default_matmul_flops=flops[False], batch_invariant_matmul_flops=flops[True],
                         padded_rows=math.ceil(shape["N"] / TILE_ROWS[op]) * TILE_ROWS[op] - shape["N"],
                         repeats=repeats))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_invariant", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="the JSON file (default bench/results/<device>/batch_invariant.json)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(device) / "batch_invariant.json"
    rows = measure(args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": capture(device), "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"{r['op']:16s} {r['shape']:22s} default {r['default_ms']:8.1f} ms  batch_invariant "
              f"{r['batch_invariant_ms']:8.1f} ms  x{r['ratio']:.2f}  padded rows {r['padded_rows']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
