"""verl's policy losses (``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``) pinned against
``alignkernels.losses.verl_policy.verl_policy_loss`` in fp64: values, gradients, metrics, fully
masked rows, rollout IS weights, every aggregation mode and the global-batch arguments. Skipped
without verl (the stand-ins of ``tests/frameworks/conftest.py`` let it import on CPU)."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.aggregation import GlobalBatch
from alignkernels.losses.verl_policy import VERL_POLICY_LOSSES, VerlPolicyConfig, verl_policy_loss

# verl's token means divide by count + 1e-8: 1e-8 relative
CLOSE = dict(rtol=1e-7, atol=1e-10)
# bypass_mode dispatches into verl.trainer.ppo.rollout_corr_helper (rollout correction + rejection
# sampling), not a formula of its own: not a row yet.
NOT_ROWS = {"bypass_mode"}


def _inputs(seed=0, B=6, T=9, empty_rows=(2,), scale=0.4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2.0 - 0.05
    old = (logp + scale * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    for r in empty_rows:
        mask[r] = False
    isw = torch.rand(B, T, generator=g, dtype=dtype) + 0.5
    return logp, old, adv, mask, isw


def _verl_config(verl_core, cfg: VerlPolicyConfig, mode, global_batch=None):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    extra = {} if cfg.clip_ratio_c is None else {"clip_ratio_c": cfg.clip_ratio_c}
    pl = PolicyLossConfig(loss_mode=mode, clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb,
                          clip_cov_ub=cfg.clip_cov_ub, kl_cov_ratio=cfg.kl_cov_ratio, ppo_kl_coef=cfg.ppo_kl_coef,
                          dro_beta=cfg.dro_beta)  # fmt: skip
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=cfg.clip_ratio,
                        clip_ratio_low=cfg.low, clip_ratio_high=cfg.high, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg,
                        policy_loss=pl, **extra)  # fmt: skip
    if global_batch is not None:
        actor.global_batch_info.update(dp_size=global_batch.dp_size, batch_num_tokens=global_batch.batch_num_tokens,
                                       global_batch_size=global_batch.global_batch_size,
                                       loss_scale_factor=global_batch.loss_scale_factor)  # fmt: skip
    return actor


def _both(verl_core, mode, cfg, logp, old, adv, mask, isw=None, agg="token-mean", global_batch=None, seed=None):
    ours_in = logp.clone().requires_grad_(True)
    theirs_in = logp.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    ours, ours_m = verl_policy_loss(ours_in, old, adv, mask, loss_mode=mode, config=cfg, loss_agg_mode=agg,
                                    rollout_is_weights=isw, global_batch=global_batch)  # fmt: skip
    if seed is not None:
        torch.manual_seed(seed)
    fn = verl_core.get_policy_loss_fn(mode)
    theirs, theirs_m = fn(old, theirs_in, adv, mask.to(logp.dtype), agg,
                          _verl_config(verl_core, cfg, mode, global_batch), isw)  # fmt: skip
    return (ours, ours_m, ours_in), (theirs, theirs_m, theirs_in)


def _assert_match(ours, theirs):
    (loss, metrics, x), (t_loss, t_metrics, t_x) = ours, theirs
    torch.testing.assert_close(loss, t_loss, **CLOSE)
    assert set(metrics) == set(t_metrics)
    for name in t_metrics:
        torch.testing.assert_close(metrics[name].item(), float(t_metrics[name]), **CLOSE)
    loss.backward()
    t_loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, t_x.grad, **CLOSE)
    return x.grad


CONFIGS = {
    "vanilla": VerlPolicyConfig(clip_ratio=0.2, clip_ratio_high=0.28),
    "gspo": VerlPolicyConfig(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
    "sapo": VerlPolicyConfig(tau_pos=1.0, tau_neg=1.05),
    "gpg": VerlPolicyConfig(),
    "clip_cov": VerlPolicyConfig(clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0),
    "kl_cov": VerlPolicyConfig(kl_cov_ratio=0.2, ppo_kl_coef=0.5),
    "geo_mean": VerlPolicyConfig(clip_ratio_low=0.4, clip_ratio_high=0.3),
    "dro": VerlPolicyConfig(dro_beta=0.3),
    "cispo": VerlPolicyConfig(clip_ratio_low=0.2, clip_ratio_high=0.3),
    "dppo_tv": VerlPolicyConfig(clip_ratio=0.1, clip_ratio_c=2.0),
    "dppo_kl": VerlPolicyConfig(clip_ratio_low=0.02, clip_ratio_high=0.05, clip_ratio_c=2.0),
}


def test_every_registered_verl_policy_loss_is_a_row(verl_core):
    assert set(verl_core.POLICY_LOSS_REGISTRY) - NOT_ROWS == set(VERL_POLICY_LOSSES) == set(CONFIGS)


@pytest.mark.parametrize("mode", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_is", [False, True])
def test_policy_losses_match_verl_values_gradients_and_metrics(verl_core, mode, seed, with_is):
    logp, old, adv, mask, isw = _inputs(seed)
    if mode == "geo_mean":  # verl supports sequence-level advantages only there
        adv = adv[:, :1].expand_as(adv).contiguous()
    grad = _assert_match(*_both(verl_core, mode, CONFIGS[mode], logp, old, adv, mask, isw if with_is else None,
                                seed=seed))  # fmt: skip
    assert (grad[~mask] == 0).all()  # masked tokens: no gradient (fully masked row 2 included)


@pytest.mark.parametrize("mode", ["vanilla", "gpg", "dro", "cispo", "dppo_tv", "dppo_kl", "kl_cov"])
@pytest.mark.parametrize("agg", ["token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_modes_match_verl(verl_core, mode, agg):
    logp, old, adv, mask, _ = _inputs(3)
    _assert_match(*_both(verl_core, mode, CONFIGS[mode], logp, old, adv, mask, agg=agg))


@pytest.mark.parametrize("mode", ["vanilla", "cispo", "gpg"])
def test_global_batch_arguments_match_verl(verl_core, mode):
    logp, old, adv, mask, _ = _inputs(4)
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum() * 2 + 3), global_batch_size=13.0,
                     loss_scale_factor=16)  # fmt: skip
    for agg in ("token-mean", "seq-mean-token-mean"):
        _assert_match(*_both(verl_core, mode, CONFIGS[mode], logp, old, adv, mask, agg=agg, global_batch=gb))


def test_ratio_clamp_and_dual_clip_at_extreme_log_ratios(verl_core):
    """verl's vanilla clamps the log-ratio to ±20 before exp (ppo_loss does not) and caps A<0 at
    −A·clip_ratio_c: at log-ratios of ±30 both must hold."""
    logp, old, adv, mask, _ = _inputs(5)
    old = logp.detach().clone()
    old[0, :3] = logp[0, :3] - 30.0
    old[1, :3] = logp[1, :3] + 30.0
    _assert_match(*_both(verl_core, "vanilla", CONFIGS["vanilla"], logp, old, adv, mask))


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_fully_masked_batch_gives_zero_loss_and_gradient(mode):
    logp, old, adv, mask, _ = _inputs(6)
    mask = torch.zeros_like(mask)
    logp = logp.clone()
    logp[0, 0] = float("nan")  # garbage at masked positions never reaches the loss
    x = logp.requires_grad_(True)
    loss, metrics = verl_policy_loss(x, old, adv, mask, loss_mode=mode, config=CONFIGS[mode])
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("mode", ["vanilla", "cispo", "dppo_kl", "geo_mean", "sapo"])
def test_fp32_matches_fp64(mode):
    logp, old, adv, mask, isw = _inputs(7)
    if mode == "geo_mean":
        adv = adv[:, :1].expand_as(adv).contiguous()
    cfg = CONFIGS[mode]
    x64 = logp.clone().requires_grad_(True)
    x32 = logp.float().requires_grad_(True)
    l64, _ = verl_policy_loss(x64, old, adv, mask, loss_mode=mode, config=cfg, rollout_is_weights=isw)
    l32, _ = verl_policy_loss(x32, old.float(), adv.float(), mask, loss_mode=mode, config=cfg,
                              rollout_is_weights=isw.float())  # fmt: skip
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=2e-6, atol=1e-7)
    l64.backward()
    l32.backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_mode="ppo"), ValueError, "loss_mode must be one of vanilla"),
    (dict(loss_mode="dro"), ValueError, "dro_beta"),
    (dict(loss_mode="dro", dro_beta=-1.0), ValueError, "dro_beta"),
    (dict(clip_ratio=-0.1), ValueError, "clip_ratio"),
    (dict(clip_ratio="0.2"), TypeError, "clip_ratio"),
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c"),
    (dict(tau_neg=0.0, loss_mode="sapo"), ValueError, "tau_neg"),
    (dict(clip_cov_ratio=0.0, loss_mode="clip_cov"), ValueError, "clip_cov_ratio"),
    (dict(cliprange=0.2), TypeError, "cliprange"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    (dict(semantics="trl"), ValueError, "semantics"),
    (dict(config=VerlPolicyConfig(), clip_ratio=0.1), TypeError, "config"),
])  # fmt: skip
def test_bad_arguments_are_named(kwargs, error, match):
    logp, old, adv, mask, _ = _inputs(8)
    with pytest.raises(error, match=match):
        verl_policy_loss(logp, old, adv, mask, **kwargs)


@pytest.mark.parametrize("name, bad, match", [
    ("old_logp", torch.zeros(6, 8, dtype=torch.float64), "old_logp must have the shape"),
    ("advantages", torch.zeros(5, dtype=torch.float64), "advantages must have shape"),
    ("mask", torch.ones(6, 9, 1), "mask must have the shape"),
    ("rollout_is_weights", torch.ones(6, 9, dtype=torch.int64), "rollout_is_weights"),
])  # fmt: skip
def test_bad_tensors_are_named(name, bad, match):
    logp, old, adv, mask, _ = _inputs(9)
    args = {"old_logp": old, "advantages": adv, "mask": mask, "rollout_is_weights": None}
    args[name] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        verl_policy_loss(logp, args["old_logp"], args["advantages"], args["mask"],
                         rollout_is_weights=args["rollout_is_weights"])  # fmt: skip


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_empty_batch_gives_zero(mode):
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    loss, _ = verl_policy_loss(x, x.detach(), torch.zeros(0, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.bool),
                               loss_mode=mode, config=CONFIGS[mode])  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 4)


# ---------------------------------------------------------------- the Triton row kernel (interpreter)
TRITON_ROWS = sorted(name for name, row in VERL_POLICY_LOSSES.items() if row.triton)


def _far_inputs(seed):
    """Ratios beyond the clip range both ways, and e² at every row's token 1 (the dual-clip cap)."""
    logp, old, adv, mask, isw = _inputs(seed, scale=1.5)
    old[:, 1] = logp[:, 1] - 2.0
    adv[:, 1] = -adv[:, 1].abs() * torch.tensor([1.0, -1.0] * 3, dtype=adv.dtype)
    return logp, old, adv, mask, isw


def test_the_token_separable_rows_with_a_kernel_term():
    """Every token-separable row runs on the row kernel."""
    assert TRITON_ROWS == sorted(name for name, row in VERL_POLICY_LOSSES.items() if row.token_separable)


@pytest.mark.parametrize("mode", TRITON_ROWS)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_triton_rows_match_fp64(mode, with_is, agg, triton_device):
    """The fused kernels (fp32) against the PyTorch rows in fp64: loss, gradient, metrics; with
    ratios beyond the clip range and the dual-clip cap (log-ratios up to ±4)."""
    logp, old, adv, mask, isw = _far_inputs(11)
    cfg = CONFIGS[mode]
    x64 = logp.clone().requires_grad_(True)
    l64, m64 = verl_policy_loss(x64, old, adv, mask, loss_mode=mode, config=cfg, loss_agg_mode=agg,
                                rollout_is_weights=isw if with_is else None, backend="torch")  # fmt: skip
    x32 = logp.float().to(triton_device).requires_grad_(True)
    dev = dict(device=triton_device, dtype=torch.float32)
    l32, m32 = verl_policy_loss(x32, old.to(**dev), adv.to(**dev), mask.to(triton_device), loss_mode=mode,
                                config=cfg, loss_agg_mode=agg, backend="triton",
                                rollout_is_weights=isw.to(**dev) if with_is else None)  # fmt: skip
    torch.testing.assert_close(l32.double().cpu(), l64, rtol=2e-6, atol=1e-7)
    assert set(m32) == set(m64)
    for name in m64:
        torch.testing.assert_close(m32[name].double().cpu(), m64[name], rtol=2e-6, atol=1e-7)
    l64.backward()
    l32.backward()
    torch.testing.assert_close(x32.grad.double().cpu(), x64.grad, rtol=2e-6, atol=1e-7)
    assert (x32.grad.cpu()[~mask] == 0).all()


def test_dual_clip_binds_in_the_triton_test_data(triton_device):
    """The data of ``test_triton_rows_match_fp64`` reaches the dual-clip cap (else the kernel's
    ``DUAL_CLIP`` branch would be untested)."""
    _, metrics = verl_policy_loss(*_far_inputs(11)[:4], loss_mode="vanilla", config=CONFIGS["vanilla"])
    assert metrics["actor/pg_clipfrac_lower"] > 0 and metrics["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("term_kw", [
    dict(kind="clipped", clip_c=2.5, eps_low=0.2, eps_high=0.3),
    dict(kind="cispo", ratio_min=0.7, eps_high=1.3),
    dict(kind="cispo", eps_high=2.0, trust_region="tv", region_low=0.05, region_high=0.1),
    dict(kind="cispo", eps_high=2.0, trust_region="binary_kl", region_low=0.01, region_high=0.05),
    dict(kind="cispo", ratio_min=1.0, eps_high=1.0, quad=0.3),
])  # fmt: skip
def test_row_engine_torch_and_triton_agree_on_the_verl_terms(term_kw, triton_device):
    """``clipped_policy.policy_rows_torch`` / ``policy_rows_triton`` with the verl options of
    ``PolicyTerm`` (dual clip, two-sided CISPO clamp, DPPO trust regions, DRO's quadratic term),
    with a KL term."""
    from alignkernels.losses.clipped_policy import PolicyTerm, TokenInputs, policy_rows_torch, policy_rows_triton

    logp, old, adv, mask, _ = _far_inputs(12)
    term = PolicyTerm(beta=0.05, **term_kw)
    ref = logp + 0.1

    def run(fn, dtype, device):
        x = torch.where(mask, logp, 0.0).to(device=device, dtype=dtype).requires_grad_(True)
        z = lambda t: torch.where(mask, t, 0.0).to(device=device, dtype=dtype)  # noqa: E731
        rows = fn(TokenInputs(x, z(old), z(ref), z(adv), mask.to(device)), term)
        rows["loss_sum"].sum().backward()
        return rows["loss_sum"].double().cpu(), x.grad.double().cpu()

    (l64, g64), (l32, g32) = run(policy_rows_torch, torch.float64, "cpu"), run(policy_rows_triton, torch.float32,
                                                                                triton_device)  # fmt: skip
    torch.testing.assert_close(l32, l64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g32, g64, rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------- from hidden states: the head paths
def _head_problem(seed=0, B=4, T=6, H=16, V=97, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype) * 0.6
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3).masked_fill(~mask, 0.0)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    return hidden, weight, ids, mask, old, adv


def _eager_head_loss(hidden, weight, ids, mask, old, adv, **kw):
    """fp64 oracle: full logits, log-softmax, gather, then the row's PyTorch formula."""
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    loss, metrics = verl_policy_loss(logp, old, adv, mask, backend="torch", **kw)
    return loss, metrics, torch.autograd.grad(loss, (h, w))


def _fused(hidden, weight, ids, mask, old, adv, head_path="auto", backend="torch", **kw):
    from alignkernels.losses.fused import fused_linear_verl_policy_loss

    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss, metrics = fused_linear_verl_policy_loss(h, w, ids, old, adv, mask, head_path=head_path, chunk_size=5,
                                                  backend=backend, **kw)  # fmt: skip
    return loss, metrics, torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_fused_head_matches_the_eager_fp64_oracle(mode):
    """Token-separable rows take the three-GEMM head (``auto``), the others four GEMMs; both give
    the eager fp64 loss, metrics and gradients w.r.t. hidden and weight."""
    hidden, weight, ids, mask, old, adv = _head_problem()
    if mode == "geo_mean":
        adv = adv[:, :1].expand_as(adv).contiguous()
    kw = dict(loss_mode=mode, config=CONFIGS[mode], loss_agg_mode="seq-mean-token-mean")
    torch.manual_seed(0)
    loss, metrics, grads = _fused(hidden, weight, ids, mask, old, adv, **kw)
    torch.manual_seed(0)
    e_loss, e_metrics, e_grads = _eager_head_loss(hidden, weight, ids, mask, old, adv, **kw)
    separable = VERL_POLICY_LOSSES[mode].token_separable
    assert metrics.pop("head_path") == ("three_gemm" if separable else "four_gemm")
    torch.testing.assert_close(loss, e_loss, rtol=1e-10, atol=1e-12)
    assert set(metrics) == set(e_metrics)
    for name in metrics:
        torch.testing.assert_close(metrics[name], e_metrics[name], rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    if not separable:
        with pytest.raises(ValueError, match=f"three_gemm.*loss_mode='{mode}'"):
            _fused(hidden, weight, ids, mask, old, adv, head_path="three_gemm", **kw)


@pytest.mark.parametrize("mode", ["vanilla", "dppo_kl"])
def test_fused_head_on_triton_matches_fp64(mode, triton_device):
    hidden, weight, ids, mask, old, adv = _head_problem(seed=1)
    kw = dict(loss_mode=mode, config=CONFIGS[mode])
    e_loss, _, e_grads = _eager_head_loss(hidden, weight, ids, mask, old, adv, **kw)
    f32 = [t.to(triton_device, torch.float32) if t.is_floating_point() else t.to(triton_device)
           for t in (hidden, weight, ids, mask, old, adv)]  # fmt: skip
    loss, metrics, grads = _fused(*f32, backend="triton", **kw)
    assert metrics["head_path"] == "three_gemm"
    torch.testing.assert_close(loss.double().cpu(), e_loss, rtol=1e-5, atol=1e-7)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g.double().cpu(), e, rtol=1e-5, atol=1e-6)
