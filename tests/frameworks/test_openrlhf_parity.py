"""Aggregation, KL estimators, advantages, returns and whitening pinned against the installed
OpenRLHF (``openrlhf.models.loss.aggregate_loss``, ``openrlhf.models.utils.compute_approx_kl``,
``RemoteExperienceMaker.compute_advantages_and_returns``) in fp64: values and gradients, fully
masked rows, holes in the action mask, and the micro-batch identity. Skipped without OpenRLHF.

OpenRLHF computes its KL estimates in fp32 (``.float()``): those comparisons use fp32 tolerances."""
from __future__ import annotations

import types

import pytest
import torch

from alignkernels.losses.advantages import estimate_advantages
from alignkernels.losses.aggregation import GlobalBatch
from alignkernels.losses.kl import kl_estimate
from alignkernels.losses.ppo import agg_loss, gae, kl_penalty_rewards, masked_whiten

OPENRLHF_MODES = {True: "token-mean", False: "seq-mean-token-mean"}  # aggregate_loss(token_level_loss=)
FP32_REF = dict(rtol=1e-6, atol=2e-6)


def _batch(B=8, T=9, seed=0, empty_rows=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True
    for r in empty_rows:
        mask[r] = False
    return loss, mask


# ---------------------------------------------------------------- aggregate_loss
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_aggregate_loss_matches_openrlhf(openrlhf_models, token_level_loss):
    loss_mod, _ = openrlhf_models
    loss, mask = _batch()
    a, b = loss.clone().requires_grad_(True), loss.clone().requires_grad_(True)
    ours = agg_loss(a, mask, OPENRLHF_MODES[token_level_loss], semantics="openrlhf")
    theirs = loss_mod.aggregate_loss(b, mask.to(torch.float64), token_level_loss=token_level_loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)  # OpenRLHF: token means over count + 1e-8
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_aggregate_loss_micro_batches_sum_to_the_global_loss(openrlhf_models, token_level_loss, dp_size):
    loss_mod, _ = openrlhf_models
    loss, mask = _batch(B=12, seed=1, empty_rows=(0, 7))
    mode = OPENRLHF_MODES[token_level_loss]
    whole = agg_loss(loss, mask, mode, semantics="openrlhf")
    tokens, sequences = float(mask.sum()), float(mask.any(-1).sum())
    gb = GlobalBatch(dp_size=dp_size, batch_num_tokens=tokens, global_batch_size=sequences)
    total = 0.0
    for rows in torch.arange(12).chunk(2 * dp_size):
        a, b = loss[rows].clone().requires_grad_(True), loss[rows].clone().requires_grad_(True)
        ours = agg_loss(a, mask[rows], mode, semantics="openrlhf", global_batch=gb)
        theirs = loss_mod.aggregate_loss(b, mask[rows].to(torch.float64), token_level_loss=token_level_loss,
                                         dp_size=dp_size, batch_num_tokens=tokens, global_batch_size=sequences)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-12)
        total = total + ours.detach()
    torch.testing.assert_close(total / dp_size, whole, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- compute_approx_kl
def _logps(seed=0, B=5, T=8):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    base = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.7
    base[0, :4] = logp[0, :4] + torch.tensor([15.0, -15.0, 8.0, -12.0], dtype=torch.float64)  # the clamps
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    old[1, :2] = logp[1, :2] - torch.tensor([4.0, 0.5], dtype=torch.float64)  # IS weight e^4 > 10: clipped
    return logp, base, old


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased_gradient, with_old", [(False, False), (True, False), (True, True)])
def test_kl_estimators_match_compute_approx_kl(openrlhf_models, estimator, unbiased_gradient, with_old):
    """``log_probs_old`` (the importance weight) is read only with ``unbiased_gradient=True``."""
    _, utils = openrlhf_models
    logp, base, old = _logps()
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = []
    for ours in (True, False):
        a, b = logp.clone().requires_grad_(True), base.clone().requires_grad_(True)
        o = old if with_old else None
        if ours:
            out = kl_estimate(a, b, estimator, clamp="openrlhf", old_logp=o,
                              gradient="reverse_kl" if unbiased_gradient else "estimator")  # fmt: skip
        else:
            out = utils.compute_approx_kl(a, b, log_probs_old=o, kl_estimator=estimator,
                                          unbiased_gradient=unbiased_gradient)  # fmt: skip
        (out * weights).sum().backward()
        results.append((out.detach().double(), a.grad, b.grad))
    (o0, ga0, gb0), (o1, ga1, gb1) = results
    torch.testing.assert_close(o0, o1, **FP32_REF)
    torch.testing.assert_close(ga0, ga1, **FP32_REF)
    torch.testing.assert_close(gb0, gb1, **FP32_REF)


# ---------------------------------------------------------------- advantages and returns
def _experience_maker(em, estimator, n, gamma, lam, kl_coef, no_std_norm):
    """A ``RemoteExperienceMaker`` with only what ``compute_advantages_and_returns`` reads."""
    maker = object.__new__(em.RemoteExperienceMaker)
    args = types.SimpleNamespace(
        algo=types.SimpleNamespace(advantage=types.SimpleNamespace(
            estimator=estimator, gamma=gamma, lambd=lam, no_std_norm=no_std_norm)),
        rollout=types.SimpleNamespace(n_samples_per_prompt=n),
        reward=types.SimpleNamespace(clip_range=None, overlong_buffer_len=None, stop_properly_penalty_coef=None),
    )  # fmt: skip
    maker.strategy = types.SimpleNamespace(args=args)
    maker.kl_ctl = types.SimpleNamespace(value=kl_coef)
    maker.advantage_estimator = estimator
    return maker


def _rollout(seed, prompts=3, n=4, T=7):
    g = torch.Generator().manual_seed(seed)
    B = prompts * n
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[1, 2:4] = False  # a hole (tool output) inside the response
    mask[6] = False  # a fully masked row
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    scores[8:12] = 0.5  # a group with zero spread
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return scores, mask, logp, ref, values


# OpenRLHF estimator -> (our shaping row + options, returns by GAE, whitened)
SHAPING = {
    "gae": (None, True, True),
    "reinforce": (None, False, True),
    "rloo": (("rloo", {}), False, False),
    "reinforce_baseline": (("grpo", dict(norm_adv_by_std_in_grpo=False)), False, True),
    "dr_grpo": (("grpo", dict(norm_adv_by_std_in_grpo=False)), False, False),
    "group_norm": (("grpo", dict(epsilon=1e-9)), False, False),
    "flash_reinforce": (("grpo", dict(norm_adv_by_std_in_grpo=False)), False, False),  # one group: the batch
}


@pytest.mark.parametrize("estimator", list(SHAPING))
@pytest.mark.parametrize("gamma, lam, no_std_norm", [(1.0, 0.95, False), (0.9, 0.8, True)])
def test_advantages_and_returns_match_openrlhf(openrlhf_experience_maker, estimator, gamma, lam, no_std_norm):
    n, kl_coef = 4, 0.05
    scores, mask, logp, ref, values = _rollout(seed=1, n=n)
    B = scores.shape[0]
    kl = kl_estimate(logp, ref, "k1", mask=mask)
    # OpenRLHF's experiences: rows shuffled into two batches, `index` = position in prompt order
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(2))
    experiences = [
        types.SimpleNamespace(rewards=scores[p].clone(), index=p.tolist(), kl=kl[p].clone(), action_mask=mask[p],
                              values=values[p].clone(), info={})
        for p in perm.chunk(2)
    ]  # fmt: skip
    maker = _experience_maker(openrlhf_experience_maker, estimator, n, gamma, lam, kl_coef, no_std_norm)
    maker.compute_advantages_and_returns(experiences)
    theirs_adv = torch.empty(B, mask.shape[1], dtype=torch.float64)
    theirs_ret = torch.empty_like(theirs_adv)
    for p, exp in zip(perm.chunk(2), experiences):
        theirs_adv[p], theirs_ret[p] = exp.advantages, exp.returns

    shaping, use_gae, whiten = SHAPING[estimator]
    prompt = torch.arange(B) // n if estimator != "flash_reinforce" else torch.zeros(B, dtype=torch.long)
    if shaping is not None:
        name, options = shaping
        shaped, _ = estimate_advantages(scores[:, None], torch.ones(B, 1), prompt, estimator=name, **options)
        scores = shaped[:, 0]
    rewards = kl_penalty_rewards(logp, ref, scores, mask, kl_coef=kl_coef)["rewards"]
    g = gamma if (use_gae or estimator == "reinforce") else 1.0  # OpenRLHF forces gamma = 1 for the others
    if use_gae:
        adv, ret = gae(rewards, values, mask, gamma=g, lam=lam, holes="zero")
    else:
        adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=g, lam=1.0, holes="zero")
        ret = adv.clone()
    if whiten:
        if no_std_norm:  # centring only
            adv = adv - (adv * mask).sum() / mask.sum()
        else:
            adv = masked_whiten(adv, mask, semantics="openrlhf")
    torch.testing.assert_close(ret, theirs_ret, rtol=1e-10, atol=1e-12)
    # OpenRLHF forms the whitening statistics in fp32 (`.float()`)
    torch.testing.assert_close(adv, theirs_adv, **(FP32_REF if whiten else dict(rtol=1e-10, atol=1e-12)))


def test_gae_holes_zero_differs_from_bridge_only_through_holes():
    """With no hole both hole semantics agree (right padding); with one, 'bridge' skips it."""
    scores, mask, logp, ref, values = _rollout(seed=3)
    rewards = kl_penalty_rewards(logp, ref, scores, mask)["rewards"]
    right_padded = torch.arange(mask.shape[1]) < mask.sum(-1, keepdim=True)
    a0, r0 = gae(rewards, values, right_padded, holes="bridge")
    a1, r1 = gae(rewards, values, right_padded, holes="zero")
    torch.testing.assert_close(a1 * right_padded, a0, rtol=1e-12, atol=1e-12)
    a0, _ = gae(rewards, values, mask, holes="bridge")
    a1, _ = gae(rewards, values, mask, holes="zero")
    assert not torch.allclose(a0[1, :2], a1[1, :2])  # row 1's hole at 2:4
    with pytest.raises(ValueError, match="holes must be one of bridge, zero"):
        gae(rewards, values, mask, holes="skip")


def test_masked_whiten_semantics_by_name():
    x, mask = _batch()
    n = mask.sum()
    mean = (x * mask).sum() / n
    biased = ((x - mean) ** 2 * mask).sum() / n
    expected = (x - mean) * biased.clamp(min=1e-8).rsqrt()
    torch.testing.assert_close(masked_whiten(x, mask, semantics="openrlhf"), expected)
    torch.testing.assert_close(masked_whiten(x, mask), (x - mean) * (biased * n / (n - 1) + 1e-8).rsqrt())
    with pytest.raises(ValueError, match="semantics must be one of trl, openrlhf"):
        masked_whiten(x, mask, semantics="verl")


def test_gpu_only_stand_ins_leave_no_trace(openrlhf_models, openrlhf_experience_maker, gpu_only_stand_ins):
    """The flash_attn / vllm stand-ins exist only while OpenRLHF is imported: later tests (TRL's
    and transformers' availability checks) see the packages as not installed."""
    import importlib.util
    import sys

    for name in gpu_only_stand_ins:
        assert name not in sys.modules or getattr(sys.modules[name], "__file__", None) is not None
    for top in {name.split(".")[0] for name in gpu_only_stand_ins}:
        if top not in sys.modules:
            assert importlib.util.find_spec(top) is None
    from transformers.utils import is_flash_attn_2_available

    assert not is_flash_attn_2_available()
