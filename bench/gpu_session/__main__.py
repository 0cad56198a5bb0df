"""``python -m bench.gpu_session PHASE --work DIR [--dry-run] [--deadline EPOCH]``: one phase of
``bash bench/gpu_session.sh`` (see the package docstring)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __doc__ as PACKAGE_DOC
from .benchmarks import phase_bench
from .build import phase_build
from .env import phase_env
from .gpu_tests import phase_tests
from .summary import phase_summary
from .tune import phase_tune

PHASES = {"env": phase_env, "build": phase_build, "tests": phase_tests, "bench": phase_bench, "tune": phase_tune,
          "summary": phase_summary}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=PACKAGE_DOC.splitlines()[0])
    p.add_argument("phase", choices=sorted(PHASES))
    p.add_argument("--work", type=Path, required=True, help="scratch folder shared by the phases")
    p.add_argument("--out", type=Path, help="summary: output folder (default bench/results/<device>/)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the phase must end")
    p.add_argument("--per-test-timeout", type=int, default=60)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.deadline is None:
        args.deadline = time.time() + 600
    return PHASES[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
