"""verl's policy losses (``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``) pinned against
``alignkernels.losses.verl_policy.verl_policy_loss`` in fp64: values, gradients, metrics, fully
masked rows, rollout IS weights, every aggregation mode and the global-batch arguments. Skipped
without verl (the stand-ins of ``tests/frameworks/conftest.py`` let it import on CPU)."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.aggregation import GlobalBatch
from alignkernels.losses.verl_policy import (
    VERL_POLICY_LOSSES,
    RolloutCorrection,
    VerlPolicyConfig,
    verl_policy_loss,
    verl_rollout_correction,
)

# verl's token means divide by count + 1e-8: 1e-8 relative
CLOSE = dict(rtol=1e-7, atol=1e-10)
NOT_ROWS: set[str] = set()


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


def _verl_correction(c: RolloutCorrection) -> dict:
    """Our ``RolloutCorrection`` in verl's string formats (tuples as comma-separated lists)."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in c._asdict().items()}


def _verl_config(verl_core, cfg: VerlPolicyConfig, mode, global_batch=None):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config import ActorConfig, PolicyLossConfig

    extra = {} if cfg.clip_ratio_c is None else {"clip_ratio_c": cfg.clip_ratio_c}
    correction = RolloutCorrectionConfig(**_verl_correction(cfg.rollout_correction or RolloutCorrection()))
    pl = PolicyLossConfig(loss_mode=mode, clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb,
                          clip_cov_ub=cfg.clip_cov_ub, kl_cov_ratio=cfg.kl_cov_ratio, ppo_kl_coef=cfg.ppo_kl_coef,
                          dro_beta=cfg.dro_beta, rollout_correction=correction)  # fmt: skip
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


def _assert_match(ours, theirs, metrics_subset=False):
    """Loss, every metric, gradient; ``metrics_subset``: ours are a subset of verl's (bypass_mode's
    rollout-correction diagnostics: the comparable few), every ``actor/*`` one included."""
    (loss, metrics, x), (t_loss, t_metrics, t_x) = ours, theirs
    torch.testing.assert_close(loss, t_loss, **CLOSE)
    if metrics_subset:
        assert set(metrics) <= set(t_metrics)
        assert {m for m in metrics if m.startswith("actor/")} == {m for m in t_metrics if m.startswith("actor/")}
    else:
        assert set(metrics) == set(t_metrics)
    for name in metrics:  # verl's std: E[x²] − E[x]² over count + 1e-8, ~1e-5 off where it is 0 (losses/rollout_metrics.py)
        close = dict(CLOSE, atol=2e-5) if name.endswith("_std") else CLOSE
        torch.testing.assert_close(metrics[name].item(), float(t_metrics[name]), **close)
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
    "bypass_mode": VerlPolicyConfig(rollout_correction=RolloutCorrection(
        loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_mean_k3",
        rollout_rs_threshold=0.05)),
}
# bypass_mode computes its own IS weights (verl ignores rollout_is_weights there; ours refuses them)
WEIGHTED = sorted(set(CONFIGS) - {"bypass_mode"})


def test_every_registered_verl_policy_loss_is_a_row(verl_core):
    assert set(verl_core.POLICY_LOSS_REGISTRY) - NOT_ROWS == set(VERL_POLICY_LOSSES) == set(CONFIGS)


@pytest.mark.parametrize("mode", WEIGHTED)
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


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_global_batch_arguments_match_verl(verl_core, mode):
    logp, old, adv, mask, _ = _inputs(4)
    if mode == "geo_mean":  # sequence-level advantages; verl's geo_mean ignores the global batch
        adv = adv[:, :1].expand_as(adv).contiguous()
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum() * 2 + 3), global_batch_size=13.0,
                     loss_scale_factor=16)  # fmt: skip
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        _assert_match(*_both(verl_core, mode, CONFIGS[mode], logp, old, adv, mask, agg=agg, global_batch=gb, seed=4),
                      metrics_subset=mode == "bypass_mode")  # fmt: skip


# rows whose loss on a sequence reads other sequences: a batch covariance (clip_cov, kl_cov) or
# verl's plain mean over the micro-batch's sequences (geo_mean)
BATCH_COUPLED = {"clip_cov", "kl_cov", "geo_mean"}


@pytest.mark.parametrize("mode", sorted(set(CONFIGS) - BATCH_COUPLED))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"])
def test_micro_batches_sum_to_the_global_batch_loss(mode, agg):
    """Under the global batch's denominators (``dp_size`` ranks each with its own micro-batches), the
    micro-batch losses of every rank, divided by ``dp_size``, sum to the whole step's loss; the
    gradients likewise (a fully masked row included)."""
    logp, old, adv, mask, isw = _inputs(19, B=8, empty_rows=(2, 5))
    isw = None if mode == "bypass_mode" else isw
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum()), global_batch_size=float(mask.any(-1).sum()),
                     loss_scale_factor=9)  # fmt: skip
    x = logp.clone().requires_grad_(True)
    whole, _ = verl_policy_loss(x, old, adv, mask, loss_mode=mode, config=CONFIGS[mode], loss_agg_mode=agg,
                                rollout_is_weights=isw, semantics="verl",
                                global_batch=gb._replace(dp_size=1))  # fmt: skip
    whole.backward()
    y = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in torch.arange(8).chunk(4):  # 2 ranks x 2 micro-batches
        part, _ = verl_policy_loss(y[rows], old[rows], adv[rows], mask[rows], loss_mode=mode, config=CONFIGS[mode],
                                   loss_agg_mode=agg, rollout_is_weights=None if isw is None else isw[rows],
                                   semantics="verl", global_batch=gb)  # fmt: skip
        (part / gb.dp_size).backward()
        total = total + part.detach() / gb.dp_size
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-14)


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


# ------------------------------------------- bypass_mode: rollout IS weights and rejection sampling
BYPASS_CASES = {
    "ppo_clip_default": RolloutCorrection(),
    "ppo_clip_seq_max_k2": RolloutCorrection(rollout_rs="seq_max_k2", rollout_rs_threshold=0.3),
    "reinforce_seq_tis": RolloutCorrection(loss_type="reinforce"),
    "reinforce_token_tis": RolloutCorrection(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5),
    "reinforce_token_icepop_normalised": RolloutCorrection(loss_type="reinforce", rollout_is="token",
                                                           rollout_is_threshold="0.8_1.5",
                                                           rollout_is_batch_normalize=True),
    "reinforce_seq_normalised_two_rejections": RolloutCorrection(
        loss_type="reinforce", rollout_is_batch_normalize=True, rollout_rs="token_k1,seq_mean_k3",
        rollout_rs_threshold="0.5_2.0,0.05"),
    "reinforce_no_is_seq_sum_k1": RolloutCorrection(loss_type="reinforce", rollout_is=None, rollout_rs="seq_sum_k1",
                                                    rollout_rs_threshold=3.0),
    "reinforce_token_k2_k3": RolloutCorrection(loss_type="reinforce", rollout_is="token", rollout_rs=("token_k2",
                                               "seq_sum_k3"), rollout_rs_threshold=(0.1, 0.5)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BYPASS_CASES))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_bypass_mode_matches_verl(verl_core, case, agg):
    """verl ``compute_policy_loss_bypass_mode`` with its ``RolloutCorrectionConfig``: REINFORCE with
    token / sequence IS (truncated or IcePop, batch-normalised) and PPO-clip, under one or two rejection
    rules: loss, gradient, ``actor/*`` metrics and the rollout-correction metrics we return."""
    logp, old, adv, mask, _ = _inputs(13)
    cfg = VerlPolicyConfig(rollout_correction=BYPASS_CASES[case])
    grad = _assert_match(*_both(verl_core, "bypass_mode", cfg, logp, old, adv, mask, agg=agg), metrics_subset=True)
    assert (grad[~mask] == 0).all()
    _, metrics = verl_policy_loss(logp, old, adv, mask, loss_mode="bypass_mode", config=cfg)
    if BYPASS_CASES[case].rollout_rs is not None:  # the rejection binds on some tokens, not all
        assert 0 < metrics["rollout_corr/rollout_rs_masked_fraction"] < 0.9
        rejected = mask & (grad == 0) & (adv != 0)
        assert rejected.any()


@pytest.mark.parametrize("case", sorted(BYPASS_CASES))
def test_rollout_correction_matches_verl_helper(verl_core, case):
    """``verl_rollout_correction`` = verl ``compute_rollout_correction_and_rejection_mask``: IS weights,
    kept mask, metrics of the same names."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    logp, old, _, mask, _ = _inputs(14, scale=0.6)
    c = BYPASS_CASES[case]
    weights, kept, metrics = verl_rollout_correction(logp, old, mask, c)
    verl_c = _verl_correction(c)
    del verl_c["loss_type"]
    proto, t_mask, t_metrics = compute_rollout_correction_and_rejection_mask(logp, old, mask.to(logp.dtype), **verl_c)
    assert (kept == (t_mask != 0)).all()
    assert (weights is None) == (proto is None)
    if weights is not None:
        torch.testing.assert_close(weights, proto.batch["rollout_is_weights"], **CLOSE)
    assert set(metrics) == set(t_metrics)  # every diagnostic (was: the comparable few)
    for name in metrics:  # verl's std: E[x²] − E[x]² over count + 1e-8, ~1e-5 off where it is 0 (losses/rollout_metrics.py)
        close = dict(CLOSE, atol=2e-5) if name.endswith("_std") else CLOSE
        torch.testing.assert_close(metrics[name].item(), float(t_metrics[name]), **close)


def test_bypass_micro_batches_sum_to_the_global_batch_loss():
    """Rejection and token IS per micro-batch, global denominators: the micro-batch losses add up to
    the whole batch's loss (batch-normalised weights excepted: their mean is per batch, as verl)."""
    logp, old, adv, mask, _ = _inputs(15, B=8)
    cfg = VerlPolicyConfig(rollout_correction=BYPASS_CASES["reinforce_token_k2_k3"])
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        gb = GlobalBatch(batch_num_tokens=float(mask.sum()), global_batch_size=8.0, loss_scale_factor=9)
        whole, _ = verl_policy_loss(logp, old, adv, mask, loss_mode="bypass_mode", config=cfg, loss_agg_mode=agg,
                                    global_batch=gb)  # fmt: skip
        parts = sum(verl_policy_loss(logp[s], old[s], adv[s], mask[s], loss_mode="bypass_mode", config=cfg,
                                     loss_agg_mode=agg, global_batch=gb)[0] for s in (slice(0, 3), slice(3, 8)))  # fmt: skip
        torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["reinforce_seq_normalised_two_rejections", "ppo_clip_seq_max_k2"])
def test_bypass_mode_fp32_matches_fp64(case):
    logp, old, adv, mask, _ = _inputs(16)
    cfg = VerlPolicyConfig(rollout_correction=BYPASS_CASES[case])
    x64, x32 = logp.clone().requires_grad_(True), logp.float().requires_grad_(True)
    l64, m64 = verl_policy_loss(x64, old, adv, mask, loss_mode="bypass_mode", config=cfg)
    l32, m32 = verl_policy_loss(x32, old.float(), adv.float(), mask, loss_mode="bypass_mode", config=cfg)
    torch.testing.assert_close(l32.double(), l64, rtol=2e-6, atol=1e-7)
    for name in m64:
        torch.testing.assert_close(m32[name].double(), m64[name], rtol=2e-6, atol=1e-7)
    l64.backward()
    l32.backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("correction, error, match", [
    (RolloutCorrection(loss_type="pg"), ValueError, "rollout_correction.loss_type must be one of ppo_clip"),
    (RolloutCorrection(rollout_is="seq"), ValueError, "rollout_correction.rollout_is must be one of token"),
    (RolloutCorrection(rollout_is_threshold="a_b"), ValueError, "rollout_is_threshold"),
    (RolloutCorrection(rollout_is_threshold="2.0_0.5"), ValueError, "rollout_is_threshold lower bound"),
    (RolloutCorrection(rollout_is_threshold=-1.0), ValueError, "rollout_is_threshold bounds"),
    (RolloutCorrection(rollout_is_threshold=True), TypeError, "rollout_is_threshold"),
    (RolloutCorrection(rollout_is_batch_normalize="yes"), TypeError, "rollout_is_batch_normalize"),
    (RolloutCorrection(rollout_rs="token_k4", rollout_rs_threshold=1.0), ValueError, "rollout_rs must be one of"),
    (RolloutCorrection(rollout_rs="seq_max_k1", rollout_rs_threshold=1.0), ValueError, "rollout_rs must be one of"),
    (RolloutCorrection(rollout_rs=" , ", rollout_rs_threshold=1.0), ValueError, "rollout_rs names no option"),
    (RolloutCorrection(rollout_rs=["token_k2"], rollout_rs_threshold=1.0), TypeError, "rollout_rs must be a str"),
    (RolloutCorrection(rollout_rs="token_k2"), ValueError, "rollout_rs_threshold is required"),
    (RolloutCorrection(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"), ValueError, "upper bound only"),
    (RolloutCorrection(rollout_rs="token_k2,token_k3,seq_max_k2", rollout_rs_threshold="1,2"), ValueError,
     "one threshold or one per option"),
    (RolloutCorrection(rollout_rs="token_k1", rollout_rs_threshold=0.0), ValueError, "token_k1"),
    ({"loss_type": "reinforce"}, TypeError, "rollout_correction must be a RolloutCorrection"),
])  # fmt: skip
def test_bypass_mode_bad_corrections_are_named(correction, error, match):
    logp, old, adv, mask, _ = _inputs(17)
    with pytest.raises(error, match=match):
        verl_policy_loss(logp, old, adv, mask, loss_mode="bypass_mode", rollout_correction=correction)


def test_bypass_mode_refuses_given_is_weights():
    """verl ignores ``rollout_is_weights`` in bypass_mode (it computes its own): ours says so."""
    logp, old, adv, mask, isw = _inputs(18)
    with pytest.raises(ValueError, match="rollout_is_weights.*bypass_mode"):
        verl_policy_loss(logp, old, adv, mask, loss_mode="bypass_mode", rollout_is_weights=isw)


# ------------------------------------------------- entropy bonus: the loss's own aggregation mode
def _entropy_of(logits):
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


@pytest.mark.parametrize("mode", ["vanilla", "sapo", "bypass_mode"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_entropy_bonus_matches_verl(verl_core, mode, agg):
    """verl's actor loss (``verl.workers.utils.losses.ppo_loss``): ``pg_loss − entropy_coeff ·
    agg_loss(entropy, response_mask, loss_agg_mode)``, verl's entropy from ``compute_entropy_loss``
    (logits): values and gradients w.r.t. logp and the logits."""
    logp, old, adv, mask, _ = _inputs(20)
    logits = torch.randn(*mask.shape, 11, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    cfg = CONFIGS[mode]._replace(entropy_coeff=0.03)
    x, z = logp.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours, metrics = verl_policy_loss(x, old, adv, mask, loss_mode=mode, config=cfg, loss_agg_mode=agg,
                                     entropy=_entropy_of(z))  # fmt: skip
    _, (theirs_pg, _, t_x) = _both(verl_core, mode, CONFIGS[mode], logp, old, adv, mask, agg=agg)
    t_z = logits.clone().requires_grad_(True)
    t_entropy = verl_core.compute_entropy_loss(t_z, mask.to(logp.dtype), loss_agg_mode=agg)
    theirs = theirs_pg - 0.03 * t_entropy
    torch.testing.assert_close(ours, theirs, **CLOSE)
    torch.testing.assert_close(metrics["actor/entropy_loss"], t_entropy.detach(), **CLOSE)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x.grad, t_x.grad, **CLOSE)
    torch.testing.assert_close(z.grad, t_z.grad, **CLOSE)
    assert (z.grad[~mask] == 0).all()


def test_entropy_bonus_under_the_global_batch_matches_verl(verl_core):
    """With the global batch, verl aggregates the entropy with ``config.global_batch_info`` too."""
    logp, old, adv, mask, _ = _inputs(21)
    entropy = torch.rand(*mask.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    entropy[~mask] = float("nan")  # padding never reaches the loss
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum() * 2 + 3), global_batch_size=13.0,
                     loss_scale_factor=16)  # fmt: skip
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        cfg = CONFIGS["cispo"]._replace(entropy_coeff=0.1)
        ours, metrics = verl_policy_loss(logp, old, adv, mask, loss_mode="cispo", config=cfg, loss_agg_mode=agg,
                                         global_batch=gb, entropy=entropy)  # fmt: skip
        pg, _ = verl_core.get_policy_loss_fn("cispo")(old, logp, adv, mask.to(logp.dtype), agg,
                                                     _verl_config(verl_core, cfg, "cispo", gb), None)  # fmt: skip
        ent = verl_core.agg_loss(torch.nan_to_num(entropy), mask.to(logp.dtype), agg, **gb._asdict())
        torch.testing.assert_close(ours, pg - 0.1 * ent, **CLOSE)
        torch.testing.assert_close(metrics["actor/entropy_loss"], ent, **CLOSE)


def test_entropy_bonus_needs_entropy_and_names_it():
    logp, old, adv, mask, _ = _inputs(22)
    with pytest.raises(ValueError, match="entropy .* required when entropy_coeff"):
        verl_policy_loss(logp, old, adv, mask, entropy_coeff=0.01)
    with pytest.raises(ValueError, match="entropy must have the shape"):
        verl_policy_loss(logp, old, adv, mask, entropy=torch.zeros(6, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="entropy_coeff"):
        verl_policy_loss(logp, old, adv, mask, entropy=logp, entropy_coeff="0.1")


def test_entropy_bonus_on_the_triton_rows(triton_device):
    logp, old, adv, mask, _ = _far_inputs(23)
    entropy = torch.rand(*mask.shape, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    cfg = CONFIGS["vanilla"]._replace(entropy_coeff=0.05)
    e64 = entropy.clone().requires_grad_(True)
    l64, m64 = verl_policy_loss(logp, old, adv, mask, config=cfg, entropy=e64, backend="torch")
    dev = dict(device=triton_device, dtype=torch.float32)
    e32 = entropy.to(**dev).requires_grad_(True)
    l32, m32 = verl_policy_loss(logp.to(**dev), old.to(**dev), adv.to(**dev), mask.to(triton_device), config=cfg,
                                entropy=e32, backend="triton")  # fmt: skip
    torch.testing.assert_close(l32.double().cpu(), l64, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(m32["actor/entropy_loss"].double().cpu(), m64["actor/entropy_loss"], rtol=2e-6, atol=1e-7)
    l64.backward()
    l32.backward()
    torch.testing.assert_close(e32.grad.double().cpu(), e64.grad, rtol=2e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore:.*compute_policy_loss' is deprecated:FutureWarning")
@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean"])
def test_ppo_loss_dual_clip_matches_verl_compute_policy_loss(verl_core, agg):
    """verl's legacy ``compute_policy_loss(..., clip_ratio_c)`` is ``ppo_loss(clip_ratio_c=…)`` (no
    fully masked row: ``ppo_loss`` aggregates with the classic semantics) and ``verl_policy_loss``'s
    ``vanilla``: loss, clip fractions, gradient."""
    from alignkernels.losses.ppo import ppo_loss

    logp, old, adv, mask, _ = _far_inputs(24)
    mask[2, 0] = True  # no fully masked row
    x, y, z = (logp.clone().requires_grad_(True) for _ in range(3))
    ours, metrics = ppo_loss(x, old, adv, mask, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=2.5,
                             loss_agg_mode=agg)  # fmt: skip
    rows, _ = verl_policy_loss(z, old, adv, mask, config=VerlPolicyConfig(clip_ratio_low=0.2, clip_ratio_high=0.28,
                                                                          clip_ratio_c=2.5), loss_agg_mode=agg)  # fmt: skip
    theirs, clipfrac, _, clipfrac_lower = verl_core.compute_policy_loss(old, y, adv, mask.to(logp.dtype),
                                                                        cliprange_low=0.2, cliprange_high=0.28,
                                                                        clip_ratio_c=2.5, loss_agg_mode=agg)  # fmt: skip
    assert float(clipfrac_lower) > 0  # the dual clip binds
    for value in (ours, rows):
        torch.testing.assert_close(value, theirs, **CLOSE)
    torch.testing.assert_close(metrics["policy/clipfrac_avg"], clipfrac, **CLOSE)
    torch.testing.assert_close(metrics["policy/clipfrac_lower"], clipfrac_lower, check_dtype=False, **CLOSE)
    for value in (ours, rows, theirs):
        value.backward()
    torch.testing.assert_close(x.grad, y.grad, **CLOSE)
    torch.testing.assert_close(z.grad, y.grad, **CLOSE)
