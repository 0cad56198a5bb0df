"""``alignkernels.integrations.openrlhf.apply(losses=True)`` against OpenRLHF's stock loss classes
(OpenRLHF 0.11.2, CPU, fp64).

The classes a trainer builds after :func:`apply` (``openrlhf.models.PolicyLoss`` / ``ValueLoss`` /
``DPOLoss`` and ``aggregate_loss``, the by-name bindings the trainers import) are called next to the
stock ones captured before, with the same constructor arguments: loss, gradients and every returned
statistic agree to 1e-7 relative (OpenRLHF's ``+1e-8`` in its sequence means). Also the exact
restore, atomicity and the log line.
``import openrlhf.models`` needs ``flash_attn``: a stand-in whose functions raise is installed for
the import only (as in ``test_openrlhf.py``).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import logging
import sys
import types

import pytest
import torch

pytest.importorskip("openrlhf")

import alignkernels.integrations.openrlhf as ak_openrlhf  # noqa: E402


def _not_available(*args, **kwargs):
    raise RuntimeError("flash_attn stand-in of tests/frameworks_integration/test_openrlhf_losses.py")


def _import_openrlhf_loss():
    added = []
    if importlib.util.find_spec("flash_attn") is None and "flash_attn" not in sys.modules:
        for name, functions in (("flash_attn", ()), ("flash_attn.bert_padding", ("index_first_axis", "pad_input",
                                "rearrange", "unpad_input")), ("flash_attn.utils", ()),
                                ("flash_attn.utils.distributed", ("all_gather",))):  # fmt: skip
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            for fn in functions:
                setattr(module, fn, _not_available)
            sys.modules[name] = module
            added.append(name)
    try:
        return importlib.import_module("openrlhf.models"), importlib.import_module("openrlhf.models.loss")
    finally:
        for name in added:
            del sys.modules[name]


orl_models, orl_loss = _import_openrlhf_loss()
STOCK = {name: getattr(orl_loss, name) for name in ("PolicyLoss", "DPOLoss", "ValueLoss", "aggregate_loss")}
CLOSE = dict(rtol=1e-7, atol=1e-10)



def _assert_stock():
    for name, cls in STOCK.items():
        assert getattr(orl_loss, name) is cls and getattr(orl_models, name) is cls


def _policy_inputs(seed=0, B=6, T=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2.0 - 0.05
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    old[:, 1] = logp[:, 1] - 2.0  # ratio e² at token 1: beyond the clip range and the dual-clip cap
    rollout = (old + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False  # a fully masked sequence
    return logp, old, rollout, adv, mask


def _run_policy(cls, ctor, logp, old, rollout, adv, mask, extra):
    x = logp.clone().requires_grad_(True)
    out = cls(**ctor)(x, old, adv, action_mask=mask.to(logp.dtype), rollout_log_probs=rollout, **extra)
    out[0].backward()
    return out, x.grad


POLICY_CASES = [
    dict(),
    dict(dual_clip=3.0, clip_eps_low=0.2, clip_eps_high=0.28),
    dict(token_level_loss=False, dual_clip=3.0),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    dict(policy_loss_type="gspo", is_correction_level="token"),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.5, 2.0)),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.8, 1.2)),
    dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.05)),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.1)),
]


@pytest.mark.parametrize("ctor", POLICY_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("global_batch", [False, True])
def test_patched_policy_loss_matches_stock(ctor, global_batch):
    logp, old, rollout, adv, mask = _policy_inputs(len(ctor))
    extra = dict(dp_size=2, batch_num_tokens=float(mask.sum()) * 2 + 3, global_batch_size=11.0) if global_batch else {}
    stock, stock_grad = _run_policy(STOCK["PolicyLoss"], ctor, logp, old, rollout, adv, mask, extra)
    with ak_openrlhf.apply(losses=True):
        patched = orl_models.PolicyLoss
        assert patched is not STOCK["PolicyLoss"] and issubclass(patched, STOCK["PolicyLoss"])
        ours, ours_grad = _run_policy(patched, ctor, logp, old, rollout, adv, mask, extra)
        assert ak_openrlhf.adapter_calls() == 1
    assert len(ours) == len(stock) == 5
    for mine, theirs in zip(ours, stock):  # loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio
        if theirs is None:
            assert mine is None
        else:  # OpenRLHF gives the sequence-level filter ratio in fp32
            torch.testing.assert_close(mine.detach(), theirs.detach(), check_dtype=False, **CLOSE)
    torch.testing.assert_close(ours_grad, stock_grad, **CLOSE)


def _dpo_inputs(seed=0, B=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=dtype) * 40 + 1) for _ in range(4)]


def _run_dpo(cls, ctor, inputs):
    pc, pr = (t.clone().requires_grad_(True) for t in inputs[:2])
    loss, chosen_rewards, rejected_rewards = cls(**ctor)(pc, pr, *inputs[2:])
    loss.backward()
    return loss.detach(), chosen_rewards, rejected_rewards, pc.grad, pr.grad


DPO_CASES = [dict(beta=0.1), dict(beta=0.5, ipo=True), dict(beta=0.1, label_smoothing=0.2, ipo=True),
             dict(beta=0.1, label_smoothing=0.1), dict(beta=0.3, label_smoothing=0.45),
             dict(beta=0.2, label_smoothing=1.0)]


@pytest.mark.parametrize("ctor", DPO_CASES)
def test_patched_dpo_loss_matches_stock(ctor):
    """Plain DPO, IPO (``label_smoothing`` ignored) and cDPO (``label_smoothing > 0``) run ours."""
    inputs = _dpo_inputs(3)
    stock = _run_dpo(STOCK["DPOLoss"], ctor, inputs)
    with ak_openrlhf.apply(losses=True):
        patched = orl_models.DPOLoss
        assert patched is not STOCK["DPOLoss"] and issubclass(patched, STOCK["DPOLoss"])
        ours = _run_dpo(patched, ctor, inputs)
        assert ak_openrlhf.adapter_calls() == 1
    for mine, theirs in zip(ours, stock):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5, "0.1"])
def test_cdpo_label_smoothing_outside_0_1_is_named(label_smoothing):
    with ak_openrlhf.apply(losses=True):
        with pytest.raises(ValueError, match="label_smoothing"):
            orl_models.DPOLoss(0.1, label_smoothing)
        orl_models.DPOLoss(0.1, 1.5, ipo=True)  # IPO ignores it, as OpenRLHF's


def _value_inputs(seed=0, B=6, T=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=dtype)
    values = old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)  # often beyond ±0.2 of old: the clip binds
    returns = old + torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False  # a fully masked sequence
    return values, old, returns, mask


@pytest.mark.parametrize("ctor", [dict(), dict(clip_eps=0.2), dict(clip_eps=0.2, token_level_loss=False),
                                  dict(token_level_loss=False)], ids=lambda c: "-".join(f"{k}={v}" for k, v in
                                                                                       c.items()) or "default")
@pytest.mark.parametrize("global_batch", [False, True])
def test_patched_value_loss_matches_stock(ctor, global_batch):
    """``ValueLoss`` (as ``ppo_critic.py`` builds it) after apply: ``value_loss(semantics="openrlhf")``,
    loss and gradient as stock for every constructor option."""
    values, old, returns, mask = _value_inputs(len(ctor))
    extra = dict(dp_size=2, batch_num_tokens=torch.tensor(float(mask.sum()) * 2 + 3), global_batch_size=11.0) \
        if global_batch else {}  # fmt: skip

    def run(cls):
        x = values.clone().requires_grad_(True)
        loss = cls(**ctor)(x, old, returns, action_mask=mask.to(values.dtype), **extra)
        loss.backward()
        return loss.detach(), x.grad

    stock, stock_grad = run(STOCK["ValueLoss"])
    with ak_openrlhf.apply(losses=True):
        assert orl_models.ValueLoss is not STOCK["ValueLoss"] and issubclass(orl_models.ValueLoss, STOCK["ValueLoss"])
        ours, ours_grad = run(orl_models.ValueLoss)
        assert ak_openrlhf.adapter_calls() == 1
    torch.testing.assert_close(ours, stock, **CLOSE)
    assert ours.dtype == stock.dtype
    torch.testing.assert_close(ours_grad, stock_grad, **CLOSE)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("global_batch", [False, True])
def test_aggregate_loss_matches_stock_through_the_by_name_binding(token_level_loss, global_batch):
    """``ppo_actor.py`` imports ``aggregate_loss`` from ``openrlhf.models`` (the KL and entropy terms)."""
    values, _, _, mask = _value_inputs(7)
    kw = dict(token_level_loss=token_level_loss)
    if global_batch:  # as get_loss_batch_info gives them: fp32 tensors
        kw.update(dp_size=2, batch_num_tokens=torch.tensor(float(mask.sum()) * 2 + 3),
                  global_batch_size=torch.tensor(11.0))  # fmt: skip
    x = values.clone().requires_grad_(True)
    stock = STOCK["aggregate_loss"](x, mask.to(values.dtype), **kw)
    (stock_grad,) = torch.autograd.grad(stock, x)
    with ak_openrlhf.apply(losses=True):
        assert orl_models.aggregate_loss is orl_loss.aggregate_loss is not STOCK["aggregate_loss"]
        ours = orl_models.aggregate_loss(x, mask.to(values.dtype), **kw)
        assert ak_openrlhf.adapter_calls() == 1
    (ours_grad,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours, stock, **CLOSE)
    torch.testing.assert_close(ours_grad, stock_grad, **CLOSE)


def test_value_loss_fully_masked_gives_zero_where_stock_gives_nan():
    values, old, returns, mask = _value_inputs(2)
    mask = torch.zeros_like(mask)
    assert torch.isnan(STOCK["ValueLoss"](0.2)(values, old, returns, action_mask=mask.to(values.dtype)))
    with ak_openrlhf.apply(losses=True):
        x = values.clone().requires_grad_(True)
        ours = orl_models.ValueLoss(0.2)(x, old, returns, action_mask=mask)
        ours.backward()
    assert ours.item() == 0.0 and (x.grad == 0).all()


def test_the_log_line_names_what_was_swapped_and_what_stays_stock(caplog):
    with caplog.at_level(logging.INFO, logger="alignkernels.integrations.openrlhf"):
        ak_openrlhf.apply(losses=True)
        ak_openrlhf.apply(losses=True)  # idempotent: no second line
    lines = [r.getMessage() for r in caplog.records if "losses swapped" in r.getMessage()]
    assert lines == ["alignkernels: OpenRLHF losses swapped: PolicyLoss, ValueLoss, DPOLoss, aggregate_loss; "
                     "left stock: GPTLMLoss, SFTLoss, PairWiseLoss, LogExpLoss"]  # fmt: skip
    for name in ("PolicyLoss", "ValueLoss", "DPOLoss", "aggregate_loss"):
        assert getattr(orl_models, name) is getattr(orl_loss, name) is not STOCK[name]


def test_remove_restores_every_binding():
    ak_openrlhf.apply(losses=True)
    assert orl_loss.PolicyLoss is orl_models.PolicyLoss is not STOCK["PolicyLoss"]
    ak_openrlhf.remove()
    _assert_stock()
    ak_openrlhf.apply(losses=True)
    ak_openrlhf.apply()  # losses off: re-installed without them
    assert ak_openrlhf.is_applied()
    _assert_stock()


class _ReadOnlyModule(types.ModuleType):
    def __setattr__(self, name, value):
        raise AttributeError(f"{self.__name__} is read-only")


def test_a_failed_apply_leaves_openrlhf_untouched():
    frozen = _ReadOnlyModule("openrlhf.zz_read_only")
    vars(frozen)["DPOLoss"] = STOCK["DPOLoss"]  # bound after openrlhf.models.* in the walk
    sys.modules[frozen.__name__] = frozen
    try:
        with pytest.raises(AttributeError, match="read-only"):
            ak_openrlhf.apply(losses=True)
    finally:
        del sys.modules[frozen.__name__]
    assert not ak_openrlhf.is_applied()
    _assert_stock()


def test_fully_masked_micro_batch_gives_zero_where_stock_gives_nan():
    logp, old, rollout, adv, mask = _policy_inputs(5)
    mask = torch.zeros_like(mask)
    stock = STOCK["PolicyLoss"]()(logp, old, adv, action_mask=mask.to(logp.dtype))
    assert torch.isnan(stock[0])
    with ak_openrlhf.apply(losses=True):
        x = logp.clone().requires_grad_(True)
        ours = orl_models.PolicyLoss()(x, old, adv, action_mask=mask)
        ours[0].backward()
    assert ours[0].item() == 0.0 and (x.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# apply(batch_invariant=, head_precision=): the consistency switches
# ---------------------------------------------------------------------------------------------
orl_utils = importlib.import_module("openrlhf.models.utils")  # loaded above, with the stand-in


@pytest.mark.parametrize("seam", ["log_probs_from_logits", "compute_entropy"])
def test_batch_invariant_seams_give_a_row_the_same_bits_alone_and_in_a_batch(seam, monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits, labels, at = torch.randn(3, 17, 157, generator=g) * 4, torch.randint(0, 157, (3, 17), generator=g), 1
    calls = []
    real = ak_openrlhf.token_logprobs
    monkeypatch.setattr(ak_openrlhf, "token_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    ak_openrlhf.apply(batch_invariant=True, backend="torch")
    fn = getattr(orl_utils, seam)
    results = []
    # row `at` alone, then inside the whole batch
    for rows, pick in ((slice(at, at + 1), slice(None)), (slice(None), slice(at, at + 1))):
        x = logits[rows].clone().requires_grad_(True)
        out = fn(x, labels[rows], temperature=0.7) if seam == "log_probs_from_logits" else fn(x)
        out.sum().backward()
        results.append((out.detach()[pick], x.grad[pick]))
    assert all(k["batch_invariant"] is True for k in calls) and len(calls) == 2
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_env_forms_of_the_switches(monkeypatch):
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF", "1")
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF_LOSSES", "on")
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF_BATCH_INVARIANT", "1")
    ak_openrlhf.worker_setup()
    opts = ak_openrlhf.options()
    assert (opts.losses, opts.batch_invariant, opts.head_precision) == (True, True, "input")
    assert orl_models.PolicyLoss is not STOCK["PolicyLoss"]
    ak_openrlhf.remove()
    for name, bad, match in (("ALIGNKERNELS_OPENRLHF_HEAD_PRECISION", "fp16", "ALIGNKERNELS_OPENRLHF_HEAD_PRECISION"),
                             ("ALIGNKERNELS_OPENRLHF_HEAD_PRECISION", "fp32", "head_precision='fp32'"),
                             ("ALIGNKERNELS_OPENRLHF_BATCH_INVARIANT", "maybe",
                              "ALIGNKERNELS_OPENRLHF_BATCH")):  # fmt: skip
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(ValueError, match=match):
                ak_openrlhf.worker_setup()
        assert not ak_openrlhf.is_applied()
