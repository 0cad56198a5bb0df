"""Peak extra memory of the chunked torch backend vs eager log_softmax + gather, on CPU.

N = 2048, V = 131072, fp32: the logits are 1 GiB. Each measurement runs in a fresh process
(``memory_worker.py``) so high-water marks do not leak between cases.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("memory_worker.py")


def measure(case, provider, mode):
    proc = subprocess.run(
        [sys.executable, str(WORKER), case, provider, mode], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_token_logprobs_torch_backend_memory_vs_eager(mode):
    ours = measure("token_logprobs", "torch", mode)
    eager = measure("token_logprobs", "eager", mode)
    gib = 2**30
    ratio = eager["extra_bytes"] / max(ours["extra_bytes"], 1)
    print(
        f"\n[token_logprobs {mode}] N=2048 V=131072 fp32 (logits {ours['logits_bytes'] / gib:.2f} GiB): "
        f"extra memory torch-chunked {ours['extra_bytes'] / 2**20:.0f} MiB vs eager "
        f"{eager['extra_bytes'] / 2**20:.0f} MiB -> {ratio:.1f}x less"
        + (" (gradient itself excluded)" if mode == "fwd_bwd" else "")
    )
    # Eager holds at least one [N, V] fp32 temporary (log-softmax); ours O(chunk x V).
    assert eager["extra_bytes"] > 0.9 * ours["logits_bytes"]
    assert ours["extra_bytes"] < 0.25 * ours["logits_bytes"]
    assert ratio > 10
