"""The swapped ``FSDPEngineWithLMHead.prepare_model_outputs`` (``alignkernels/integrations/verl_engine.py``)
against verl 0.9.1's own method, called directly on model outputs (no model, no process group): both
layouts (remove-padding with a static pad to strip, padded), per-token temperatures, with and without
entropy and Σπ²; values and gradients w.r.t. the logits in fp32, and the number of ``token_logprobs``
passes (one). The three-step engine runs are in ``test_verl_engine.py``.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import max_rel_error

pytest.importorskip("verl")

import verl.utils.torch_functional as verl_F  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402

import alignkernels.integrations.verl as ak_verl  # noqa: E402

TOL = 2e-6
V = 67
LENGTHS = (5, 9, 3)
STATIC_PAD = 2  # verl's pad_to_length bucket pad at the tail of the packed row



def _engine(entropy_checkpointing=False):
    """What ``prepare_model_outputs`` reads of the engine (sequence parallel off)."""
    engine = SimpleNamespace(
        use_ulysses_sp=False,
        engine_config=SimpleNamespace(entropy_checkpointing=entropy_checkpointing,
                                      entropy_from_logits_with_chunking=False),  # fmt: skip
        compute_entropy_from_logits=verl_F.entropy_from_logits,
    )
    engine._gather_and_unpad_packed = lambda t, pad: FSDPEngineWithLMHead._gather_and_unpad_packed(engine, t, pad)
    return engine


def _inputs(remove_padding, entropy, sum_pi_squared, seed=0):
    g = torch.Generator().manual_seed(seed)
    nnz, B, L = sum(LENGTHS), len(LENGTHS), max(LENGTHS)
    ids = [torch.randint(0, V, (n,), generator=g) for n in LENGTHS]
    temps = torch.tensor([0.7, 1.3, 0.9])
    batch = tu.get_tensordict(
        {"input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged)},
        non_tensor_dict={"use_remove_padding": remove_padding, "calculate_entropy": entropy,
                         "calculate_sum_pi_squared": sum_pi_squared},  # fmt: skip
    )
    rolled = torch.roll(torch.cat(ids), -1, 0)
    if remove_padding:
        logits = torch.randn(1, nnz + STATIC_PAD, V, generator=g) * 3
        per_token = torch.cat([t.expand(n) for t, n in zip(temps, LENGTHS)] + [torch.ones(STATIC_PAD)])
        labels = torch.cat([rolled, torch.zeros(STATIC_PAD, dtype=torch.long)])
        args = {"temperature_is_one": False, "input_ids_rmpad_rolled": labels, "temperature_rmpad": per_token,
                "pad_size": STATIC_PAD}  # fmt: skip
    else:
        logits = torch.randn(B, L, V, generator=g) * 3
        args = {"temperature_is_one": False, "input_ids_rmpad_rolled": rolled, "temperature": temps}
    return batch, args, logits.requires_grad_()


def _run(method, engine, batch, args, logits, grad=True):
    out = method(engine, SimpleNamespace(logits=logits), args, batch, None)
    values = {k: v.values() for k, v in out.items()}
    if not grad:  # verl's reentrant entropy checkpoint refuses autograd.grad
        return {k: v.detach() for k, v in values.items()}, None
    g = torch.Generator().manual_seed(7)
    total = sum((v * torch.randn(v.shape, generator=g)).sum() for v in values.values())
    (grad,) = torch.autograd.grad(total, logits)
    return {k: v.detach() for k, v in values.items()}, grad


@pytest.mark.parametrize("sum_pi_squared", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("remove_padding", [True, False])
def test_one_pass_matches_verl_method(remove_padding, entropy, sum_pi_squared):
    stock_method = FSDPEngineWithLMHead.prepare_model_outputs
    batch, args, logits = _inputs(remove_padding, entropy, sum_pi_squared)
    want, want_grad = _run(stock_method, _engine(), batch, args, logits)
    ak_verl.apply()
    assert FSDPEngineWithLMHead.prepare_model_outputs is not stock_method
    got, got_grad = _run(FSDPEngineWithLMHead.prepare_model_outputs, _engine(), batch, args, logits)
    assert ak_verl.adapter_calls() == 1  # one token_logprobs pass for log-prob (and entropy)
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape == (sum(LENGTHS),)
        assert max_rel_error(got[key], want[key]) <= TOL, key
    assert max_rel_error(got_grad, want_grad) <= TOL


def test_entropy_checkpointing_runs_verl_method_on_the_logits_seams():
    """A setting the one pass does not reproduce runs verl's method (two passes, both on alignkernels)."""
    batch, args, logits = _inputs(True, True, False)
    want, _ = _run(FSDPEngineWithLMHead.prepare_model_outputs, _engine(True), batch, args, logits, grad=False)
    ak_verl.apply()
    engine = _engine(True)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits  # ours now, as an engine built after apply()
    got, _ = _run(FSDPEngineWithLMHead.prepare_model_outputs, engine, batch, args, logits, grad=False)
    assert ak_verl.adapter_calls() == 2
    for key in want:
        assert max_rel_error(got[key], want[key]) <= TOL, key
