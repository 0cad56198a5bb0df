"""Compile every ``COMPILE_CASES`` entry of ``alignkernels.kernels`` to cubin, for the given
compute capabilities, and print one JSON object {case_id: {"ok", "error", "cubin_bytes"}}.

Runs in its own process with ``TRITON_INTERPRET`` unset: under the interpreter, ``@triton.jit``
returns interpreter objects that cannot be lowered for a GPU (nested jit helpers break).
Usage: python tests/compile_worker.py 80 90
"""
import importlib
import json
import os
import pkgutil
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)


def iter_cases():
    import alignkernels.kernels as kernels_pkg

    for info in sorted(pkgutil.iter_modules(kernels_pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"alignkernels.kernels.{info.name}")
        for i, case in enumerate(getattr(module, "COMPILE_CASES", ())):
            yield f"{info.name}-{case['kernel'].__name__}-{i}", case


def compile_one(job):
    case_id, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = dict(iter_cases())[case_id]
    try:
        src = ASTSource(fn=case["kernel"], signature=case["signature"], constexprs=case.get("constexprs", {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": case["num_warps"]})
        cubin = compiled.asm["cubin"]
        ok = isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF" and compiled.metadata.num_warps == case["num_warps"]
        return f"{case_id}@sm{cc}", {"ok": ok, "error": None if ok else "not an ELF cubin", "cubin_bytes": len(cubin)}
    except Exception as exc:  # reported per case by the test
        return f"{case_id}@sm{cc}", {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "cubin_bytes": 0}


def main(ccs):
    jobs = [(case_id, cc) for case_id, _ in iter_cases() for cc in ccs]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        results = dict(pool.map(compile_one, jobs, chunksize=4))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
