"""The clipped value loss (``alignkernels.losses.value.value_loss``) pinned in fp64 against verl's
``compute_value_loss`` (every ``loss_agg_mode``, the global-batch arguments) and OpenRLHF's
``ValueLoss`` (token and sequence level, the global-batch arguments): values, gradients, the clip
fraction, fully masked rows, the micro-batch identity; and against the value term of ``ppo_loss``
(TRL's). Skipped where the framework is not installed."""
from __future__ import annotations

import pytest
import torch

from alignkernels.losses.aggregation import LOSS_AGG_MODES, GlobalBatch
from alignkernels.losses.ppo import ppo_loss
from alignkernels.losses.value import value_loss

CLOSE = dict(rtol=1e-7, atol=1e-11)  # verl / OpenRLHF token means divide by count + 1e-8
OPENRLHF_MODES = {True: "token-mean", False: "seq-mean-token-mean"}  # ValueLoss(token_level_loss=)


def _inputs(seed=0, B=7, T=9, empty_rows=(2,), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    old = values + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)  # some beyond the clip range
    returns = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    for r in empty_rows:
        mask[r] = False
    return values, old, returns, mask


def _grads(ours, theirs, a, b):
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, **CLOSE)
    return a.grad


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("cliprange_value", [0.2, 10.0])
def test_value_loss_matches_verl(verl_core, mode, cliprange_value):
    values, old, returns, mask = _inputs()
    a, b = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    ours, metrics = value_loss(a, old, returns, mask, cliprange_value=cliprange_value, loss_agg_mode=mode,
                               semantics="verl")  # fmt: skip
    theirs, clipfrac = verl_core.compute_value_loss(b, returns, old, mask.to(values.dtype), cliprange_value,
                                                    loss_agg_mode=mode)  # fmt: skip
    torch.testing.assert_close(ours, theirs, **CLOSE)
    torch.testing.assert_close(metrics["critic/vf_clipfrac"], clipfrac, **CLOSE)
    if cliprange_value == 0.2:
        assert 0 < float(clipfrac) < 1  # the clip binds on some tokens
    grad = _grads(ours, theirs, a, b)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_loss_global_batch_matches_verl(verl_core, mode):
    values, old, returns, mask = _inputs(1)
    gb = GlobalBatch(dp_size=2, batch_num_tokens=float(mask.sum() * 2 + 3), global_batch_size=15.0,
                     loss_scale_factor=16)  # fmt: skip
    a, b = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    ours, _ = value_loss(a, old, returns, mask, loss_agg_mode=mode, semantics="verl", global_batch=gb)
    theirs, _ = verl_core.compute_value_loss(b, returns, old, mask.to(values.dtype), 0.2, loss_agg_mode=mode,
                                             **gb._asdict())  # fmt: skip
    torch.testing.assert_close(ours, theirs, **CLOSE)
    _grads(ours, theirs, a, b)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_openrlhf(openrlhf_models, token_level_loss, clip_eps):
    loss_mod, _ = openrlhf_models
    values, old, returns, mask = _inputs(2)
    a, b = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    ours, _ = value_loss(a, old, returns, mask, cliprange_value=clip_eps, loss_agg_mode=OPENRLHF_MODES[token_level_loss],
                         semantics="openrlhf")  # fmt: skip
    theirs = loss_mod.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level_loss)(b, old, returns,
                                                                                      mask.to(values.dtype))  # fmt: skip
    torch.testing.assert_close(ours, theirs, **CLOSE)
    _grads(ours, theirs, a, b)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_value_loss_micro_batches_sum_to_the_global_loss(openrlhf_models, token_level_loss, dp_size):
    """OpenRLHF's global arguments per micro-batch (against ``ValueLoss``); the micro-batch losses of
    every rank, divided by ``dp_size``, sum to the whole batch's loss."""
    loss_mod, _ = openrlhf_models
    values, old, returns, mask = _inputs(3, B=12, empty_rows=(0, 7))
    mode = OPENRLHF_MODES[token_level_loss]
    whole, _ = value_loss(values, old, returns, mask, loss_agg_mode=mode, semantics="openrlhf")
    tokens, sequences = float(mask.sum()), float(mask.any(-1).sum())
    gb = GlobalBatch(dp_size=dp_size, batch_num_tokens=tokens, global_batch_size=sequences)
    total = 0.0
    for rows in torch.arange(12).chunk(2 * dp_size):
        a, b = values[rows].clone().requires_grad_(True), values[rows].clone().requires_grad_(True)
        ours, _ = value_loss(a, old[rows], returns[rows], mask[rows], loss_agg_mode=mode, semantics="openrlhf",
                             global_batch=gb)  # fmt: skip
        theirs = loss_mod.ValueLoss(clip_eps=0.2, token_level_loss=token_level_loss)(
            b, old[rows], returns[rows], mask[rows].to(values.dtype), dp_size=dp_size, batch_num_tokens=tokens,
            global_batch_size=sequences)  # fmt: skip
        torch.testing.assert_close(ours, theirs, **CLOSE)
        _grads(ours, theirs, a, b)
        total = total + ours.detach()
    torch.testing.assert_close(total / dp_size, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cliprange_value", [None, 0.2])
def test_value_loss_is_the_value_term_of_ppo_loss(cliprange_value):
    """``ppo_loss``'s value term (TRL) is ``value_loss``'s default (token mean, classic semantics)."""
    values, old, returns, mask = _inputs(4)
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(*mask.shape, generator=g, dtype=torch.float64)
    vmask = mask.clone()
    vmask[0, 1:] = False  # a value mask of its own
    _, m = ppo_loss(logp, logp, torch.zeros_like(logp), mask, values, old, returns, cliprange_value=cliprange_value,
                    value_mask=vmask)  # fmt: skip
    ours, om = value_loss(values, old, returns, vmask, cliprange_value=cliprange_value)
    torch.testing.assert_close(ours, m["loss/value_avg"], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(om["critic/vf_clipfrac"], m["val/clipfrac_avg"], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("semantics", ["classic", "verl"])
def test_value_loss_fully_masked_and_empty_batches_give_zero(mode, semantics):
    values, old, returns, mask = _inputs(5)
    values = values.clone()
    values[0, 0] = float("nan")  # padding garbage never reaches the loss
    for v, o, r, m in ((values, old, returns, torch.zeros_like(mask)),
                       (values[:0], old[:0], returns[:0], mask[:0])):  # fmt: skip
        x = v.clone().requires_grad_(True)
        loss, metrics = value_loss(x, o, r, m, loss_agg_mode=mode, semantics=semantics)
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all() and metrics["critic/vf_clipfrac"].item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_value_loss_fp32_matches_fp64(mode):
    values, old, returns, mask = _inputs(6)
    x64, x32 = values.clone().requires_grad_(True), values.float().requires_grad_(True)
    l64, _ = value_loss(x64, old, returns, mask, loss_agg_mode=mode, semantics="verl")
    l32, _ = value_loss(x32, old.float(), returns.float(), mask, loss_agg_mode=mode, semantics="verl")
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=2e-6, atol=1e-7)
    l64.backward()
    l32.backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cliprange_value=-0.1), ValueError, "cliprange_value"),
    (dict(cliprange_value="0.2"), TypeError, "cliprange_value"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    (dict(semantics="trl"), ValueError, "semantics"),
    (dict(returns=None), TypeError, "returns"),
    (dict(returns=torch.zeros(7, 8, dtype=torch.float64)), ValueError, "returns must have the shape"),
    (dict(old_values=torch.zeros(7, 9, dtype=torch.int64)), TypeError, "old_values"),
    (dict(values=torch.zeros(7, 9, dtype=torch.int64)), TypeError, "values"),
    (dict(values=torch.zeros(9, dtype=torch.float64)), ValueError, r"values must be \[B, T\]"),
])  # fmt: skip
def test_value_loss_bad_arguments_are_named(kwargs, error, match):
    values, old, returns, mask = _inputs(7)
    args = dict(values=values, old_values=old, returns=returns, mask=mask)
    options = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(error, match=match):
        value_loss(**args, **options)
