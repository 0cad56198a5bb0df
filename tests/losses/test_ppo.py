"""PPO vs line-by-line references of TRL's last PPOTrainer (``alignkernels.reference``
``trl_ppo_rollout_reference`` / ``trl_ppo_loss_reference``) and verl's dual clip / agg_loss."""
import pytest
import torch

from alignkernels.losses.ppo import (
    LOSS_AGG_MODES,
    PPOLoss,
    agg_loss,
    gae,
    kl_penalty_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
)
from alignkernels.reference import trl_ppo_loss_reference, trl_ppo_rollout_reference

RTOL, ATOL = 1e-5, 1e-6


def _rollout(B=6, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(B, T, generator=g)
    ref_logprobs = logprobs + 0.3 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    scores = 2 * torch.randn(B, generator=g)
    # index of the last response token; T-1 (no room for p1), 0 (one token), -1 (empty response)
    sequence_lengths = torch.randint(0, T, (B,), generator=g)
    sequence_lengths[0] = T - 1
    sequence_lengths[1] = 0
    sequence_lengths[2] = -1
    return logprobs, ref_logprobs, values, scores, sequence_lengths


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_rollout_matches_trl_ppo(kl_estimator, whiten_rewards, gamma, lam):
    logprobs, ref_logprobs, values, scores, seq_len = _rollout()
    kw = dict(kl_coef=0.07, kl_estimator=kl_estimator, whiten_rewards=whiten_rewards)
    t_rewards, t_adv, t_ret, padding_mask, padding_mask_p1 = trl_ppo_rollout_reference(
        logprobs, ref_logprobs, values, scores, seq_len, gamma=gamma, lam=lam, **kw
    )
    mask = ~padding_mask
    out = kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, score_at="after_last", **kw)
    assert torch.equal(out["gae_mask"], ~padding_mask_p1)
    torch.testing.assert_close(out["rewards"], t_rewards, rtol=RTOL, atol=ATOL)
    adv, ret = gae(out["rewards"], values, out["gae_mask"], gamma=gamma, lam=lam, whiten=True, whiten_mask=mask)
    torch.testing.assert_close(adv, t_adv, rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(ret, t_ret, rtol=RTOL, atol=1e-5)


def test_kl_rewards_score_at_last_token():
    logprobs, ref_logprobs, _, scores, seq_len = _rollout(seed=3)
    T = logprobs.shape[1]
    mask = torch.arange(T)[None, :] <= seq_len[:, None]
    out = kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, kl_coef=0.1, kl_estimator="k3")
    logr = torch.where(mask, ref_logprobs - logprobs, 0.0)
    kl = (logr.exp() - 1) - logr
    expected = -0.1 * kl
    for b in range(logprobs.shape[0]):
        if seq_len[b] >= 0:
            expected[b, seq_len[b]] += scores[b]
    torch.testing.assert_close(out["rewards"], expected)
    torch.testing.assert_close(out["kl"], kl)
    assert torch.equal(out["rewards"][2], torch.zeros(T))  # empty response: nothing


def _loss_batch(B=6, T=10, seed=0):
    logprobs, _, values, _, seq_len = _rollout(B, T, seed)
    g = torch.Generator().manual_seed(seed + 100)
    new_logprobs = logprobs + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    vpred = values + torch.randn(B, T, generator=g)
    returns = values + torch.randn(B, T, generator=g)
    idx = torch.arange(T)[None, :]
    padding_mask = idx > seq_len[:, None]
    padding_mask_p1 = idx > (seq_len + 1)[:, None]
    old_values = values.masked_fill(padding_mask_p1, 0)
    return new_logprobs, logprobs, adv, vpred, old_values, returns, padding_mask, padding_mask_p1


@pytest.mark.parametrize("cliprange,cliprange_value,vf_coef", [(0.2, 0.2, 0.1), (0.1, 0.5, 1.0)])
def test_loss_matches_trl_ppo(cliprange, cliprange_value, vf_coef):
    new_lp, old_lp, adv, vpred, old_values, returns, padding_mask, padding_mask_p1 = _loss_batch()
    a = new_lp.clone().requires_grad_(True)
    av = vpred.clone().requires_grad_(True)
    t_loss, t_stats = trl_ppo_loss_reference(
        a, old_lp, adv, padding_mask, av, old_values, returns, padding_mask_p1,
        cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef,
    )  # fmt: skip
    t_loss.backward()
    b = new_lp.clone().requires_grad_(True)
    bv = vpred.clone().requires_grad_(True)
    loss, stats = ppo_loss(b, old_lp, adv, ~padding_mask, bv, old_values, returns, value_mask=~padding_mask_p1,
                           cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef)  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss, t_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(b.grad, a.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(bv.grad, av.grad, rtol=RTOL, atol=ATOL)
    assert set(t_stats) <= set(stats)
    for k, v in t_stats.items():
        torch.testing.assert_close(stats[k], v.to(stats[k].dtype), rtol=RTOL, atol=ATOL, msg=k)
    assert 0 < float(stats["policy/clipfrac_avg"]) < 1 and 0 < float(stats["val/clipfrac_avg"]) < 1


def test_dual_clip_matches_verl_formula():
    new_lp, old_lp, adv, *_ = _loss_batch(seed=4)
    mask = torch.ones_like(new_lp, dtype=torch.bool)
    mask[0, 5:] = False
    x = new_lp.clone().requires_grad_(True)
    # verl core_algos.compute_policy_loss (vanilla, dual clip), written out independently
    ratio = torch.exp(x - old_lp)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - 0.1, 1 + 0.3)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * 3.0
    c2 = torch.min(l3, c1)
    per_tok = torch.where(adv < 0, c2, c1)
    expected = (per_tok * mask).sum() / mask.sum()
    expected.backward()
    y = new_lp.clone().requires_grad_(True)
    loss, stats = ppo_loss(y, old_lp, adv, mask, cliprange_low=0.1, cliprange_high=0.3, clip_ratio_c=3.0)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y.grad, x.grad, rtol=RTOL, atol=ATOL)
    lower = ((c1 > l3) & (adv < 0)).float()
    torch.testing.assert_close(stats["policy/clipfrac_lower"], (lower * mask).sum() / mask.sum())


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_modes(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    m = torch.rand(4, 6, generator=g) > 0.4
    m[3] = False
    mf = m.float()
    if mode == "token-mean":
        expected = (x * mf).sum() / mf.sum()
    elif mode == "seq-mean-token-sum":
        expected = (x * mf).sum(-1).mean()
    elif mode == "seq-mean-token-mean":
        expected = ((x * mf).sum(-1) / mf.sum(-1).clamp(min=1)).mean()
    elif mode == "token-sum":
        expected = (x * mf).sum()
    else:
        expected = (x * mf).sum() / 6
    torch.testing.assert_close(agg_loss(x, m, mode), expected)


def test_masked_stats_match_definitions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g)
    m = torch.rand(5, 7, generator=g) > 0.3
    sel = x[m]
    torch.testing.assert_close(masked_mean(x, m), sel.mean())
    torch.testing.assert_close(masked_var(x, m), sel.var(unbiased=True))
    w = masked_whiten(x, m)
    torch.testing.assert_close(w[m], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8))
    w2 = masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w2[m], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8) + sel.mean())


def test_all_masked_finite_zero_grad():
    new_lp, old_lp, adv, vpred, old_values, returns, *_ = _loss_batch()
    mask = torch.zeros_like(new_lp, dtype=torch.bool)
    old_lp = old_lp.masked_fill(~mask, float("nan"))  # garbage where masked must not leak
    a = new_lp.clone().requires_grad_(True)
    v = vpred.clone().requires_grad_(True)
    e = torch.rand_like(new_lp).requires_grad_(True)
    loss, stats = ppo_loss(a, old_lp, adv, mask, v, old_values, returns, entropy=e, entropy_coef=0.01)
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    for t in (a, v, e):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert all(torch.isfinite(s) for s in stats.values())


def test_zero_advantages_zero_policy_loss():
    new_lp, old_lp, adv, *_ = _loss_batch()
    a = new_lp.clone().requires_grad_(True)
    loss, stats = ppo_loss(a, old_lp, torch.zeros(new_lp.shape[0]), torch.ones_like(new_lp))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(a.grad, torch.zeros_like(a))
    assert float(stats["policy/clipfrac_avg"]) == 0.0


def test_entropy_bonus_and_metric():
    new_lp, old_lp, adv, *_, padding_mask, _ = _loss_batch()
    mask = ~padding_mask
    e = torch.rand_like(new_lp).requires_grad_(True)
    base, _ = ppo_loss(new_lp, old_lp, adv, mask)
    loss, stats = ppo_loss(new_lp, old_lp, adv, mask, entropy=e, entropy_coef=0.05)
    loss.backward()
    ent_mean = (e.detach() * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), base - 0.05 * ent_mean)
    torch.testing.assert_close(stats["policy/entropy_avg"], ent_mean)
    torch.testing.assert_close(e.grad, -0.05 * mask.float() / mask.sum())


def test_module_and_errors():
    new_lp, old_lp, adv, vpred, old_values, returns, padding_mask, padding_mask_p1 = _loss_batch()
    mod = PPOLoss(cliprange=0.1, vf_coef=0.5)
    a, _ = mod(new_lp, old_lp, adv, ~padding_mask, vpred, old_values, returns)
    b, _ = ppo_loss(new_lp, old_lp, adv, ~padding_mask, vpred, old_values, returns, cliprange=0.1, vf_coef=0.5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="returns"):
        ppo_loss(new_lp, old_lp, adv, ~padding_mask, vpred)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ppo_loss(new_lp, old_lp, adv, ~padding_mask, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="old_logp"):
        ppo_loss(new_lp, old_lp[:, 1:], adv, ~padding_mask)
    with pytest.raises(ValueError, match="advantages"):
        ppo_loss(new_lp, old_lp, adv[:2], ~padding_mask)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty_rewards(new_lp, old_lp, torch.zeros(6), ~padding_mask, kl_estimator="k2")
    with pytest.raises(ValueError, match="scores"):
        kl_penalty_rewards(new_lp, old_lp, torch.zeros(5), ~padding_mask)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("token_adv", [True, False])
def test_triton_backend_matches_torch(mode, token_adv, triton_device):
    new_lp, old_lp, adv, vpred, old_values, returns, padding_mask, padding_mask_p1 = (
        t.to(triton_device) for t in _loss_batch(seed=7)
    )
    if not token_adv:
        adv = adv[:, 0].contiguous()
    ent = torch.rand_like(new_lp)
    out = {}
    for backend in ("torch", "triton"):
        a = new_lp.clone().requires_grad_(True)
        v = vpred.clone().requires_grad_(True)
        loss, stats = ppo_loss(a, old_lp, adv, ~padding_mask, v, old_values, returns, value_mask=~padding_mask_p1,
                               cliprange_low=0.1, cliprange_high=0.3, loss_agg_mode=mode, entropy=ent,
                               entropy_coef=0.01, backend=backend)  # fmt: skip
        loss.backward()
        out[backend] = (loss.detach(), a.grad, v.grad, stats)
    (l0, g0, gv0, s0), (l1, g1, gv1, s1) = out["torch"], out["triton"]
    torch.testing.assert_close(l1, l0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g1, g0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gv1, gv0, rtol=RTOL, atol=ATOL)
    assert set(s0) == set(s1)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=RTOL, atol=ATOL, msg=k)
    assert float(s0["policy/clipfrac_avg"]) > 0


def test_dual_clip_runs_on_the_row_kernel_and_matches_fp64(triton_device, monkeypatch):
    """``clip_ratio_c`` on ``backend="triton"`` runs the fused rows (``DUAL_CLIP``), not a PyTorch
    fallback, and gives the fp64 eager loss, gradient and ``policy/clipfrac_lower``."""
    from alignkernels.losses import clipped_policy

    calls = []
    forward = clipped_policy.PolicyRowsFunction.forward
    monkeypatch.setattr(clipped_policy.PolicyRowsFunction, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))  # fmt: skip
    new_lp, old_lp, adv, *_, padding_mask, _ = _loss_batch(seed=9)
    old_lp = old_lp.clone()
    old_lp[:, 1] = new_lp[:, 1] - 2.0  # ratio e²: the dual-clip cap binds where A < 0
    out = {}
    for backend, dtype, device in (("torch", torch.float64, "cpu"), ("triton", torch.float32, triton_device)):
        a = new_lp.to(device, dtype).requires_grad_(True)
        loss, stats = ppo_loss(a, old_lp.to(device, dtype), adv.to(device, dtype), (~padding_mask).to(device),
                               clip_ratio_c=3.0, backend=backend)  # fmt: skip
        loss.backward()
        out[backend] = (loss.detach().double().cpu(), a.grad.double().cpu(), stats["policy/clipfrac_lower"])
    assert calls, "the Triton rows did not run"
    assert float(out["torch"][2]) > 0
    for x, y in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(x.double().cpu(), y.double(), rtol=2e-6, atol=1e-7)
