"""``alignkernels.integrations.verl.apply(losses=True)`` against verl's stock losses (verl 0.9.1, CPU, fp64).

For every ``POLICY_LOSS_REGISTRY`` name that is swapped, ``get_policy_loss_fn(name)`` after
:func:`apply` is called exactly as verl's actor calls it (keywords, verl's real ``ActorConfig`` with
its ``global_batch_info``) next to the stock function captured before: loss, gradient w.r.t.
``log_prob`` and metrics (keys, Python floats) agree to 1e-7 relative (verl's ``+1e-8`` in its
token-mean denominators). Also ``agg_loss`` / ``kl_penalty`` / ``compute_value_loss`` through their
by-name bindings, ``bypass_mode`` reading verl's ``rollout_correction`` config, the exact restore of
the registry (same dict, same functions), atomicity, and the log line.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("verl")

import verl.trainer.ppo.core_algos as core_algos  # noqa: E402
import verl.workers.utils.losses as verl_worker_losses  # noqa: E402
from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import alignkernels.integrations.verl as ak_verl  # noqa: E402
from alignkernels.losses.verl_policy import VERL_POLICY_LOSSES  # noqa: E402

STOCK_REGISTRY = dict(core_algos.POLICY_LOSS_REGISTRY)
STOCK = {"agg_loss": core_algos.agg_loss, "kl_penalty": core_algos.kl_penalty,
         "compute_policy_loss_vanilla": core_algos.compute_policy_loss_vanilla,
         "compute_value_loss": core_algos.compute_value_loss}  # fmt: skip
SWAPPED = sorted(set(STOCK_REGISTRY) & set(VERL_POLICY_LOSSES))
CLOSE = dict(rtol=1e-7, atol=1e-10)

# verl's config per mode: values that make every clip / selection rule bind on the test data
ACTOR = {
    "vanilla": dict(clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5),
    "gspo": dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
    "sapo": dict(tau_pos=1.2, tau_neg=1.5),
    "gpg": {},
    "clip_cov": dict(policy_loss=dict(clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0)),
    "kl_cov": dict(policy_loss=dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5)),
    "geo_mean": dict(clip_ratio_low=0.4, clip_ratio_high=0.3),
    "dro": dict(policy_loss=dict(dro_beta=0.3)),
    "cispo": dict(clip_ratio_low=0.2, clip_ratio_high=0.3),
    "dppo_tv": dict(clip_ratio=0.1),  # clip_ratio_c: ActorConfig's 3.0, read through config.get
    "dppo_kl": dict(clip_ratio_low=0.02, clip_ratio_high=0.05, clip_ratio_c=2.0),
    "bypass_mode": dict(clip_ratio=0.2, policy_loss=dict(rollout_correction=RolloutCorrectionConfig(
        loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_mean_k3",
        rollout_rs_threshold=0.05))),
}



def _config(mode, global_batch_info=None, loss_scale_factor=None, **policy_loss):
    kw = dict(ACTOR[mode])
    kw["policy_loss"] = PolicyLossConfig(loss_mode=mode, **{**kw.pop("policy_loss", {}), **policy_loss})
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **kw)
    if global_batch_info:
        actor.global_batch_info.update(global_batch_info, loss_scale_factor=loss_scale_factor)
    return actor


def _inputs(seed=0, B=6, T=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2.0 - 0.05
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False  # a fully masked sequence
    isw = torch.rand(B, T, generator=g, dtype=dtype) + 0.5
    return logp, old, adv, mask, isw


def _call(fn, mode, logp, old, adv, mask, isw, agg, config, seed):
    x = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)  # clip_cov draws from the default generator
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=agg,
                       config=config, rollout_is_weights=isw)  # fmt: skip
    loss.backward()
    return loss.detach(), metrics, x.grad


@pytest.mark.parametrize("mode", SWAPPED)
@pytest.mark.parametrize("with_is, agg, global_batch", [
    (False, "token-mean", False),
    (True, "seq-mean-token-mean", False),
    (True, "token-mean", True),
    (False, "seq-mean-token-sum-norm", True),
])  # fmt: skip
def test_patched_registry_entry_matches_stock(mode, with_is, agg, global_batch):
    logp, old, adv, mask, isw = _inputs(seed=len(mode))
    if mode == "geo_mean":  # verl supports sequence-level advantages only there
        adv = adv[:, :1].expand_as(adv).contiguous()
    info = dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=13) if global_batch else None
    config = _config(mode, info, loss_scale_factor=16 if global_batch else None)
    args = (mode, logp, old, adv, mask, isw if with_is else None, agg, config, 7)
    stock = _call(STOCK_REGISTRY[mode], *args)
    with ak_verl.apply(losses=True):
        patched_fn = core_algos.get_policy_loss_fn(mode)
        assert patched_fn is not STOCK_REGISTRY[mode]
        ours = _call(patched_fn, *args)
        assert ak_verl.adapter_calls() == 1
    torch.testing.assert_close(ours[0], stock[0], **CLOSE)
    assert ours[0].dtype == stock[0].dtype
    _assert_metrics(ours[1], stock[1], mode)
    torch.testing.assert_close(ours[2], stock[2], **CLOSE)


def _assert_metrics(ours, stock, mode):
    """Same keys (``bypass_mode``: every ``actor/*`` key and a subset of verl's ``rollout_corr/*``
    diagnostics), Python floats, values to 1e-7."""
    if mode == "bypass_mode":
        assert set(ours) <= set(stock) and {"rollout_corr/kl", "rollout_corr/k3_kl"} <= set(ours)
        assert {n for n in ours if n.startswith("actor/")} == {n for n in stock if n.startswith("actor/")}
    else:
        assert set(ours) == set(stock)
    for name, value in ours.items():
        assert isinstance(value, float)
        assert math.isclose(value, float(stock[name]), rel_tol=1e-7, abs_tol=1e-10), (name, value, stock[name])


BYPASS = {  # verl's RolloutCorrectionConfig fields; every IS level, rejection level and loss type
    "ppo_clip_default": dict(),
    "ppo_clip_seq_max_k2": dict(rollout_rs="seq_max_k2", rollout_rs_threshold=0.3),
    "reinforce_sequence_tis": dict(loss_type="reinforce"),
    "reinforce_token_icepop_normalised": dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold="0.8_1.5",
                                              rollout_is_batch_normalize=True),
    "reinforce_two_rejections": dict(loss_type="reinforce", rollout_rs="token_k1,seq_mean_k3",
                                     rollout_rs_threshold="0.5_2.0,0.05"),
    "reinforce_no_is_seq_sum_k1": dict(loss_type="reinforce", rollout_is=None, rollout_rs="seq_sum_k1",
                                       rollout_rs_threshold=3.0),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BYPASS))
@pytest.mark.parametrize("agg, global_batch", [("token-mean", False), ("seq-mean-token-sum", True)])
def test_patched_bypass_mode_reads_verl_rollout_correction(case, agg, global_batch):
    """``POLICY_LOSS_REGISTRY["bypass_mode"]`` after apply reads ``config.policy_loss.rollout_correction``
    as verl's does (IS level and bounds, normalisation, rejection options, loss type) and ignores
    ``rollout_is_weights`` as verl's does."""
    logp, old, adv, mask, isw = _inputs(seed=len(case))
    old[0, 1] = logp[0, 1] - 1.5  # a ratio e^1.5 in row 0: truncation, IcePop and rejection bind there
    info = dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=13) if global_batch else None
    config = _config("bypass_mode", info, rollout_correction=RolloutCorrectionConfig(**BYPASS[case]))
    args = ("bypass_mode", logp, old, adv, mask, isw, agg, config, 0)
    stock = _call(STOCK_REGISTRY["bypass_mode"], *args)
    with ak_verl.apply(losses=True):
        ours = _call(core_algos.get_policy_loss_fn("bypass_mode"), *args)
    torch.testing.assert_close(ours[0], stock[0], **CLOSE)
    _assert_metrics(ours[1], stock[1], "bypass_mode")
    torch.testing.assert_close(ours[2], stock[2], **CLOSE)


def test_bypass_mode_without_rollout_correction_is_named():
    logp, old, adv, mask, _ = _inputs(2)
    config = _config("bypass_mode", rollout_correction=None)
    with pytest.raises(ValueError, match="rollout_correction"):
        STOCK_REGISTRY["bypass_mode"](old, logp, adv, mask, "token-mean", config)
    with ak_verl.apply(losses=True):
        with pytest.raises(ValueError, match="config.policy_loss.rollout_correction"):
            core_algos.get_policy_loss_fn("bypass_mode")(old, logp, adv, mask, "token-mean", config)


def _value_inputs(seed=0, B=6, T=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=dtype)
    vpreds = old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)  # beyond ±0.2 of old often: the clip binds
    returns = old + torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False  # a fully masked sequence
    return vpreds, returns, old, mask


def _value_call(fn, vpreds, returns, old, mask, kw):
    x = vpreds.clone().requires_grad_(True)
    loss, clipfrac = fn(vpreds=x, returns=returns, values=old, response_mask=mask, **kw)
    loss.backward()
    return loss.detach(), clipfrac, x.grad


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])  # fmt: skip
@pytest.mark.parametrize("global_batch", [False, True])
def test_compute_value_loss_matches_stock_through_the_by_name_binding(agg, global_batch):
    """``verl/workers/utils/losses.py`` calls ``compute_value_loss`` by name: after apply it is ours
    (``losses/value.py`` ``value_loss``, ``semantics="verl"``), loss, gradient and clip fraction as stock."""
    vpreds, returns, old, mask = _value_inputs(len(agg))
    kw = dict(cliprange_value=0.2, loss_agg_mode=agg)
    if global_batch:
        kw.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=13, loss_scale_factor=16)
    stock = _value_call(STOCK["compute_value_loss"], vpreds, returns, old, mask, kw)
    with ak_verl.apply(losses=True):
        assert verl_worker_losses.compute_value_loss is not STOCK["compute_value_loss"]
        ours = _value_call(verl_worker_losses.compute_value_loss, vpreds, returns, old, mask, kw)
        assert ak_verl.adapter_calls() == 1
    torch.testing.assert_close(ours[0], stock[0], **CLOSE)
    assert ours[0].dtype == stock[0].dtype and ours[1].dtype == stock[1].dtype == torch.float32
    assert 0 < stock[1].item() < 1
    torch.testing.assert_close(ours[1], stock[1], rtol=1e-6, atol=1e-7)  # fp32 in both
    torch.testing.assert_close(ours[2], stock[2], **CLOSE)


def test_compute_value_loss_fully_masked_gives_zero_where_stock_gives_nan():
    vpreds, returns, old, mask = _value_inputs(1)
    mask = torch.zeros_like(mask)
    stock, _ = STOCK["compute_value_loss"](vpreds, returns, old, mask, 0.2)
    assert torch.isnan(stock)
    with ak_verl.apply(losses=True):
        ours = _value_call(verl_worker_losses.compute_value_loss, vpreds, returns, old, mask, dict(cliprange_value=0.2))
    assert ours[0].item() == 0.0 and ours[1].item() == 0.0 and (ours[2] == 0).all()


@pytest.mark.parametrize("mode", ["vanilla", "cispo", "dppo_kl"])
def test_apply_backend_reaches_the_policy_loss_rows(mode, triton_device, monkeypatch):
    """``apply(losses=True, backend="triton")``: the token-separable rows run the fused row kernel
    (fp32, the interpreter on CPU) and still match verl's stock function in fp64."""
    import alignkernels.losses.verl_policy as verl_policy

    kernel_calls = []
    real = verl_policy.policy_rows_triton
    monkeypatch.setattr(verl_policy, "policy_rows_triton", lambda *a, **k: kernel_calls.append(1) or real(*a, **k))
    logp, old, adv, mask, isw = (t.to(triton_device) for t in _inputs(seed=9))
    config = _config(mode)
    stock = _call(STOCK_REGISTRY[mode], mode, logp, old, adv, mask, isw, "token-mean", config, 0)
    f32 = [t.float() for t in (logp, old, adv)]
    with ak_verl.apply(losses=True, backend="triton"):
        ours = _call(core_algos.get_policy_loss_fn(mode), mode, f32[0], f32[1], f32[2], mask, isw.float(),
                     "token-mean", config, 0)  # fmt: skip
    assert ours[0].dtype == torch.float32 and kernel_calls == [1]
    torch.testing.assert_close(ours[0].double(), stock[0], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours[2].double(), stock[2], rtol=2e-6, atol=1e-7)
    for name, value in stock[1].items():
        assert math.isclose(ours[1][name], value, rel_tol=2e-6, abs_tol=1e-7)


def test_every_registry_entry_is_swapped_and_the_log_names_nothing_stock(caplog):
    assert SWAPPED == sorted(VERL_POLICY_LOSSES)  # verl 0.9.1: every row is registered
    with caplog.at_level(logging.INFO, logger="alignkernels.integrations.verl"):
        ak_verl.apply(losses=True)
    lines = [r.getMessage() for r in caplog.records if "verl losses swapped" in r.getMessage()]
    assert len(lines) == 1 and all(name in lines[0] for name in SWAPPED)
    assert "compute_value_loss" in lines[0] and lines[0].endswith("left stock: none")
    registry = core_algos.POLICY_LOSS_REGISTRY
    assert {n for n in registry if registry[n] is not STOCK_REGISTRY[n]} == set(SWAPPED) == set(STOCK_REGISTRY)
    # the by-name bindings: bypass_mode's PPO-clip branch calls compute_policy_loss_vanilla by name
    assert core_algos.compute_policy_loss_vanilla is registry["vanilla"]
    assert verl_worker_losses.agg_loss is core_algos.agg_loss is not STOCK["agg_loss"]
    assert verl_worker_losses.kl_penalty is core_algos.kl_penalty is not STOCK["kl_penalty"]
    assert verl_worker_losses.compute_value_loss is core_algos.compute_value_loss is not STOCK["compute_value_loss"]
    with caplog.at_level(logging.INFO, logger="alignkernels.integrations.verl"):
        ak_verl.apply(losses=True)  # idempotent: nothing re-installed, no second line
    assert sum("verl losses swapped" in r.getMessage() for r in caplog.records) == 1


def _assert_stock():
    registry = core_algos.POLICY_LOSS_REGISTRY
    assert list(registry) == list(STOCK_REGISTRY)
    assert all(registry[n] is STOCK_REGISTRY[n] for n in STOCK_REGISTRY)
    for name, fn in STOCK.items():
        assert getattr(core_algos, name) is fn
    assert verl_worker_losses.agg_loss is STOCK["agg_loss"] and verl_worker_losses.kl_penalty is STOCK["kl_penalty"]
    assert verl_worker_losses.compute_value_loss is STOCK["compute_value_loss"]


def test_remove_restores_the_registry_exactly():
    registry = core_algos.POLICY_LOSS_REGISTRY
    ak_verl.apply(losses=True)
    ak_verl.remove()
    assert core_algos.POLICY_LOSS_REGISTRY is registry
    _assert_stock()
    ak_verl.apply(losses=True)
    ak_verl.apply()  # losses off: re-installed without them
    assert ak_verl.is_applied()
    _assert_stock()
    ak_verl.apply(losses=True)
    assert core_algos.POLICY_LOSS_REGISTRY["vanilla"] is not STOCK_REGISTRY["vanilla"]


class _FailingRegistry(dict):
    def __setitem__(self, key, value):
        if key == "cispo" and value is not STOCK_REGISTRY["cispo"]:
            raise RuntimeError("registry refuses cispo")
        super().__setitem__(key, value)


def test_a_failed_apply_leaves_the_registry_untouched(monkeypatch):
    failing = _FailingRegistry(STOCK_REGISTRY)
    monkeypatch.setattr(core_algos, "POLICY_LOSS_REGISTRY", failing)
    with pytest.raises(RuntimeError, match="refuses cispo"):
        ak_verl.apply(losses=True)
    assert not ak_verl.is_applied()
    assert all(failing[n] is STOCK_REGISTRY[n] for n in STOCK_REGISTRY)  # entries set before cispo: put back
    monkeypatch.undo()
    _assert_stock()
    with pytest.raises(TypeError, match="losses"):
        ak_verl.apply(losses="yes")
    _assert_stock()


@pytest.mark.parametrize("name", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+", "abs+"])
def test_kl_penalty_matches_stock_through_the_by_name_binding(name):
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    ref[0, :2] = logp[0, :2].detach() - 25.0  # verl's ±20 clamp and its 10 cap bind
    stock = STOCK["kl_penalty"](logprob=logp, ref_logprob=ref, kl_penalty=name)
    (stock_grad,) = torch.autograd.grad(stock.sum(), logp)
    with ak_verl.apply(losses=True):
        ours = verl_worker_losses.kl_penalty(logprob=logp, ref_logprob=ref, kl_penalty=name)
    (ours_grad,) = torch.autograd.grad(ours.sum(), logp)
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, stock_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])  # fmt: skip
@pytest.mark.parametrize("global_batch", [False, True])
def test_agg_loss_matches_stock_through_the_by_name_binding(mode, global_batch):
    logp, _, _, mask, _ = _inputs(5)
    kw = dict(dp_size=2, batch_num_tokens=int(mask.sum()) + 4, global_batch_size=9, loss_scale_factor=12) \
        if global_batch else {}  # fmt: skip
    x = logp.clone().requires_grad_(True)
    stock = STOCK["agg_loss"](loss_mat=x, loss_mask=mask, loss_agg_mode=mode, **kw)
    (stock_grad,) = torch.autograd.grad(stock, x)
    with ak_verl.apply(losses=True):
        ours = verl_worker_losses.agg_loss(loss_mat=x, loss_mask=mask, loss_agg_mode=mode, **kw)
    (ours_grad,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours, stock, **CLOSE)
    torch.testing.assert_close(ours_grad, stock_grad, **CLOSE)


def test_fully_masked_micro_batch_gives_zero_where_stock_gives_nan():
    logp, old, adv, mask, _ = _inputs(6)
    mask = torch.zeros_like(mask)
    config = _config("vanilla")
    stock, _ = STOCK_REGISTRY["vanilla"](old, logp, adv, mask, "token-mean", config)
    assert torch.isnan(stock)
    with ak_verl.apply(losses=True):
        x = logp.clone().requires_grad_(True)
        ours, metrics = core_algos.get_policy_loss_fn("vanilla")(old, x, adv, mask, "token-mean", config)
        ours.backward()
    assert ours.item() == 0.0 and (x.grad == 0).all() and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("config, error, match", [
    (None, ValueError, "config"),
    (object(), TypeError, "config"),
    ("global_batch_info", TypeError, "global_batch_info"),
])  # fmt: skip
def test_bad_config_is_named(config, error, match):
    logp, old, adv, mask, _ = _inputs(8)
    if config == "global_batch_info":
        config = _config("vanilla")
        config.global_batch_info.update(dp_sizes=2)
    with ak_verl.apply(losses=True):
        with pytest.raises(error, match=match):
            core_algos.get_policy_loss_fn("vanilla")(old, logp, adv, mask, "token-mean", config)


# ---------------------------------------------------------------------------------------------
# apply(batch_invariant=, head_precision=): the consistency switches reach every seam's op
# ---------------------------------------------------------------------------------------------
import verl.utils.experimental.torch_functional as verl_exp  # noqa: E402
import verl.utils.kernel.linear_cross_entropy as verl_lce  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402


def _row_alone_and_in_a_batch(fn, row_inputs, batch_inputs, at):
    """Outputs and input-gradient of row ``at`` of ``batch_inputs`` (whose row ``at`` is ``row_inputs``)
    and of ``row_inputs`` alone."""
    results = []
    for inputs in (row_inputs, batch_inputs):
        x = inputs[0].clone().requires_grad_(True)
        outs = fn(x, *inputs[1:])
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(o.sum() for o in outs).backward()
        pick = (lambda t: t) if inputs is row_inputs else (lambda t: t[at : at + 1])
        results.append([pick(o.detach()) for o in outs] + [pick(x.grad)])
    return results


def _logits_problem(n=37, V=157, at=13):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, V, generator=g) * 4
    labels = torch.randint(0, V, (n,), generator=g)
    return (logits[at : at + 1], labels[at : at + 1]), (logits, labels), at


def _head_problem(n=41, H=24, V=173, at=29):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, (n,), generator=g)
    return (hidden[at : at + 1], weight, ids[at : at + 1]), (hidden, weight, ids), at


SEAMS = {
    "logprobs_from_logits": (lambda lg, lb: verl_F.logprobs_from_logits(lg, lb), _logits_problem),
    "entropy_from_logits": (lambda lg, lb: verl_F.entropy_from_logits(lg), _logits_problem),
    "FusedLinearForPPO": (lambda h, w, i: verl_exp.FusedLinearForPPO()(h, w, i, temperature=0.7), _head_problem),
    "linear_cross_entropy": (lambda h, w, i: verl_lce.linear_cross_entropy(h, w, i, 0.7), _head_problem),
}


@pytest.mark.parametrize("seam", sorted(SEAMS))
def test_batch_invariant_seams_give_a_row_the_same_bits_alone_and_in_a_batch(seam):
    fn, problem = SEAMS[seam]
    row, batch, at = problem()
    ak_verl.apply(batch_invariant=True, backend="torch")
    alone, inside = _row_alone_and_in_a_batch(fn, row, batch, at)
    assert ak_verl.adapter_calls() == 2
    for a, b in zip(alone, inside):
        assert torch.equal(a, b)


class _Spy:
    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(ak_verl, name)
        monkeypatch.setattr(ak_verl, name, lambda *a, **k: self.calls.append(k) or real(*a, **k))


@pytest.mark.parametrize("seam", sorted(SEAMS))
def test_the_switches_reach_the_op(monkeypatch, seam):
    fn, problem = SEAMS[seam]
    fused = problem is _head_problem
    spy = _Spy(monkeypatch, "linear_logprobs" if fused else "token_logprobs")
    ak_verl.apply(batch_invariant=True, head_precision="fp32" if fused else "input")
    fn(*problem()[0])
    assert spy.calls and spy.calls[-1]["batch_invariant"] is True
    if fused:
        assert spy.calls[-1]["head_precision"] == "fp32"


@pytest.mark.parametrize("seam", ["logprobs_from_logits", "entropy_from_logits"])
def test_head_precision_is_refused_where_the_logits_exist_already(seam):
    fn, problem = SEAMS[seam]
    ak_verl.apply(head_precision="tf32")
    with pytest.raises(ValueError, match=f"head_precision='tf32'.*{seam}.*use_fused_kernels"):
        fn(*problem()[0])


def test_env_forms_of_the_switches(monkeypatch):
    monkeypatch.setenv("ALIGNKERNELS_VERL", "1")
    monkeypatch.setenv("ALIGNKERNELS_VERL_LOSSES", "1")
    monkeypatch.setenv("ALIGNKERNELS_VERL_BATCH_INVARIANT", "true")
    monkeypatch.setenv("ALIGNKERNELS_VERL_HEAD_PRECISION", "fp32")
    ak_verl.worker_setup()
    opts = ak_verl.options()
    assert (opts.losses, opts.batch_invariant, opts.head_precision) == (True, True, "fp32")
    assert core_algos.POLICY_LOSS_REGISTRY["vanilla"] is not STOCK_REGISTRY["vanilla"]
    ak_verl.remove()
    for name, bad in (("ALIGNKERNELS_VERL_HEAD_PRECISION", "fp16"), ("ALIGNKERNELS_VERL_BATCH_INVARIANT", "maybe"),
                      ("ALIGNKERNELS_VERL_LOSSES", "2")):  # fmt: skip
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(ValueError, match=name):
                ak_verl.worker_setup()
        assert not ak_verl.is_applied()
