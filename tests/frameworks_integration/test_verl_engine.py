"""verl's own FSDP2 training engine, stock vs ``alignkernels.integrations.verl.apply()``, 3 steps (fp32, CPU).

The engine runs in a spawned worker (``verl_engine_worker.py``: CPU platform registered through verl's
``PlatformRegistry``, one-rank gloo group, tiny Qwen2 from a config, ``use_torch_compile=True``) so that
verl's global state stays out of this process. Per case and step: the loss, the per-token log-probs and
entropies the engine returns, and after the last step every parameter, patched vs stock within 2e-6
relative (plain SGD, so parameters differ only through the gradients). The untied fused case has no
stock fused run to compare with (verl's fails on the FSDP2-sharded head, checked): verl's logits path
is its reference. On the logits path the patched engine makes one ``token_logprobs`` pass per
micro-batch for log-prob and entropy (counted by a spy; verl's method makes two). Σπ²
(``calculate_sum_pi_squared``): on the fused path, which verl refuses (checked), against verl's
logits-path ``calculate_sum_pi_squared_from_logits``; on the padded logits path, verl's own beside the one pass.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import max_rel_error

pytest.importorskip("verl")
pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import verl_engine_worker as worker  # noqa: E402

TOL = 2e-6
TOKENS = sum(worker.LENGTHS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl_engine")
    env = dict(os.environ, VERL_PLATFORM="cpu", TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "verl_engine_worker.py"), str(out), *worker.CASES],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = {}
    for name in worker.CASES:
        err = out / f"{name}.err"
        if err.exists():
            results[name] = err.read_text()
        elif (out / f"{name}.pt").exists():
            results[name] = torch.load(out / f"{name}.pt")
        else:
            results[name] = f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return results


def _case(runs, name):
    result = runs[name]
    assert not isinstance(result, str), result
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.CASES))
def test_engine_three_steps_patched_matches_stock(runs, name):
    result = _case(runs, name)
    stock, patched = result["stock"], result["patched"]
    case = worker.CASES[name]
    # every forward went through alignkernels: per micro-batch one fused head call, or one token_logprobs
    # pass for log-probs and entropy together (verl's method: logprobs_from_logits + entropy_from_logits)
    micro_batches = worker.STEPS * len(worker.LENGTHS) // 2
    assert result["adapter_calls"] == micro_batches
    assert result["token_logprobs_calls"] == (0 if case.fused else micro_batches)
    for step in range(worker.STEPS):
        for key in ("log_probs", "entropy") + (("sum_pi_squared",) if case.sum_pi_squared else ()):
            assert patched[key][step].shape == (TOKENS,)
            err = max_rel_error(patched[key][step].double(), stock[key][step].double())
            assert err <= TOL, (key, step, err)
        err = max_rel_error(patched["loss"][step].double(), stock["loss"][step].double())
        assert err <= TOL, ("loss", step, err)
    moved = 0.0
    for pname, want in stock["params"].items():
        err = max_rel_error(patched["params"][pname].double(), want.double())
        assert err <= TOL, (pname, err)
        moved = max(moved, (want - stock["initial"][pname]).abs().max().item())
    assert moved > 1e-2  # the three steps trained the model


@pytest.mark.slow
def test_engine_stock_fused_fails_on_untied_head_ours_runs(runs):
    """verl's ``FusedLinearForPPO`` gets the FSDP2-sharded untied lm_head as a DTensor and fails; the
    patched engine gathers it and trains (compared above with verl's logits path)."""
    result = _case(runs, "fused_untied")
    assert "DTensor" in result["stock_fused_error"], result["stock_fused_error"]


@pytest.mark.slow
def test_engine_sum_pi_squared_on_fused_path_verl_refuses_ours_runs(runs):
    """verl's engine refuses ``calculate_sum_pi_squared`` with ``use_fused_kernels``; patched, the fused
    head gives ``model_output["sum_pi_squared"]`` (compared above with verl's logits path), a probability
    mass in (0, 1] that varies from token to token."""
    result = _case(runs, "sum_pi_squared_fused")
    assert "calculate_sum_pi_squared=True is not supported" in result["stock_fused_error"], result["stock_fused_error"]
    for value in result["patched"]["sum_pi_squared"]:
        assert value.shape == (TOKENS,) and value.dtype == torch.float32
        assert bool((value > 0).all()) and bool((value <= 1 + 1e-6).all())
        assert value.max() - value.min() > 0.1
