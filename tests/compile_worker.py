"""Compile every ``COMPILE_CASES`` entry of ``alignkernels.kernels`` for the given compute
capabilities and print one JSON object ``{"<case_id>@sm<cc>": report}`` (see
``alignkernels.kernel_report.compile_case``).

Runs in its own process with ``TRITON_INTERPRET`` unset: under the interpreter, ``@triton.jit``
returns interpreter objects that cannot be lowered for a GPU (nested jit helpers break).
Usage: python tests/compile_worker.py 80 90
"""
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from alignkernels.kernel_report import compile_case, iter_compile_cases


def _run(job):
    case_id, cc = job
    return f"{case_id}@sm{cc}", compile_case(dict(iter_compile_cases())[case_id], cc)


def main(ccs):
    jobs = [(case_id, cc) for case_id, _ in iter_compile_cases() for cc in ccs]
    with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = dict(pool.map(_run, jobs, chunksize=4))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    # Before any kernel module is imported (kernel_report imports them lazily).
    os.environ.pop("TRITON_INTERPRET", None)
    main([int(a) for a in sys.argv[1:]] or [80, 90])
