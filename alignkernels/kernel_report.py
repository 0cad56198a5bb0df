"""Static performance evidence for the Triton kernels, without a GPU.

For every launch config a kernel module declares in ``COMPILE_CASES``, compile to cubin for a
GPU target with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` and read the resource
usage from the cubin with the ``cuobjdump`` bundled in Triton: registers per thread, local memory
(register spills land there), stack and shared memory. From those and the architecture's limits,
the theoretical occupancy per SM. Plus an analytic bytes/FLOPs model of the public ops, turned
into roofline lower bounds on A100 and H100.

Must run in a process where ``TRITON_INTERPRET`` is unset (interpreted kernels can't be lowered).
"""
from __future__ import annotations

import importlib
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
# Stated peaks used for roofline lower bounds (dense bf16 tensor-core FLOP/s, HBM bytes/s).
DEVICE_PEAKS = {
    "A100-SXM-80GB": dict(bytes_per_s=2.039e12, bf16_flops=312e12),
    "H100-SXM-80GB": dict(bytes_per_s=3.35e12, bf16_flops=989e12),
}


def iter_compile_cases():
    """Yield ``(case_id, case)`` for every ``COMPILE_CASES`` entry in ``alignkernels.kernels``."""
    import alignkernels.kernels as kernels_pkg

    for info in sorted(pkgutil.iter_modules(kernels_pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"alignkernels.kernels.{info.name}")
        for i, case in enumerate(getattr(module, "COMPILE_CASES", ())):
            yield f"{info.name}-{case['kernel'].__name__}-{i}", case


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


def compile_case(case: dict, cc: int) -> dict:
    """Compile one case for ``sm_<cc>`` and report its resources. Never raises: errors are data."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = case["kernel"]
    kernel = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    try:
        src = ASTSource(fn=kernel, signature=case["signature"], constexprs=case.get("constexprs", {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": case["num_warps"]})
    except Exception as exc:  # reported per case
        return dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    cubin = compiled.asm["cubin"]
    ok = isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF" and compiled.metadata.num_warps == case["num_warps"]
    usage = cubin_resource_usage(cubin)
    shared = int(compiled.metadata.shared) + usage.get("shared", 0)
    report = dict(
        ok=ok,
        error=None if ok else "not an ELF cubin with the requested warps",
        cubin_bytes=len(cubin),
        num_warps=case["num_warps"],
        registers=usage.get("reg", -1),
        local_bytes=usage.get("local", -1),
        stack_bytes=usage.get("stack", -1),
        shared_bytes=shared,
        constexprs={k: v for k, v in case.get("constexprs", {}).items()},
    )
    report.update(occupancy(report["registers"], case["num_warps"], shared, cc))
    return report


# ---------------------------------------------------------------------------------------------
# Analytic cost model (bytes moved, FLOPs) and roofline lower bounds
# ---------------------------------------------------------------------------------------------
def token_logprobs_cost(N: int, V: int, elem_bytes: int = 2) -> dict:
    """Forward reads the logits once; backward reads them and writes the gradient once.
    Per-row scalars (label, logp, lse, entropy, upstream grads) are O(N) and counted too."""
    row_bytes = 8 + 4 * 3
    fwd = N * V * elem_bytes + N * row_bytes
    bwd = 2 * N * V * elem_bytes + N * (8 + 4 * 4)
    return dict(fwd_bytes=fwd, fwd_bwd_bytes=fwd + bwd, fwd_flops=5 * N * V, fwd_bwd_flops=12 * N * V)


def linear_logprobs_cost(N: int, H: int, V: int, elem_bytes: int = 2) -> dict:
    """Forward: one [N,H]x[H,V] GEMM (2NHV FLOPs); backward recomputes it and runs two more
    (grad_hidden, grad_weight): 6NHV more. Bytes: hidden and weight read once per pass (the
    logits tile never reaches HBM in an ideal kernel), gradients written once."""
    inputs = (N * H + V * H) * elem_bytes
    return dict(
        fwd_bytes=inputs, fwd_bwd_bytes=3 * inputs + (N * H + V * H) * elem_bytes,
        fwd_flops=2 * N * H * V, fwd_bwd_flops=8 * N * H * V,
    )  # fmt: skip


def roofline_seconds(cost: dict, device: str, phase: str = "fwd_bwd") -> float:
    """Lower bound on time: max(bytes / bandwidth, FLOPs / bf16 peak)."""
    peak = DEVICE_PEAKS[device]
    return max(cost[f"{phase}_bytes"] / peak["bytes_per_s"], cost[f"{phase}_flops"] / peak["bf16_flops"])


def _compile_job(job):
    case_id, cc = job
    return f"{case_id}@sm{cc}", compile_case(dict(iter_compile_cases())[case_id], cc)


def compile_all(ccs=(80, 90), workers=None) -> dict:
    """``{"<case_id>@sm<cc>": report}`` for every case, compiled in a process pool."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(case_id, cc) for case_id, _ in iter_compile_cases() for cc in ccs]
    with ProcessPoolExecutor(max(1, min(len(jobs), workers or os.cpu_count() or 1))) as pool:
        return dict(pool.map(_compile_job, jobs, chunksize=4))


if __name__ == "__main__":
    # python -m alignkernels.kernel_report [80 90] -> JSON on stdout. TRITON_INTERPRET must be unset
    # before any kernel module is imported (they are imported lazily, inside iter_compile_cases).
    import json
    import sys

    os.environ.pop("TRITON_INTERPRET", None)
    json.dump(compile_all([int(a) for a in sys.argv[1:]] or [80, 90]), sys.stdout)
