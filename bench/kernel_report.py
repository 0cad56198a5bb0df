"""Static performance evidence for the Triton kernels, without a GPU.

For every launch config a kernel module declares in ``COMPILE_CASES``, compile for a GPU target and
read its resource usage:

- NVIDIA (``sm80``, ``sm90``): ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` to cubin; the
  ``cuobjdump`` bundled in Triton reads registers per thread, local memory (register spills land
  there), stack and shared memory; from those and the architecture's limits, the theoretical
  occupancy per SM.
- AMD (``gfx942`` = MI300X, ``gfx950`` = MI355X): ``GPUTarget("hip", arch, 64)`` (64-wide wavefronts)
  to an hsaco code object; the ``amdgcn`` assembly's metadata gives VGPRs / SGPRs, their spill counts
  and the scratch (private segment) bytes per work-item, and the compiler's waves-per-SIMD occupancy.

(The bytes/FLOPs model and rooflines live in ``bench.cost``.)

Must run in a process where ``TRITON_INTERPRET`` is unset (interpreted kernels can't be lowered).
It needs only Triton and the standard library: ``--kernels-only`` loads ``kernels/*.py`` as
``alignkernels.kernels`` without importing the ``alignkernels`` package (and so without torch), which
is how ``bench/test_triton_compat.py`` compiles every case with another Triton release in a
virtual environment that holds nothing else.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import tempfile

# Per-SM limits (CUDA occupancy calculator data). Shared memory: max configurable per SM.
ARCH_LIMITS = {
    80: dict(name="A100 (sm_80)", regs=65536, max_warps=64, max_blocks=32, smem=164 * 1024, reg_alloc_unit=256),
    90: dict(name="H100 (sm_90)", regs=65536, max_warps=64, max_blocks=32, smem=228 * 1024, reg_alloc_unit=256),
}
# Compile targets by name: (Triton backend, arch, threads per warp / wavefront).
TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64),
           "gfx950": ("hip", "gfx950", 64)}  # fmt: skip
AMD_TARGETS = ("gfx942", "gfx950")
KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


def load_kernels_without_package(kernels_dir: str = KERNELS_DIR):
    """Register ``kernels_dir`` as the package ``alignkernels.kernels`` under an empty
    ``alignkernels`` namespace, so its modules (which import only triton) load without the
    ``alignkernels`` package's ``__init__`` and its torch import."""
    import sys
    import types

    if "alignkernels.kernels" in sys.modules:
        return
    if "alignkernels" not in sys.modules:
        parent = types.ModuleType("alignkernels")
        parent.__path__ = []
        sys.modules["alignkernels"] = parent
    spec = importlib.util.spec_from_file_location(
        "alignkernels.kernels", os.path.join(kernels_dir, "__init__.py"), submodule_search_locations=[kernels_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["alignkernels.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["alignkernels"].kernels = module


def iter_compile_cases():
    """Yield ``(case_id, case)`` for every ``COMPILE_CASES`` entry in ``alignkernels.kernels``."""
    import alignkernels.kernels as kernels_pkg

    for info in sorted(pkgutil.iter_modules(kernels_pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"alignkernels.kernels.{info.name}")
        for i, case in enumerate(getattr(module, "COMPILE_CASES", ())):
            yield f"{info.name}-{kernel_name(case['kernel'])}-{i}", case


def kernel_name(kernel) -> str:
    return kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__


def _cuobjdump():
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def cubin_resource_usage(cubin: bytes) -> dict:
    """Registers, local (spill) memory, stack and static shared memory per thread, from a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def occupancy(regs_per_thread: int, num_warps: int, shared_bytes: int, cc: int) -> dict:
    """Theoretical active warps per SM (fraction of the maximum) and what limits it."""
    lim = ARCH_LIMITS[cc]
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    by_regs = lim["regs"] // (regs_per_warp * num_warps)
    by_warps = lim["max_warps"] // num_warps
    by_smem = lim["smem"] // shared_bytes if shared_bytes else lim["max_blocks"]
    blocks = min(by_regs, by_warps, by_smem, lim["max_blocks"])
    limiter = min(
        (("registers", by_regs), ("warps", by_warps), ("shared memory", by_smem), ("blocks", lim["max_blocks"])),
        key=lambda kv: kv[1],
    )[0]
    return dict(blocks_per_sm=blocks, occupancy=blocks * num_warps / lim["max_warps"], limiter=limiter)


def target_name(target) -> str:
    """``80`` / ``"80"`` / ``"sm80"`` -> ``"sm80"``; ``"gfx942"`` -> ``"gfx942"``."""
    name = str(target)
    name = f"sm{name}" if name.isdigit() else name
    if name not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {sorted(TARGETS)} (or a compute capability)")
    return name


def amdgcn_resource_usage(amdgcn: str) -> dict:
    """VGPRs, SGPRs, their spills, scratch bytes per work-item and waves per SIMD, from ``amdgcn`` text."""
    def field(pattern):
        m = re.search(pattern, amdgcn, re.M)
        return int(m.group(1)) if m else -1

    return dict(vgprs=field(r"^\s*\.vgpr_count:\s*(\d+)"), sgprs=field(r"^\s*\.sgpr_count:\s*(\d+)"),
                vgpr_spills=field(r"^\s*\.vgpr_spill_count:\s*(\d+)"),
                sgpr_spills=field(r"^\s*\.sgpr_spill_count:\s*(\d+)"),
                scratch_bytes=field(r"^\s*\.private_segment_fixed_size:\s*(\d+)"),
                waves_per_simd=field(r"^; Occupancy:\s*(\d+)"))  # fmt: skip


def compile_case(case: dict, target) -> dict:
    """Compile one case for ``target`` (see ``TARGETS``; an int is a CUDA compute capability) and
    report its resources. Never raises: errors are data."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    backend, arch, warp_size = TARGETS[target_name(target)]
    kernel = case["kernel"]
    kernel = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    try:
        src = ASTSource(fn=kernel, signature=case["signature"], constexprs=case.get("constexprs", {}))
        compiled = triton.compile(src, target=GPUTarget(backend, arch, warp_size),
                                  options={"num_warps": case["num_warps"]})  # fmt: skip
    except Exception as exc:  # reported per case
        return dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    binary = compiled.asm["hsaco" if backend == "hip" else "cubin"]
    ok = isinstance(binary, bytes) and binary[:4] == b"\x7fELF" and compiled.metadata.num_warps == case["num_warps"]
    report = dict(ok=ok, error=None if ok else f"not an ELF {'hsaco' if backend == 'hip' else 'cubin'} with the "
                  "requested warps", binary_bytes=len(binary), num_warps=case["num_warps"],
                  constexprs={k: v for k, v in case.get("constexprs", {}).items()})  # fmt: skip
    if backend == "hip":
        usage = amdgcn_resource_usage(compiled.asm["amdgcn"])
        report.update(usage, shared_bytes=int(compiled.metadata.shared), registers=usage["vgprs"],
                      local_bytes=usage["scratch_bytes"], spills=usage["vgpr_spills"] + usage["sgpr_spills"])  # fmt: skip
        return report
    usage = cubin_resource_usage(binary)
    shared = int(compiled.metadata.shared) + usage.get("shared", 0)
    report.update(cubin_bytes=len(binary), registers=usage.get("reg", -1), local_bytes=usage.get("local", -1),
                  stack_bytes=usage.get("stack", -1), shared_bytes=shared)  # fmt: skip
    report.update(occupancy(report["registers"], case["num_warps"], shared, arch))
    return report


def _compile_job(job):
    case_id, target = job
    return f"{case_id}@{target}", compile_case(dict(iter_compile_cases())[case_id], target)


def compile_all(targets=(80, 90), workers=None) -> dict:
    """``{"<case_id>@<target>": report}`` (``@sm80``, ``@gfx942``, ...) for every case, compiled in a
    process pool."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(case_id, target_name(t)) for case_id, _ in iter_compile_cases() for t in targets]
    with ProcessPoolExecutor(max(1, min(len(jobs), workers or os.cpu_count() or 1)), initializer=_pool_init) as pool:
        return dict(pool.map(_compile_job, jobs, chunksize=4))


def main(argv=None) -> int:
    """``python -m bench.kernel_report [--kernels-only] [TARGET ...]`` -> ``{case@target: report}`` JSON on
    stdout (targets: compute capabilities ``80`` ``90``, or ``sm80`` ``sm90`` ``gfx942`` ``gfx950``)."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=main.__doc__)
    p.add_argument("targets", nargs="*", type=target_name, default=["sm80", "sm90"],
                   help="compute capabilities or target names (default 80 90)")
    p.add_argument("--kernels-only", action="store_true",
                   help="load kernels/ without the alignkernels package (no torch needed)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    if args.kernels_only:
        load_kernels_without_package()
        os.environ["ALIGNKERNELS_KERNELS_ONLY"] = "1"  # pool workers load the same way
    json.dump(compile_all(args.targets, workers=args.workers), sys.stdout)
    return 0


def _pool_init():
    if os.environ.get("ALIGNKERNELS_KERNELS_ONLY") == "1":
        load_kernels_without_package()


if __name__ == "__main__":
    # TRITON_INTERPRET must be unset before any kernel module is imported (they are imported
    # lazily, inside iter_compile_cases).
    os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
