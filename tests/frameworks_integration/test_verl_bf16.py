"""verl's bf16 head (CPU bf16 autocast, as the FSDP engine runs ``prepare_model_outputs`` under
``torch.autocast(dtype=bf16)``): alignkernels' replacements against fp64 of the *same* bf16 inputs, next
to verl's stock functions. Errors in nats (``max_rel_error(..., floor=1)``); the numbers at realistic
sizes are in ``docs/INTEGRATION.md`` ("verl drop-in").
"""
from __future__ import annotations

import pytest
import torch

from helpers import max_rel_error

pytest.importorskip("verl")

import verl.utils.experimental.torch_functional as verl_exp  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402

import alignkernels.integrations.verl as ak_verl  # noqa: E402

STOCK = {"logp": verl_F.logprobs_from_logits, "entropy": verl_F.entropy_from_logits}
TOL = 1e-5  # ours: fp32 sums over the bf16 inputs



def _fp64(z64, labels):
    ls = torch.log_softmax(z64, -1)
    return ls.gather(-1, labels[:, None])[:, 0], -(ls.exp() * ls).sum(-1)


def _inputs(N=48, H=64, V=700, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * (std / H**0.5)).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g)


def test_bf16_logits_path_under_autocast_is_fp32_exact():
    """logp and entropy from bf16 logits inside a bf16 autocast region: ours within 1e-5 of fp64 of those
    logits, gradient too; verl's stock functions (bf16 log-softmax) are the ones off."""
    hidden, weight, labels = _inputs()
    with torch.autocast("cpu", torch.bfloat16):
        logits = (hidden @ weight.T).detach().requires_grad_()  # bf16, as the lm_head's under autocast
        stock = STOCK["logp"](logits, labels), STOCK["entropy"](logits)
        ak_verl.apply()
        ours = verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits)
    z64 = logits.detach().double().requires_grad_()
    want = _fp64(z64, labels)
    errs = {}
    for i, name in enumerate(("logp", "entropy")):
        errs[name] = (max_rel_error(ours[i], want[i], floor=1), max_rel_error(stock[i], want[i], floor=1))
        assert ours[i].dtype == torch.float32
        assert errs[name][0] <= TOL, (name, errs[name])
        assert errs[name][0] <= errs[name][1], (name, errs[name])
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(((ours[0] + 0.3 * ours[1]) * up.float()).sum(), [logits])
    (g_want,) = torch.autograd.grad(((want[0] + 0.3 * want[1]) * up).sum(), [z64])
    # the gradient is returned in the logits' dtype (bf16): its rounding, 2^-8 relative, is the bound
    assert max_rel_error(g_ours, g_want) <= 2**-8


def test_bf16_fused_head_under_autocast_is_fp32_exact():
    """``FusedLinearForPPO`` with bf16 autocast (fp32 master weights): ours within 1e-5 of fp64 of the same
    bf16 operands (log-prob, entropy, Σπ²); verl's stock module rounds its logits tile to bf16."""
    hidden, weight, labels = _inputs(seed=2)
    with torch.autocast("cpu", torch.bfloat16):
        s_lp, s_ent = verl_exp.FusedLinearForPPO(chunk_size=16)(hidden, weight, labels, 0.7)
        ak_verl.apply()
        lp, ent, spsq = verl_exp.FusedLinearForPPO(chunk_size=16)(hidden, weight, labels, 0.7,
                                                                  return_sum_pi_squared=True)  # fmt: skip
    z64 = (hidden.detach().bfloat16().double() @ weight.detach().bfloat16().double().T) / 0.7
    want_lp, want_ent = _fp64(z64, labels)
    assert max_rel_error(lp, want_lp, floor=1) <= TOL
    assert max_rel_error(ent, want_ent, floor=1) <= TOL
    assert max_rel_error(spsq, torch.softmax(z64, -1).pow(2).sum(-1)) <= TOL
    assert max_rel_error(lp, want_lp, floor=1) <= max_rel_error(s_lp, want_lp, floor=1)
    assert max_rel_error(ent, want_ent, floor=1) <= max_rel_error(s_ent, want_ent, floor=1)
