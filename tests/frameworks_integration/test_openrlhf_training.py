"""OpenRLHF 0.11.2's own training step, stock vs ``alignkernels.integrations.openrlhf`` (CPU, fp32).

``ActorPPOTrainer.training_step`` (``openrlhf/trainer/ray/ppo_actor.py``) on OpenRLHF's ``Actor``, 3
steps from the same weights: stock, ``apply()`` (the log-prob / entropy swap) and
``apply(fused_forward=True)`` (no logits), for a tiny Qwen2 (untied head, temperature 0.7, entropy
bonus, k3 KL loss) with a plain torch optimizer and in a real ``DeepSpeedEngine`` (ZeRO-2, one gloo
rank, as OpenRLHF's strategy sets ``actor.model``), and a tiny Llama (tied head, no entropy,
sequence-mean aggregation) under ZeRO-3 (partitioned parameters). Each run happens in a process of its
own (``openrlhf_training_worker.py``; the stand-ins for ``flash_attn``, ``vllm`` and the DeepSpeed
strategy's CUDA set-up are in ``openrlhf_stand_ins.py``). Compared per step: the losses, KL and
gradient norm the step returns, the action log-probs and entropy of the actor's forward; after 3
steps: every parameter. And a dispatch-mode watch over one whole fused training step: no ``[N, V]``
tensor.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import max_rel_error

pytest.importorskip("openrlhf")
pytest.importorskip("deepspeed")  # openrlhf/trainer/ray/ppo_actor.py imports it
pytest.importorskip("ray")

WORKER = Path(__file__).with_name("openrlhf_training_worker.py")
TOL = 2e-6


@pytest.fixture(scope="module", params=["qwen2_untied_entropy_kl", "qwen2_deepspeed_zero2", "llama_tied_no_entropy_zero3"])
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("openrlhf") / f"{request.param}.pt"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), request.param], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["swap", "fused"])
def test_training_steps_match_stock(runs, case):
    stock, ours = runs["stock"], runs[case]
    entropy = runs["config"]["entropy_coef"] is not None
    # the patched path ran: one log-prob (+ one entropy) call per step, or one fused forward per step
    assert ours["adapter_calls"] == (3 * (2 if entropy else 1) if case == "swap" else 3)
    assert ours["forward_is_fused"] == (case == "fused")
    for step, (s, o) in enumerate(zip(stock["steps"], ours["steps"], strict=True)):
        assert s["metrics"].keys() == o["metrics"].keys()
        assert ("entropy_loss" in s["metrics"]) == entropy
        for name, value in s["metrics"].items():
            assert abs(o["metrics"][name] - value) <= TOL * max(abs(value), 1.0), (step, name, o["metrics"][name], value)
        assert max_rel_error(o["logp"], s["logp"], floor=1.0) <= TOL, step
        if entropy:
            assert max_rel_error(o["entropy"], s["entropy"], floor=1.0) <= TOL, step
        else:
            assert s["entropy"] is None and o["entropy"] is None
    for name, value in stock["params"].items():
        assert max_rel_error(ours["params"][name], value) <= TOL, name
    # the steps moved the weights (so the comparison above compares training, not the initial state)
    assert max(max_rel_error(value, stock["initial"][name]) for name, value in stock["params"].items()) > 1e-2


@pytest.mark.slow
def test_fused_training_step_never_holds_token_by_vocab_tensors(runs):
    """A whole ``training_step`` (forward, PolicyLoss, KL / entropy terms, backward, optimizer step) at
    N = 160 tokens, V = 97: no ATen op returns a tensor with the vocabulary as a dimension and N / 4
    rows under ``apply(fused_forward=True, chunk_size=16)``; the same watch sees the logits in stock."""
    found = runs["token_by_vocab"]
    assert any(shape[-1] == 97 and len(shape) >= 2 for _, shape in found["stock"])
    assert not found["fused"], found["fused"][:5]
