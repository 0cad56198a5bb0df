"""``verl_rollout_correction``'s metrics = every key and value of verl's
``compute_rollout_correction_and_rejection_mask`` (off-policy perplexities / KL / χ², IS spread,
per-option rejection statistics), fp64; and ``verl_policy_loss(loss_mode="bypass_mode")`` returns the
same diagnostics. Skipped without verl (``tests/frameworks/conftest.py``)."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.verl_policy import RolloutCorrection, VerlPolicyConfig, verl_policy_loss, verl_rollout_correction

CLOSE = dict(rtol=1e-7, atol=1e-9)  # verl's means divide by count + 1e-8

CASES = {
    "no_is_no_rs": RolloutCorrection(rollout_is=None),
    "seq_tis": RolloutCorrection(),
    "seq_tis_normalised": RolloutCorrection(rollout_is_batch_normalize=True, rollout_is_threshold=1.3),
    "token_tis": RolloutCorrection(rollout_is="token", rollout_is_threshold=1.5),
    "token_icepop": RolloutCorrection(rollout_is="token", rollout_is_threshold="0.8_1.5"),
    "seq_icepop": RolloutCorrection(rollout_is_threshold="0.5_3.0"),
    "token_k1_seq_mean_k3": RolloutCorrection(rollout_is="token", rollout_rs="token_k1,seq_mean_k3",
                                              rollout_rs_threshold="0.5_2.0,0.05"),
    "seq_sum_k1_seq_max_k2": RolloutCorrection(rollout_is=None, rollout_rs="seq_sum_k1,seq_max_k2",
                                               rollout_rs_threshold="3.0,0.3"),
    "token_k2_seq_sum_k3": RolloutCorrection(rollout_rs="token_k2,seq_sum_k3", rollout_rs_threshold="0.1,0.5"),
    "seq_mean_k1_token_k3": RolloutCorrection(rollout_rs="seq_mean_k1,token_k3", rollout_rs_threshold="0.7_1.4,0.05"),
}  # fmt: skip


def _inputs(seed, B=6, T=9, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0 - 0.05
    rollout = (logp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False  # a fully masked row
    return logp, rollout, mask


def _verl(logp, rollout, mask, c: RolloutCorrection):
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    kw = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in c._asdict().items() if k != "loss_type"}
    return compute_rollout_correction_and_rejection_mask(logp, rollout, mask.to(logp.dtype), **kw)


def _assert_same_metrics(ours: dict, theirs: dict):
    ours = {k: v for k, v in ours.items() if k.startswith("rollout_corr/")}
    assert set(ours) == set(theirs), (sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs)))
    for name, value in theirs.items():
        # verl's std: E[x²] − E[x]² over count + 1e-8, ~1e-5 off where it is 0
        close = dict(CLOSE, atol=2e-5) if name.endswith("_std") else CLOSE
        torch.testing.assert_close(float(ours[name]), float(value), **close, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_rollout_correction_metrics_match_verl(verl_core, case, seed):
    logp, rollout, mask = _inputs(seed)
    if seed == 1:  # extreme log-ratios: beyond the ±20 safety bound
        rollout[0, :2] = logp[0, :2] - 25.0
        rollout[1, 1] = logp[1, 1] + 22.0
    _, _, metrics = verl_rollout_correction(logp, rollout, mask, CASES[case])
    _, _, t_metrics = _verl(logp, rollout, mask, CASES[case])
    _assert_same_metrics(metrics, t_metrics)


@pytest.mark.parametrize("case", ["seq_tis", "token_k1_seq_mean_k3"])
def test_bypass_mode_returns_every_rollout_diagnostic(verl_core, case):
    """``bypass_mode``'s metrics hold verl's rollout-correction diagnostics of the batch (the current
    policy's log-probs against the rollout's)."""
    logp, rollout, mask = _inputs(3)
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = CASES[case]._replace(loss_type="reinforce")
    _, metrics = verl_policy_loss(logp, rollout, adv, mask, loss_mode="bypass_mode",
                                  config=VerlPolicyConfig(rollout_correction=c))  # fmt: skip
    _, _, t_metrics = _verl(logp, rollout, mask, c)
    _assert_same_metrics(metrics, t_metrics)


def test_fully_masked_batch_gives_finite_zero_metrics():
    logp, rollout, mask = _inputs(4)
    c = CASES["token_k1_seq_mean_k3"]
    _, kept, metrics = verl_rollout_correction(logp, rollout, torch.zeros_like(mask), c)
    assert not kept.any()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert len(metrics) > 40
