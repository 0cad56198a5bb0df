"""``dpo_loss`` pinned against OpenRLHF's ``DPOLoss(beta, label_smoothing, ipo)`` in fp64: the
sigmoid loss with cDPO label smoothing (``cdpo=True``; TRL 1.16 ignores ``label_smoothing`` there),
and IPO (OpenRLHF's has no length normalisation: ours with lengths 1). Values, gradients, rewards.
Skipped without OpenRLHF."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.dpo import dpo_loss

CLOSE = dict(rtol=1e-12, atol=1e-14)


def _pairs(seed=0, B=9):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(B, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    return pc, pr, rc, rr


def _both(openrlhf_models, ours_kw, theirs_kw, seed=0):
    loss_mod, _ = openrlhf_models
    pc, pr, rc, rr = _pairs(seed)
    a = [t.clone().requires_grad_(True) for t in (pc, pr)]
    b = [t.clone().requires_grad_(True) for t in (pc, pr)]
    ours, metrics = dpo_loss(a[0], a[1], rc, rr, **ours_kw)
    theirs, chosen_rewards, rejected_rewards = loss_mod.DPOLoss(**theirs_kw)(b[0], b[1], rc, rr)
    torch.testing.assert_close(ours, theirs, **CLOSE)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **CLOSE)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), **CLOSE)
    ours.backward()
    theirs.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **CLOSE)
    return ours


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_cdpo_matches_openrlhf_dpo_loss(openrlhf_models, label_smoothing, beta):
    _both(openrlhf_models, dict(beta=beta, label_smoothing=label_smoothing, cdpo=True),
          dict(beta=beta, label_smoothing=label_smoothing))  # fmt: skip


def test_cdpo_is_opt_in(openrlhf_models):
    """Without ``cdpo`` the sigmoid loss ignores ``label_smoothing`` (TRL 1.16): it differs from
    OpenRLHF's smoothed loss, which it equals at ε = 0."""
    pc, pr, rc, rr = _pairs(1)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.3)
    smoothed = _both(openrlhf_models, dict(beta=0.2, label_smoothing=0.3, cdpo=True),
                     dict(beta=0.2, label_smoothing=0.3), seed=1)  # fmt: skip
    assert abs(float(plain - smoothed)) > 1e-3
    _both(openrlhf_models, dict(beta=0.2, label_smoothing=0.3), dict(beta=0.2, label_smoothing=0.0), seed=1)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_openrlhf_dpo_loss_with_unit_lengths(openrlhf_models, beta):
    ones = torch.ones(9, dtype=torch.float64)
    _both(openrlhf_models, dict(beta=beta, loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones),
          dict(beta=beta, ipo=True))  # fmt: skip
