"""dpo_loss: every loss type, f-divergence, loss-weight combination, LD-DPO and WPO against the
installed TRL's own ``DPOTrainer._compute_loss``, values, metrics and gradients.

How TRL's code is reached on plain tensors: ``_compute_loss`` is called unbound with a light
stand-in ``self`` carrying the config fields it reads, a stand-in model whose output holds our
per-token log-probs (a leaf tensor, so autograd gives TRL's gradient), and precomputed reference
sums (``precompute_ref_logps=True``, TRL's own code path). Nothing of TRL is re-implemented here.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import alignkernels
from alignkernels.losses.dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    DPOLoss,
    dpo_loss,
    dpo_loss_from_token_logps,
)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

# fp32: our math and TRL's are the same formulas in a different association order.
RTOL, ATOL = 1e-5, 1e-6
METRIC_NAMES = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# TRL harness
# --------------------------------------------------------------------------------------------
def trl_compute_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, *, loss_type, loss_weights=None,
                     beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                     discopop_tau=0.05, ld_alpha=None, use_weighting=False, log_sum_sq_probs=None,
                     entropy=None, mean_logits=None, is_top1=None):  # fmt: skip
    """TRL ``DPOTrainer._compute_loss`` on a [2B, T-1] per-token log-prob tensor
    (batch is [chosen; rejected], as TRL's collator builds it). Returns (loss, metrics)."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=per_token_logps.device, gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=loss_types,
        loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    zeros = torch.zeros_like(per_token_logps.detach())

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=per_token_logps,
            entropy=zeros if entropy is None else entropy,
            mean_logits=zeros if mean_logits is None else mean_logits,
            is_top1=zeros.bool() if is_top1 is None else is_top1,
            log_sum_sq_probs=log_sum_sq_probs,
        )

    inputs = {
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def trl_finite_difference_grad(per_token, cmask, rc, rr, lssp, kwargs, h=1e-6):
    """Gradient of TRL's loss by central differences in fp64, at completion positions only
    (for the one combination where TRL's own graph cannot be differentiated). TRL's WPO weights
    are constants to autograd, so log Σp² moves with the perturbed log-prob to keep them fixed."""
    base, lssp = per_token.double(), lssp.double()
    grad = torch.zeros_like(base)
    with torch.no_grad():
        for i, j in (cmask[:, 1:] != 0).nonzero().tolist():
            step = torch.zeros_like(base)
            step[i, j] = h
            ref = (rc.double(), rr.double())
            lp, _ = trl_compute_loss(base + step, cmask, *ref, log_sum_sq_probs=lssp + step, **kwargs)
            lm, _ = trl_compute_loss(base - step, cmask, *ref, log_sum_sq_probs=lssp - step, **kwargs)
            grad[i, j] = (lp - lm) / (2 * h)
    return grad


def make_batch(B=6, T=10, seed=0, empty_chosen_row=False):
    """Per-token log-probs [2B, T-1] (zero outside the completion, as TRL's model returns them),
    completion mask [2B, T] (column 0 is prompt, so TRL's shifted and unshifted token counts agree),
    reference sums [B] each, and per-token log Σp² for WPO."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * B,), generator=g)
    length = torch.randint(1, T - 3, (2 * B,), generator=g)
    pos = torch.arange(T)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    if empty_chosen_row:
        completion_mask[1] = 0  # a chosen completion with no token
    shift_mask = completion_mask[:, 1:]
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 2.0
    per_token = per_token * shift_mask
    sums = per_token.sum(1)
    ref = sums + torch.randn(2 * B, generator=g) * 1.5
    lssp = -torch.rand(2 * B, T - 1, generator=g) * 1.5
    return per_token, completion_mask, ref[:B].clone(), ref[B:].clone(), lssp


def ours_from_tokens(per_token, completion_mask, ref_chosen, ref_rejected, lssp=None, **kwargs):
    B = per_token.shape[0] // 2
    shift_mask = completion_mask[:, 1:]
    use_w = kwargs.get("use_weighting", False)
    return dpo_loss_from_token_logps(
        per_token[:B], per_token[B:], ref_chosen, ref_rejected, shift_mask[:B], shift_mask[B:],
        chosen_log_sum_sq_probs=lssp[:B] if use_w else None,
        rejected_log_sum_sq_probs=lssp[B:] if use_w else None,
        **kwargs,
    )  # fmt: skip


def check_against_trl(seed=0, empty_chosen_row=False, **kwargs):
    per_token, cmask, rc, rr, lssp = make_batch(seed=seed, empty_chosen_row=empty_chosen_row)
    x_trl = per_token.clone().requires_grad_()
    x_ours = per_token.clone().requires_grad_()
    loss_trl, metrics_trl = trl_compute_loss(x_trl, cmask, rc, rr, log_sum_sq_probs=lssp, **kwargs)
    loss, metrics = ours_from_tokens(x_ours, cmask, rc, rr, lssp=lssp, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, loss_trl.float(), rtol=RTOL, atol=ATOL)
    for name in METRIC_NAMES:
        assert name in metrics, name
        assert metrics[name].dim() == 0
        assert math.isclose(metrics[name].item(), metrics_trl[name], rel_tol=RTOL, abs_tol=ATOL), name
    try:
        (g_trl,) = torch.autograd.grad(loss_trl, x_trl)
    except RuntimeError as err:  # TRL multiplies WPO weights in place into a relu output
        assert "inplace operation" in str(err)
        g_trl = trl_finite_difference_grad(per_token, cmask, rc, rr, lssp, kwargs).float()
    (g,) = torch.autograd.grad(loss, x_ours)
    # TRL sums whole rows and relies on its LM head giving 0 (and no gradient) at ignored labels,
    # so its gradient w.r.t. this stand-in tensor is also non-zero at masked positions: compare
    # on the completion tokens; ours is exactly zero elsewhere.
    valid = cmask[:, 1:] != 0
    torch.testing.assert_close(g[valid], g_trl[valid], rtol=RTOL, atol=ATOL)
    assert (g[~valid] == 0).all()
    return loss, g


# --------------------------------------------------------------------------------------------
# Against TRL
# --------------------------------------------------------------------------------------------
def _needs_smoothing(lt):
    return {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}.get(lt, 0.0)


def test_loss_type_list_matches_trl():
    import inspect

    src = inspect.getsource(trl_dpo.DPOTrainer._compute_loss)
    trl_types = {line.split('"')[1] for line in src.splitlines() if 'loss_type == "' in line}
    assert trl_types == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_vs_trl(loss_type):
    check_against_trl(loss_type=loss_type, beta=0.1, label_smoothing=_needs_smoothing(loss_type))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sppo_hard", "discopop", "hinge"])
def test_other_beta_vs_trl(loss_type):
    check_against_trl(seed=3, loss_type=loss_type, beta=0.5)


@pytest.mark.parametrize("loss_type", ["robust", "exo_pair", "aot", "aot_unpaired", "sigmoid"])
@pytest.mark.parametrize("label_smoothing", [0.02, 0.3])
def test_label_smoothing_vs_trl(loss_type, label_smoothing):
    check_against_trl(seed=1, loss_type=loss_type, label_smoothing=label_smoothing)


def test_robust_outside_recommended_range_warns_and_matches_trl():
    with pytest.warns(UserWarning, match="robust"):
        check_against_trl(seed=17, loss_type="robust", label_smoothing=0.6)


@pytest.mark.parametrize(
    "f_div,coef",
    [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
     ("alpha_divergence", 1.7)],  # fmt: skip
    ids=["forward_kl", "js", "alpha0.5", "alpha1", "alpha1.7"],
)
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
def test_f_divergence_vs_trl(loss_type, f_div, coef):
    check_against_trl(
        seed=2, loss_type=loss_type, f_divergence_type=f_div, f_alpha_divergence_coef=coef,
        label_smoothing=_needs_smoothing(loss_type),
    )  # fmt: skip


@pytest.mark.parametrize(
    "loss_type,loss_weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
        (["sigmoid", "sft"], [1.0, 0.5]),  # RPO-style
        (["apo_zero", "ipo", "nca_pair"], None),
        (["hinge", "discopop", "sigmoid_norm"], [0.3, 1.5, 2.0]),
    ],
)
def test_combined_loss_types_vs_trl(loss_type, loss_weights):
    check_against_trl(seed=4, loss_type=loss_type, loss_weights=loss_weights)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft", "apo_down"])
def test_ld_alpha_vs_trl(loss_type, ld_alpha):
    check_against_trl(seed=5, loss_type=loss_type, ld_alpha=ld_alpha)


# TRL 1.16 cannot run 'sft' with use_weighting (in-place multiply into an expanded tensor raises),
# and aot/aot_unpaired reject weighting: those are covered by test_wpo_sft_formula below.
@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")])
def test_wpo_weighting_vs_trl(loss_type):
    check_against_trl(seed=6, loss_type=loss_type, use_weighting=True, label_smoothing=_needs_smoothing(loss_type))


def test_wpo_with_ld_alpha_vs_trl():
    check_against_trl(seed=7, loss_type=["sigmoid", "ipo"], use_weighting=True, ld_alpha=0.3)


def test_wpo_sft_formula():
    """'sft' + WPO (TRL crashes on it): the intended per-pair product, mean over pairs,
    with the weights as constants; computed here by hand."""
    per_token, cmask, rc, rr, lssp = make_batch(seed=14)
    B, mask = rc.shape[0], cmask[:, 1:].bool()
    x = per_token.clone().requires_grad_()
    loss, _ = ours_from_tokens(x, cmask, rc, rr, lssp, loss_type="sft", use_weighting=True)
    lengths = mask.sum(1).clamp(min=1)
    w = torch.exp(((per_token - lssp) * mask).sum(1) / lengths)
    pair_w = w[:B] * w[B:]
    x_ref = per_token.clone().requires_grad_()
    nll = -x_ref[:B][mask[:B]].mean()
    expected = (nll * pair_w).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t != "sft"])
def test_empty_completion_row_vs_trl(loss_type):
    """A pair whose chosen completion has no token: TRL and we agree, loss finite."""
    smoothing = _needs_smoothing(loss_type)
    loss, _ = check_against_trl(seed=8, empty_chosen_row=True, loss_type=loss_type, label_smoothing=smoothing)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_empty_prompt_lengths_override_vs_trl(loss_type):
    """With an empty prompt the first token is a completion token: TRL's ipo / sigmoid_norm then
    count the unshifted completion mask (one more than the log-probs cover); passing those
    counts as chosen_lengths / rejected_lengths reproduces TRL."""
    per_token, cmask, rc, rr, _ = make_batch(seed=18)
    cmask[0, 0] = 1  # chosen 0 has an empty prompt ...
    cmask[0, 1:] = 0
    cmask[0, 1:4] = 1  # ... and completion tokens 0..3
    B, mask = rc.shape[0], cmask[:, 1:]
    per_token = per_token * mask
    x_trl, x = per_token.clone().requires_grad_(), per_token.clone().requires_grad_()
    loss_trl, _ = trl_compute_loss(x_trl, cmask, rc, rr, loss_type=loss_type)
    lengths = cmask.sum(1)
    loss, _ = dpo_loss_from_token_logps(x[:B], x[B:], rc, rr, mask[:B], mask[B:], loss_type=loss_type,
                                        chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])  # fmt: skip
    torch.testing.assert_close(loss, loss_trl, rtol=RTOL, atol=ATOL)
    default, _ = dpo_loss_from_token_logps(x[:B], x[B:], rc, rr, mask[:B], mask[B:], loss_type=loss_type)
    assert not torch.allclose(default, loss_trl)  # the override matters here
    (g_trl,) = torch.autograd.grad(loss_trl, x_trl)
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g[mask != 0], g_trl[mask != 0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("empty_chosen_row", [False, True])
def test_token_metrics_vs_trl(empty_chosen_row):
    """entropy, logits/chosen, logits/rejected, mean_token_accuracy from per-token statistics."""
    per_token, cmask, rc, rr, lssp = make_batch(seed=15, empty_chosen_row=empty_chosen_row)
    g = torch.Generator().manual_seed(16)
    entropy = torch.rand(per_token.shape, generator=g) * 3
    mean_logits = torch.randn(per_token.shape, generator=g)
    is_top1 = torch.rand(per_token.shape, generator=g) < 0.4
    _, m_trl = trl_compute_loss(per_token, cmask, rc, rr, loss_type="sigmoid", entropy=entropy,
                                mean_logits=mean_logits, is_top1=is_top1)  # fmt: skip
    B, mask = rc.shape[0], cmask[:, 1:]
    _, m = dpo_loss_from_token_logps(
        per_token[:B], per_token[B:], rc, rr, mask[:B], mask[B:],
        chosen_entropy=entropy[:B], rejected_entropy=entropy[B:], chosen_mean_logits=mean_logits[:B],
        rejected_mean_logits=mean_logits[B:], chosen_is_top1=is_top1[:B],
    )  # fmt: skip
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert math.isclose(m[name].item(), m_trl[name], rel_tol=RTOL, abs_tol=ATOL), name


def test_token_metrics_no_tokens_are_zero():
    B, T = 2, 3
    mask = torch.zeros(B, T, dtype=torch.bool)
    nan = torch.full((B, T), float("nan"))
    _, m = dpo_loss_from_token_logps(
        nan, nan, torch.zeros(B), torch.zeros(B), mask, mask, chosen_entropy=nan, rejected_entropy=nan,
        chosen_mean_logits=nan, rejected_mean_logits=nan, chosen_is_top1=torch.ones(B, T, dtype=torch.bool),
    )  # fmt: skip
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert m[name].item() == 0.0, name


# --------------------------------------------------------------------------------------------
# Sequence-level API agrees with the token-level one (and hence with TRL)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_sequence_level_matches_token_level(loss_type):
    per_token, cmask, rc, rr, lssp = make_batch(seed=9)
    B = rc.shape[0]
    mask = cmask[:, 1:]
    kw = dict(loss_type=loss_type, beta=0.2, label_smoothing=_needs_smoothing(loss_type))
    loss_tok, m_tok = ours_from_tokens(per_token, cmask, rc, rr, lssp, **kw)
    sums, lengths = alignkernels.sequence_logprobs(per_token, mask), mask.sum(1)
    lens = dict(chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    loss_seq, m_seq = dpo_loss(sums[:B], sums[B:], rc, rr, **lens, **kw)
    torch.testing.assert_close(loss_seq, loss_tok, rtol=1e-6, atol=1e-7)
    for k in m_tok:
        torch.testing.assert_close(m_seq[k], m_tok[k])
    if loss_type not in ("aot", "aot_unpaired"):  # WPO from [B] sums of log Σp²
        lw, _ = ours_from_tokens(per_token, cmask, rc, rr, lssp, use_weighting=True, **kw)
        ls, _ = dpo_loss(
            sums[:B], sums[B:], rc, rr, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], use_weighting=True,
            chosen_log_sum_sq_probs=(lssp * mask).sum(1)[:B], rejected_log_sum_sq_probs=(lssp * mask).sum(1)[B:], **kw,
        )  # fmt: skip
        torch.testing.assert_close(ls, lw, rtol=1e-6, atol=1e-7)


def test_module_wrapper_and_public_export():
    per_token, cmask, rc, rr, _ = make_batch(seed=10)
    B = rc.shape[0]
    sums, lengths = per_token.sum(1), cmask.sum(1)
    module = alignkernels.DPOLoss(beta=0.3, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1])
    assert isinstance(module, torch.nn.Module) and "ipo" in repr(module)
    a, ma = module(sums[:B], sums[B:], rc, rr, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    b, mb = alignkernels.dpo_loss(
        sums[:B], sums[B:], rc, rr, beta=0.3, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1],
        chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
    )  # fmt: skip
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert DPOLoss is alignkernels.DPOLoss


def test_sigmoid_closed_form_and_metrics():
    """Independent of TRL: the DPO formula and the reward metrics by hand."""
    pc = torch.tensor([-5.0, -9.0, -3.0], requires_grad=True)
    pr = torch.tensor([-7.0, -8.0, -4.0], requires_grad=True)
    rc, rr = torch.tensor([-6.0, -8.5, -3.0]), torch.tensor([-6.5, -8.0, -3.5])
    beta = 0.2
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    d = [(-5 + 6) - (-7 + 6.5), (-9 + 8.5) - (-8 + 8), (-3 + 3) - (-4 + 3.5)]
    expected = sum(math.log1p(math.exp(-beta * x)) for x in d) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(m["rewards/accuracies"].item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(m["rewards/margins"].item(), beta * sum(d) / 3, rel_tol=1e-5)
    assert math.isclose(m["logps/chosen"].item(), -17 / 3, rel_tol=1e-6)
    loss.backward()
    # dL/dπ_c = -β σ(-βΔ) / B
    for i, x in enumerate(d):
        assert math.isclose(pc.grad[i].item(), -beta / (1 + math.exp(beta * x)) / 3, rel_tol=1e-5)
    torch.testing.assert_close(pr.grad, -pc.grad)


# --------------------------------------------------------------------------------------------
# Precision, edge cases, errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "aot"])
def test_bf16_inputs(loss_type):
    """bf16 inputs are upcast: the result equals TRL's fp32 math on the same (bf16-rounded)
    values to fp32 precision; vs the unrounded fp32 inputs the gap is the input rounding only
    (bf16 has 8 mantissa bits: |sum| ~ 10 carries an error up to 0.03)."""
    per_token, cmask, rc, rr, _ = make_batch(seed=11)
    per_token_bf16 = per_token.bfloat16()
    rounded = per_token_bf16.float()
    kw = dict(loss_type=loss_type, label_smoothing=_needs_smoothing(loss_type))
    x = per_token_bf16.clone().requires_grad_()
    loss, _ = ours_from_tokens(x, cmask, rc.bfloat16(), rr.bfloat16(), **kw)
    x_trl = rounded.clone().requires_grad_()
    loss_trl, _ = trl_compute_loss(x_trl, cmask, rc.bfloat16().float(), rr.bfloat16().float(), **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_trl, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_trl.backward()
    assert x.grad.dtype == torch.bfloat16
    valid = cmask[:, 1:] != 0
    # the gradient is rounded to bf16 (8 mantissa bits): relative 2^-8
    torch.testing.assert_close(x.grad.float()[valid], x_trl.grad[valid], rtol=4e-3, atol=1e-6)
    loss_fp32, _ = ours_from_tokens(per_token, cmask, rc, rr, **kw)
    torch.testing.assert_close(loss, loss_fp32, rtol=5e-2, atol=5e-3)


def test_fp64_inputs_stay_fp64_and_gradcheck():
    g = torch.Generator().manual_seed(12)
    B = 4
    pc = (-torch.rand(B, generator=g, dtype=torch.float64) * 5).requires_grad_()
    pr = (-torch.rand(B, generator=g, dtype=torch.float64) * 5).requires_grad_()
    rc, rr = -torch.rand(B, generator=g, dtype=torch.float64) * 5, -torch.rand(B, generator=g, dtype=torch.float64) * 5
    lengths = torch.tensor([3, 1, 5, 2])
    for lt in ["sigmoid", "ipo", "exo_pair", "discopop", "apo_down", "sigmoid_norm"]:
        def f(a, b):
            return dpo_loss(a, b, rc, rr, loss_type=lt, beta=0.3, label_smoothing=0.01,
                            chosen_lengths=lengths, rejected_lengths=lengths.flip(0))[0]  # fmt: skip
        assert f(pc, pr).dtype == torch.float64
        assert torch.autograd.gradcheck(f, (pc, pr))


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_fully_masked_sequences_finite_zero_grad(loss_type):
    """Every chosen and rejected row fully masked, garbage (NaN/inf) at masked positions:
    finite loss, zero gradient everywhere."""
    B, T = 3, 5
    chosen = torch.full((B, T), float("nan")).requires_grad_()
    rejected = torch.full((B, T), float("-inf")).requires_grad_()
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss, metrics = dpo_loss_from_token_logps(
        chosen, rejected, torch.zeros(B), torch.zeros(B), mask, mask,
        loss_type=loss_type, label_smoothing=_needs_smoothing(loss_type),
    )  # fmt: skip
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert (chosen.grad == 0).all()
    assert rejected.grad is None or (rejected.grad == 0).all()  # 'sft' never reads rejected


def test_partially_masked_rows_ignore_garbage():
    per_token, cmask, rc, rr, _ = make_batch(seed=13)
    mask = cmask[:, 1:]
    dirty = torch.where(mask.bool(), per_token, torch.tensor(float("nan"))).requires_grad_()
    clean = per_token.clone().requires_grad_()
    a, _ = ours_from_tokens(dirty, cmask, rc, rr, loss_type="sigmoid")
    b, _ = ours_from_tokens(clean, cmask, rc, rr, loss_type="sigmoid")
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(dirty.grad, clean.grad)


def test_errors():
    B = 3
    x = torch.zeros(B)
    lengths = torch.ones(B)
    with pytest.raises(ValueError, match="valid loss types.*sigmoid.*sigmoid_norm"):
        dpo_loss(x, x, x, x, loss_type="dpo_typo")
    with pytest.raises(ValueError, match="chosen_lengths.*ipo"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(x, x, x, x, loss_type="sigmoid_norm", chosen_lengths=lengths)
    with pytest.raises(ValueError, match="chosen_lengths.*sft"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="only supported for loss types"):
        dpo_loss(x, x, x, x, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type"):
        dpo_loss(x, x, x, x, f_divergence_type="kl")
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(x, x, x, x, loss_type="aot", pair_weights=torch.ones(B))
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        dpo_loss(x, x, x, x, use_weighting=True, chosen_lengths=lengths, rejected_lengths=lengths)
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="ref_rejected_logps.*shape"):
        dpo_loss(x, x, x, torch.zeros(B + 1))
    with pytest.raises(ValueError, match="policy_chosen_logps.*1-D"):
        dpo_loss(torch.zeros(B, 2), x, x, x)
    with pytest.raises(TypeError, match="policy_rejected_logps"):
        dpo_loss(x, torch.zeros(B, dtype=torch.long), x, x)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="B >= 1"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="ld_alpha"):
        tok, mask = torch.zeros(B, 4), torch.ones(B, 4)
        dpo_loss_from_token_logps(tok, tok, x, x, mask, mask, ld_alpha=1.5)
    with pytest.raises(ValueError, match="chosen_mask"):
        dpo_loss_from_token_logps(torch.zeros(B, 4), torch.zeros(B, 4), x, x, torch.ones(B, 3), torch.ones(B, 4))
    with pytest.raises(ValueError, match="aot"):
        DPOLoss(loss_type="aot_unpaired", use_weighting=True)
    with pytest.raises(ValueError, match="chosen_entropy"):
        dpo_loss_from_token_logps(torch.zeros(B, 4), torch.zeros(B, 4), x, x, torch.ones(B, 4), torch.ones(B, 4),
                                  chosen_entropy=torch.zeros(B, 3), rejected_entropy=torch.zeros(B, 4))  # fmt: skip


# --------------------------------------------------------------------------------------------
# cDPO (cdpo=True): label smoothing on sigmoid, opt-in (OpenRLHF DPOLoss; pinned against it in
# tests/frameworks/test_openrlhf_dpo_parity.py)
# --------------------------------------------------------------------------------------------
def _cdpo_reference(pc, pr, rc, rr, beta, eps):
    """cDPO in fp64 from its definition: the expected DPO loss when the label flips with probability ε."""
    z = beta * ((pc - rc) - (pr - rr)).double()
    return ((1 - eps) * -torch.nn.functional.logsigmoid(z) + eps * -torch.nn.functional.logsigmoid(-z)).mean()


def test_cdpo_on_every_entry_point():
    """``dpo_loss``, ``DPOLoss``, ``dpo_loss_from_token_logps`` and ``fused_linear_dpo_loss`` (its
    keywords pass through) all take ``cdpo`` and agree with the fp64 definition."""
    g = torch.Generator().manual_seed(21)
    B, T, H, V = 4, 7, 16, 53
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    rc, rr = -torch.rand(B, generator=g, dtype=torch.float64) * 20, -torch.rand(B, generator=g, dtype=torch.float64) * 20
    kw = dict(beta=0.3, label_smoothing=0.2, cdpo=True)
    fused, _ = alignkernels.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                                  backend="torch", **kw)  # fmt: skip
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    mask = labels != -100
    tok, _ = dpo_loss_from_token_logps(logp[:B], logp[B:], rc, rr, mask[:B], mask[B:], **kw)
    seq = torch.where(mask, logp, 0.0).sum(-1)
    direct, _ = dpo_loss(seq[:B], seq[B:], rc, rr, **kw)
    module, _ = DPOLoss(**kw)(seq[:B], seq[B:], rc, rr)
    expected = _cdpo_reference(seq[:B], seq[B:], rc, rr, 0.3, 0.2)
    for value in (fused, tok, direct, module):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-13)
    plain, _ = dpo_loss(seq[:B], seq[B:], rc, rr, beta=0.3, label_smoothing=0.2)  # TRL: smoothing ignored
    torch.testing.assert_close(plain, _cdpo_reference(seq[:B], seq[B:], rc, rr, 0.3, 0.0), rtol=1e-12, atol=1e-13)


def test_cdpo_bad_arguments_are_named():
    x = torch.zeros(3)
    with pytest.raises(TypeError, match="cdpo must be a bool"):
        dpo_loss(x, x, x, x, cdpo="yes")
    with pytest.raises(ValueError, match="cdpo=True smooths loss_type 'sigmoid'"):
        dpo_loss(x, x, x, x, loss_type="hinge", cdpo=True)
    with pytest.raises(ValueError, match="label_smoothing.*\\[0, 1\\]"):
        dpo_loss(x, x, x, x, label_smoothing=1.5, cdpo=True)
    with pytest.raises(ValueError, match="label_smoothing.*\\[0, 1\\]"):
        DPOLoss(label_smoothing=-0.1, cdpo=True)
