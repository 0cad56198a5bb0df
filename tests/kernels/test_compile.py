"""Every Triton kernel, at every config its launcher can choose, compiles to cubin for sm_80
(A100) and sm_90 (H100), and to an hsaco code object for gfx942 (MI300X) and gfx950 (MI355X) --
no GPU needed, no register spills, no scratch. Each module in ``alignkernels.kernels`` lists its
launchable configs in ``COMPILE_CASES``; ``python -m bench.kernel_report`` compiles them all in one
subprocess (outside the interpreter) and each case is reported as its own test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from bench.kernel_report import AMD_TARGETS, iter_compile_cases  # noqa: E402

TARGETS = ("sm80", "sm90", *AMD_TARGETS)
CASE_IDS = [case_id for case_id, _ in iter_compile_cases()]


@pytest.fixture(scope="module")
def compile_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernel_report", *TARGETS],
        capture_output=True, text=True, env=env, timeout=1800, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_module_declares_compile_cases():
    import importlib
    import pkgutil

    import alignkernels.kernels as kernels_pkg

    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"alignkernels.kernels.{info.name}")
        public_kernels = {
            name for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "fn")
        }
        covered = {case["kernel"].__name__ for case in getattr(module, "COMPILE_CASES", ())}
        assert public_kernels <= covered, f"{info.name}: kernels without COMPILE_CASES: {public_kernels - covered}"


def test_compile_cases_exist():
    assert any(case_id.startswith("token_logprobs-") for case_id in CASE_IDS)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_compiles_to_cubin(compile_results, case_id, target):
    """cubin for sm_80 / sm_90, hsaco for gfx942 / gfx950 (the ids keep the name they always had)."""
    result = compile_results[f"{case_id}@{target}"]
    assert result["ok"], result["error"]
    assert result["binary_bytes"] > 0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_config_does_not_spill(compile_results, case_id, target):
    """Register spills go to local memory (NVIDIA) or scratch (AMD): a config the launcher can choose
    must have none. On AMD, VGPR spills go to scratch; SGPR spills go to free VGPR lanes
    (``v_writelane``), not to memory, so they are reported (``sgpr_spills``) but allowed."""
    result = compile_results[f"{case_id}@{target}"]
    if not result["ok"]:
        pytest.fail(f"did not compile: {result['error']}")
    assert result["registers"] > 0
    assert result["local_bytes"] == 0, f"{result['local_bytes']} bytes of local memory / scratch (spills) per thread"
    if target in AMD_TARGETS:
        assert result["vgpr_spills"] == 0, f"{result['vgpr_spills']} VGPRs spilled to scratch"
        assert result["waves_per_simd"] > 0, "the config cannot even fit one wavefront per SIMD"
    else:
        assert result["occupancy"] > 0, "the config cannot even fit one block per SM"
