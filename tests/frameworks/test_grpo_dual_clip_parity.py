"""``grpo_loss(clip_ratio_c=, log_ratio_clamp=)``: verl's dual clip and ±20 log-ratio clamp as named
``PolicyConfig`` options, pinned in fp64 against verl's own ``compute_policy_loss_vanilla`` (values,
gradients, ``pg_clipfrac_lower``) at extreme log-ratios; the Triton row kernel against the fp64 torch
rows; the three-GEMM head against four GEMMs; bad values named. The verl parity tests skip without
verl (``tests/frameworks/conftest.py``)."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.clipped_policy import PolicyTerm, TokenInputs, policy_rows_torch, policy_rows_triton
from alignkernels.losses.fused import fused_linear_grpo_loss
from alignkernels.losses.grpo import grpo_loss
from alignkernels.losses.verl_policy import VerlPolicyConfig, verl_policy_loss

CLOSE = dict(rtol=1e-7, atol=1e-10)  # verl's token means divide by count + 1e-8


def _extreme(seed=0, B=5, T=8, dtype=torch.float64):
    """Log-ratios of ±30, ±25 and ±19 (beyond and inside the ±20 clamp) on tokens of both advantage
    signs, ordinary ones elsewhere, and a fully masked row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2.0 - 0.05
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    for col, lr in enumerate((30.0, -30.0, 25.0, -25.0, 19.0, -19.0)):
        old[col % (B - 1), col] = logp[col % (B - 1), col] - lr
        old[(col + 1) % (B - 1), col] = logp[(col + 1) % (B - 1), col] - lr
        adv[col % (B - 1), col] = -abs(float(adv[col % (B - 1), col])) - 0.1  # A < 0
        adv[(col + 1) % (B - 1), col] = abs(float(adv[(col + 1) % (B - 1), col])) + 0.1  # A > 0
    mask = torch.rand(B, T, generator=g) > 0.15
    mask[:, :6] = True
    mask[B - 1] = False
    return logp, old, adv, mask


def _verl_vanilla(verl_core, logp, old, adv, mask, clip_c):
    from verl.workers.config import ActorConfig

    x = logp.clone().requires_grad_(True)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=clip_c)  # fmt: skip
    loss, metrics = verl_core.get_policy_loss_fn("vanilla")(old, x, adv, mask.to(logp.dtype), "token-mean", cfg)
    return loss, metrics, torch.autograd.grad(loss, x)[0]


# verl has no "off" for the dual clip: 1e12 never binds here (|A|·e^20 < 1e12·|A|)
@pytest.mark.parametrize("ours_c, verl_c", [(3.0, 3.0), (1.7, 1.7), (None, 1e12)])
@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])  # both TRL token means = verl's token-mean
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_dual_clip_and_log_ratio_clamp_match_verl_vanilla(verl_core, ours_c, verl_c, loss_type, backend,
                                                               triton_device):  # fmt: skip
    logp, old, adv, mask = _extreme()
    t_loss, t_metrics, t_grad = _verl_vanilla(verl_core, logp, old, adv, mask, verl_c)
    if backend == "torch":
        dev, close = dict(dtype=torch.float64), CLOSE
    else:  # the fp32 kernel against verl's fp64
        dev, close = dict(device=triton_device, dtype=torch.float32), dict(rtol=2e-6, atol=1e-6)
    x = logp.to(**dev).requires_grad_(True)
    loss, metrics = grpo_loss(x, old.to(**dev), None, adv.to(**dev), mask.to(dev.get("device", "cpu")),
                              loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, clip_ratio_c=ours_c,
                              log_ratio_clamp=20.0, backend=backend)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss.double().cpu(), t_loss, **close)
    torch.testing.assert_close(grad.double().cpu(), t_grad, **close)
    assert torch.isfinite(grad).all() and (grad.cpu()[~mask] == 0).all()
    if ours_c is None:
        assert "clip_ratio/dual_clip_mean" not in metrics
    else:
        assert float(t_metrics["actor/pg_clipfrac_lower"]) > 0  # the cap binds on some tokens
        torch.testing.assert_close(metrics["clip_ratio/dual_clip_mean"].double().cpu().item(),
                                   float(t_metrics["actor/pg_clipfrac_lower"]), **close)  # fmt: skip


def test_the_clamp_changes_the_loss_where_verl_clamps():
    """Without ``log_ratio_clamp`` (TRL's default) a log-ratio of 25 on an A < 0 token is exp(25),
    with it exp(20): the option is not a no-op on these data."""
    logp, old, adv, mask = _extreme()
    off, _ = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo")
    on, _ = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", log_ratio_clamp=20.0)
    assert off > 10 * on > 0


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("clip_c", [None, 2.5])
def test_row_kernel_clamp_matches_fp64_rows(sequence, clip_c, triton_device):
    """``policy_rows_triton`` (fp32) against ``policy_rows_torch`` (fp64) with ``log_ratio_clamp`` at
    token and sequence level, a bias-corrected KL (it reads the clamped ratio) and the dual clip:
    every row statistic and the gradient."""
    logp, old, adv, mask = _extreme(3)
    ref = logp - 0.3
    term = PolicyTerm("clipped", sequence=sequence, beta=0.04, eps_low=0.2, eps_high=0.28, clip_c=clip_c,
                      log_ratio_clamp=20.0)  # fmt: skip

    def run(fn, dtype, device):
        x = logp.to(device, dtype).requires_grad_(True)
        z = torch.zeros((), dtype=dtype, device=device)
        m = mask.to(device)
        t = [torch.where(m, v.to(device, dtype), z) for v in (old, ref, adv)]
        rows = fn(TokenInputs(torch.where(m, x, z), t[0], t[1], t[2], m), term)
        (grad,) = torch.autograd.grad(rows["loss_sum"].sum() / 1e8, x)
        return {k: v.double().cpu() for k, v in rows.items() if v is not None}, grad.double().cpu()

    (r64, g64), (r32, g32) = run(policy_rows_torch, torch.float64, "cpu"), run(policy_rows_triton, torch.float32,
                                                                                triton_device)  # fmt: skip
    assert set(r64) <= set(r32)
    for name in r64:
        torch.testing.assert_close(r32[name], r64[name], rtol=2e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(g32, g64, rtol=2e-6, atol=1e-9)
    assert (g64[~mask] == 0).all()
    if clip_c is not None:
        assert r64["dual_sum"].sum() > 0


def test_verl_vanilla_triton_rows_clamp_the_log_ratio(verl_core, triton_device):
    """``verl_policy_loss(backend="triton")`` clamps the log-ratio at ±20 as verl: with a dual-clip
    cap that never binds, a log-ratio of 25 on an A < 0 token weighs exp(20)."""
    logp, old, adv, mask = _extreme(4)
    t_loss, _, t_grad = _verl_vanilla(verl_core, logp, old, adv, mask, 1e12)
    dev = dict(device=triton_device, dtype=torch.float32)
    x = logp.to(**dev).requires_grad_(True)
    loss, _ = verl_policy_loss(x, old.to(**dev), adv.to(**dev), mask.to(triton_device), loss_mode="vanilla",
                               config=VerlPolicyConfig(clip_ratio_high=0.28, clip_ratio_c=1e12), backend="triton")  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss.double().cpu(), t_loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), t_grad, rtol=2e-6, atol=1e-6)


def _head_problem(seed=0, B=4, T=6, H=16, V=61):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.6
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[0, 0], old[1, 0], old[2, 0] = logp[0, 0] - 25.0, logp[1, 0] + 25.0, logp[2, 0] - 1.5
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[0, 0], adv[1, 0], adv[2, 0] = -1.0, 1.0, -0.7
    return hidden, weight, ids, mask, old, adv


def test_three_gemm_head_with_dual_clip_and_clamp_matches_four_gemm():
    """Both options are per token: the three-GEMM head stays the ``auto`` path and gives the four-GEMM
    loss, metrics and gradients (fp64)."""
    hidden, weight, ids, mask, old, adv = _head_problem()
    out = {}
    for path in ("three_gemm", "four_gemm"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, metrics = fused_linear_grpo_loss(h, w, ids, adv, mask, old_logp=old, head_path="auto" if path ==
                                               "three_gemm" else path, chunk_size=5, loss_type="bnpo",
                                               clip_ratio_c=2.0, log_ratio_clamp=20.0)  # fmt: skip
        assert metrics.pop("head_path") == path
        out[path] = (loss, metrics, torch.autograd.grad(loss, (h, w)))
    (l3, m3, g3), (l4, m4, g4) = out["three_gemm"], out["four_gemm"]
    torch.testing.assert_close(l3, l4, rtol=1e-10, atol=1e-12)
    assert m3.keys() == m4.keys() and m3["clip_ratio/dual_clip_mean"] > 0
    for name in m3:
        torch.testing.assert_close(m3[name], m4[name], rtol=1e-10, atol=1e-12)
    for a, b in zip(g3, g4):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c must be > 1"),
    (dict(clip_ratio_c="3"), TypeError, "clip_ratio_c"),
    (dict(clip_ratio_c=3.0, loss_type="cispo"), ValueError, "clip_ratio_c .*loss_type='cispo'"),
    (dict(clip_ratio_c=3.0, loss_type="sapo"), ValueError, "clip_ratio_c .*loss_type='sapo'"),
    (dict(log_ratio_clamp=0.0), ValueError, "log_ratio_clamp must be > 0"),
    (dict(log_ratio_clamp=float("nan")), ValueError, "log_ratio_clamp"),
    (dict(log_ratio_clamp=True), TypeError, "log_ratio_clamp"),
])  # fmt: skip
def test_bad_dual_clip_and_clamp_values_are_named(kwargs, error, match):
    logp, old, adv, mask = _extreme()
    with pytest.raises(error, match=match):
        grpo_loss(logp, old, None, adv, mask, **kwargs)
