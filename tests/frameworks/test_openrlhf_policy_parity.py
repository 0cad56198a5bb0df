"""OpenRLHF's ``PolicyLoss`` (``openrlhf.models.loss``) with its train/rollout IS gates pinned
against ``alignkernels.losses.openrlhf_policy.openrlhf_policy_loss`` in fp64: values, gradients,
the returned statistics, dual clip, GSPO, every gate / level / mode, the global-batch arguments and
fully masked rows. Skipped without OpenRLHF."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.aggregation import GlobalBatch
from alignkernels.losses.openrlhf_policy import IS_GATES, ISCorrection, openrlhf_policy_loss

CLOSE = dict(rtol=1e-7, atol=1e-10)  # OpenRLHF's sequence means divide by count + 1e-8


def _inputs(seed=0, B=6, T=9, empty_rows=(2,), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2.0 - 0.05
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    rollout = (old + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    for r in empty_rows:
        mask[r] = False
    return logp, old, rollout, adv, mask


def _both(models, logp, old, rollout, adv, mask, *, corr=ISCorrection(), gb=None, **kw):
    loss_mod, _ = models
    x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours, metrics = openrlhf_policy_loss(x, old, adv, mask, rollout_logp=rollout, is_correction=corr,
                                         global_batch=gb, **kw)  # fmt: skip
    module = loss_mod.PolicyLoss(is_correction_level=corr.level, is_correction_mode=corr.mode,
                                 is_correction_gating=corr.gating, is_correction_threshold=corr.threshold, **kw)
    extra = {} if gb is None else dict(dp_size=gb.dp_size, batch_num_tokens=gb.batch_num_tokens,
                                       global_batch_size=gb.global_batch_size)  # fmt: skip
    theirs, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = module(y, old, adv, mask.to(logp.dtype), rollout, **extra)
    torch.testing.assert_close(ours, theirs, **CLOSE)
    torch.testing.assert_close(metrics["clip_ratio"], clip_ratio, **CLOSE)
    torch.testing.assert_close(metrics["ppo_kl"], ppo_kl, **CLOSE)
    if vllm_kl is None:
        assert "vllm_kl" not in metrics and "is_filter_ratio" not in metrics
    else:
        torch.testing.assert_close(metrics["vllm_kl"], vllm_kl, **CLOSE)
        # OpenRLHF returns the sequence-level filter ratio in fp32
        torch.testing.assert_close(metrics["is_filter_ratio"], is_filter_ratio, check_dtype=False, **CLOSE)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x.grad, y.grad, **CLOSE)
    assert (x.grad[~mask] == 0).all()
    return metrics


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_policy_loss_matches_openrlhf(openrlhf_models, token_level_loss, dual_clip, policy_loss_type):
    logp, old, rollout, adv, mask = _inputs(1)
    old[:, 1] = logp[:, 1] - 2.0  # ratio e² at token 1: beyond the clip range, at the dual-clip cap
    _both(openrlhf_models, logp, old, rollout, adv, mask, token_level_loss=token_level_loss, dual_clip=dual_clip,
          policy_loss_type=policy_loss_type, clip_eps_low=0.2, clip_eps_high=0.28)  # fmt: skip


CORRECTIONS = [
    ISCorrection("token", "mask", "ratio", (0.5, 2.0)),
    ISCorrection("token", "clip", "ratio", (0.5, 2.0)),
    ISCorrection("seq", "mask", "ratio", (0.7, 1.4)),
    ISCorrection("token", "mask", "binary_kl", (0.0, 0.05)),
    ISCorrection("seq", "mask", "binary_kl", (0.0, 0.05)),
    ISCorrection("token", "mask", "tv", (0.0, 0.1)),
    ISCorrection("seq", "mask", "tv", (0.0, 0.1)),
]


@pytest.mark.parametrize("corr", CORRECTIONS, ids=[f"{c.level}-{c.mode}-{c.gating}" for c in CORRECTIONS])
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_is_gates_match_openrlhf(openrlhf_models, corr, policy_loss_type):
    logp, old, rollout, adv, mask = _inputs(2)
    metrics = _both(openrlhf_models, logp, old, rollout, adv, mask, corr=corr, policy_loss_type=policy_loss_type)
    if policy_loss_type == "ppo":  # the data exercises the gate: some units filtered, not all
        assert 0 < metrics["is_filter_ratio"] < 1


def test_every_gate_is_tested():
    assert {c.gating for c in CORRECTIONS} == set(IS_GATES)


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_global_batch_arguments_match_openrlhf(openrlhf_models, token_level_loss):
    logp, old, rollout, adv, mask = _inputs(3)
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum() * 2 + 1), global_batch_size=11.0)
    _both(openrlhf_models, logp, old, rollout, adv, mask, gb=gb, token_level_loss=token_level_loss,
          corr=ISCorrection("token", "mask", "ratio", (0.5, 2.0)))  # fmt: skip


@pytest.mark.parametrize("corr", [ISCorrection(), ISCorrection("seq", "mask", "ratio", (0.5, 2.0))])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_fully_masked_batch_gives_zero_not_nan(corr, token_level_loss):
    logp, old, rollout, adv, mask = _inputs(4)
    mask = torch.zeros_like(mask)
    logp = logp.clone()
    logp[0, 0] = float("nan")
    x = logp.requires_grad_(True)
    loss, metrics = openrlhf_policy_loss(x, old, adv, mask, rollout_logp=rollout, is_correction=corr,
                                         token_level_loss=token_level_loss)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_fp32_matches_fp64():
    logp, old, rollout, adv, mask = _inputs(5)
    corr = ISCorrection("seq", "mask", "ratio", (0.5, 2.0))
    x64, x32 = logp.clone().requires_grad_(True), logp.float().requires_grad_(True)
    l64, _ = openrlhf_policy_loss(x64, old, adv, mask, rollout_logp=rollout, is_correction=corr, dual_clip=3.0)
    l32, _ = openrlhf_policy_loss(x32, old.float(), adv.float(), mask, rollout_logp=rollout.float(),
                                  is_correction=corr, dual_clip=3.0)  # fmt: skip
    torch.testing.assert_close(l32.double(), l64, rtol=2e-6, atol=1e-7)
    l64.backward()
    l32.backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(policy_loss_type="grpo"), ValueError, "policy_loss_type must be one of ppo, gspo"),
    (dict(is_correction=ISCorrection("tok")), ValueError, "level must be one of"),
    (dict(is_correction=ISCorrection("token", "drop")), ValueError, "mode must be one of"),
    (dict(is_correction=ISCorrection("token", "mask", "kl")), ValueError, "gating must be one of ratio"),
    (dict(is_correction=ISCorrection("seq", "clip")), ValueError, "mode='clip' needs"),
    (dict(is_correction=ISCorrection("token", "mask", "tv", (0.5, 5.0))), ValueError, "upper bound only"),
    (dict(is_correction=ISCorrection("token", "mask", "ratio", (0.5,))), TypeError, "threshold"),
    (dict(is_correction=ISCorrection("token"), rollout_logp=None), ValueError, "rollout_logp is required"),
    (dict(dual_clip=1.0), ValueError, "dual_clip"),
    (dict(clip_eps_low=-0.1), ValueError, "clip_eps_low"),
    (dict(clip_eps_high="0.2"), TypeError, "clip_eps_high"),
    (dict(token_level_loss=1), TypeError, "token_level_loss"),
])  # fmt: skip
def test_bad_arguments_are_named(kwargs, error, match):
    logp, old, rollout, adv, mask = _inputs(6)
    kwargs = {"rollout_logp": rollout, **kwargs}
    with pytest.raises(error, match=match):
        openrlhf_policy_loss(logp, old, adv, mask, **kwargs)


@pytest.mark.parametrize("corr", [ISCorrection(), *CORRECTIONS],
                         ids=["off"] + [f"{c.level}-{c.mode}-{c.gating}" for c in CORRECTIONS])  # fmt: skip
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_empty_batch_gives_zero_and_finite_metrics(corr, policy_loss_type):
    x = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    loss, metrics = openrlhf_policy_loss(x, x.detach(), torch.zeros(0, dtype=torch.float64),
                                         torch.zeros(0, 5, dtype=torch.bool), rollout_logp=x.detach(),
                                         is_correction=corr, policy_loss_type=policy_loss_type)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 5)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_micro_batches_sum_to_the_global_batch_loss(openrlhf_models, token_level_loss, policy_loss_type):
    """OpenRLHF's global arguments, each micro-batch of 2 ranks pinned against ``PolicyLoss``: the
    micro-batch losses (and gradients), divided by ``dp_size``, sum to the whole step's."""
    logp, old, rollout, adv, mask = _inputs(5, B=8, empty_rows=(2, 5))
    corr = ISCorrection("seq", "mask", "ratio", (0.5, 2.0))
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum()), global_batch_size=float(mask.any(-1).sum()))
    kw = dict(token_level_loss=token_level_loss, policy_loss_type=policy_loss_type, is_correction=corr)
    x = logp.clone().requires_grad_(True)
    whole, _ = openrlhf_policy_loss(x, old, adv, mask, rollout_logp=rollout, global_batch=gb._replace(dp_size=1), **kw)
    whole.backward()
    y = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in torch.arange(8).chunk(4):
        _both(openrlhf_models, logp[rows], old[rows], rollout[rows], adv[rows], mask[rows], corr=corr, gb=gb,
              token_level_loss=token_level_loss, policy_loss_type=policy_loss_type)  # fmt: skip
        part, _ = openrlhf_policy_loss(y[rows], old[rows], adv[rows], mask[rows], rollout_logp=rollout[rows],
                                       global_batch=gb, **kw)  # fmt: skip
        (part / gb.dp_size).backward()
        total = total + part.detach() / gb.dp_size
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-14)
