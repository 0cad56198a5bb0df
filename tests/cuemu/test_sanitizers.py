"""Opt-in: the emulated kernel cases under AddressSanitizer + UBSan and under ThreadSanitizer.

``CUEMU_SANITIZERS=1 python -m pytest tests/cuemu/test_sanitizers.py`` re-runs the emulated
token_logprobs / gather_last / GAE cases in a subprocess with an instrumented build and the
sanitizer runtime preloaded (Python itself is not instrumented). Slow (minutes), so not in CI.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cuemu import emulator

ENABLED = os.environ.get("CUEMU_SANITIZERS", "") not in ("", "0")
RUNTIMES = {"asan": "libasan.so", "tsan": "libtsan.so"}


@pytest.mark.skipif(not ENABLED, reason="opt-in: set CUEMU_SANITIZERS=1 (takes minutes)")
@pytest.mark.parametrize("sanitizer", ["asan", "tsan"])
def test_emulated_cases_are_clean_under_sanitizer(sanitizer):
    tc = emulator.toolchain("")
    runtime = subprocess.run([tc.cxx, f"-print-file-name={RUNTIMES[sanitizer]}"], capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
    env = dict(os.environ, CUEMU_SANITIZE=sanitizer, LD_PRELOAD=runtime,
               ASAN_OPTIONS="detect_leaks=0:handle_segv=0", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0")  # fmt: skip
    if sanitizer == "tsan":
        env["CUEMU_SCHEDULE"] = "free"  # all threads of a block at once: races are real
        env["OMP_NUM_THREADS"] = "1"  # torch's OpenMP (libgomp) is not instrumented: false reports
    tests = [str(emulator.HERE / "test_token_logprobs.py"), str(emulator.HERE / "test_gather_last_gae.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          env=env, capture_output=True, text=True, cwd=emulator.REPO)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
