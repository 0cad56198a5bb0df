"""``python -m bench._worker '<json spec>'``: measure one CPU case in this fresh process.

The parent (``bench.harness.measure_in_subprocess``) starts one worker per (op, shape, dtype,
provider) so the peak RSS it reports belongs to that case alone. The result is printed as one
line ``BENCH_RESULT {json}``; an out-of-memory error is reported as status ``"oom"``.
"""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    import torch

    from .harness import DTYPES, RESULT_PREFIX, is_oom, load_registry, measure_in_process

    result = {"status": "ok"}
    try:
        op = load_registry(spec["registry"])[spec["op"]]
        provider = op.provider(spec["provider"])
        result.update(
            measure_in_process(
                op, provider, spec["shape"], DTYPES[spec["dtype"]], torch.device(spec["device"]),
                int(spec["repeats"]), int(spec["warmup"]), measure_memory=True,
            )
        )
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a row
        result = {
            "status": "oom" if is_oom(exc) else "error",
            "note": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
        }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
