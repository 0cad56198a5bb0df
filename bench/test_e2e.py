"""``python -m bench --e2e``'s step benchmark: it calls TRL and ``alignkernels.integrations.trl.apply()``
from the bench, and every mode trains to the same loss."""
import math

import pytest
import torch

pytest.importorskip("trl")

import alignkernels.integrations.trl as ak_trl  # noqa: E402
from bench.e2e import E2E_MODES, e2e_step_benchmark  # noqa: E402


def test_e2e_step_benchmark_runs_and_modes_agree():
    kwargs = dict(
        batch_size=1, seq_len=24, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=300, steps=1, warmup=0, gradient_checkpointing=False,
    )  # fmt: skip
    for trainer in ("grpo", "dpo"):
        rows = e2e_step_benchmark(trainer, **kwargs)
        assert [r["mode"] for r in rows] == list(E2E_MODES)
        losses = [r["loss"] for r in rows]
        assert all(math.isfinite(x) for x in losses)
        assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0]))
        assert all(r["step_time_s"] > 0 for r in rows)
    assert not ak_trl.is_applied()
    with pytest.raises(ValueError, match="trainer"):
        e2e_step_benchmark("ppo")


def test_e2e_step_benchmark_refuses_an_applied_patch():
    with ak_trl.apply():
        with pytest.raises(RuntimeError, match="remove"):
            e2e_step_benchmark("grpo", seq_len=8, vocab_size=50)
    assert not ak_trl.is_applied()


@pytest.mark.gpu
def test_e2e_step_benchmark_cuda_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows = e2e_step_benchmark("grpo", seq_len=4096, num_hidden_layers=1, steps=2)
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["alignkernels"]["peak_memory_bytes"] < by_mode["eager"]["peak_memory_bytes"]


_VERL_STEP = """
import json, sys
from bench.e2e_verl import VERL_MODES, verl_step_benchmark
kw = dict(seq_len=12, batch_size=2, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
          num_attention_heads=2, num_key_value_heads=1, device="cpu", steps=1, warmup=1)
print(json.dumps([verl_step_benchmark(m, **kw) for m in VERL_MODES]))
"""


@pytest.mark.slow
def test_e2e_verl_step_runs_and_modes_agree():
    """The verl engine step of ``python -m bench --e2e`` (own process: verl's platform and process group
    are global): stock, patched and patched-fused train to the same loss."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("verl")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", _VERL_STEP], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["mode"] for r in rows] == ["verl", "alignkernels", "alignkernels_fused"]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0]))
    assert all(r["step_time_s"] > 0 and r["trainer"] == "verl" for r in rows)
