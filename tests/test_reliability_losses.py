"""Reliability of the losses and pooling ops: clear errors for bad inputs, fully masked / empty
batches, NaN isolation (masked garbage never leaks; a NaN sample makes the loss NaN but leaves the
other samples' gradients exact), and fp64 gradient checks of every differentiable public function.
"""
import math

import pytest
import torch

import alignkernels as ak
from helpers import TRITON_DEVICE

GRPO_LOSS_TYPES = ["grpo", "dapo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo"]
B, T = 3, 5


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _grpo_inputs(seed=0, dtype=torch.float32, device="cpu"):
    g = _g(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * 0.1
    ref = logp + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    to = dict(dtype=dtype, device=device)
    return logp.to(**to), old.to(**to), ref.to(**to), adv.to(**to), mask.to(device)


def _dpo_inputs(seed=0, dtype=torch.float32):
    g = _g(seed)
    return [(-torch.rand(4, generator=g) * 20).to(dtype) for _ in range(4)]


# ==============================================================================================
# Bad inputs, per public function: (function name, id, call, exception, message regex)
# ==============================================================================================
def _grpo(**over):
    logp, old, ref, adv, mask = _grpo_inputs()
    args = dict(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, mask=mask)
    kw = {k: v for k, v in over.items() if k not in args}
    args.update({k: v for k, v in over.items() if k in args})
    names = ("logp", "old_logp", "ref_logp", "advantages", "mask")
    return lambda: ak.grpo_loss(*(args[n] for n in names), **kw)


def _ppo(**over):
    logp, old, _, adv, mask = _grpo_inputs()
    args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
    kw = {k: v for k, v in over.items() if k not in args}
    args.update({k: v for k, v in over.items() if k in args})
    return lambda: ak.ppo_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kw)


def _vllm_ratio(**kw):
    from alignkernels.losses.grpo import vllm_importance_sampling_ratio

    logp, old, _, _, mask = _grpo_inputs()
    return vllm_importance_sampling_ratio(old, logp, mask, **kw)


def _dpo(**over):
    pc, pr, rc, rr = _dpo_inputs()
    args = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)
    args.update(over)
    return lambda: ak.dpo_loss(**args)


def _gae(**over):
    g = _g(1)
    args = dict(rewards=torch.randn(B, T, generator=g), values=torch.randn(B, T, generator=g), mask=torch.ones(B, T))
    args.update(over)
    return lambda: ak.gae(**args)


def _bt(**over):
    args = dict(chosen_rewards=torch.randn(4), rejected_rewards=torch.randn(4))
    args.update(over)
    return lambda: ak.bradley_terry_loss(**args)


def _fused_grpo(**over):
    g = _g(2)
    args = dict(hidden=torch.randn(2, 3, 8, generator=g), weight=torch.randn(11, 8, generator=g),
                completion_ids=torch.randint(0, 11, (2, 3), generator=g), advantages=torch.randn(2, generator=g),
                completion_mask=torch.ones(2, 3))  # fmt: skip
    args.update(over)
    return lambda: ak.fused_linear_grpo_loss(**args)


def _fused_dpo(**over):
    g = _g(3)
    args = dict(hidden=torch.randn(4, 3, 8, generator=g), weight=torch.randn(11, 8, generator=g),
                labels=torch.randint(0, 11, (4, 3), generator=g), ref_chosen_logps=torch.zeros(2),
                ref_rejected_logps=torch.zeros(2))  # fmt: skip
    args.update(over)
    return lambda: ak.fused_linear_dpo_loss(**args)


def _fused_ppo(**over):
    g = _g(4)
    args = dict(hidden=torch.randn(2, 3, 8, generator=g), weight=torch.randn(11, 8, generator=g),
                response_ids=torch.randint(0, 11, (2, 3), generator=g), old_logp=torch.zeros(2, 3),
                advantages=torch.randn(2, generator=g), mask=torch.ones(2, 3))  # fmt: skip
    args.update(over)
    return lambda: ak.fused_linear_ppo_loss(**args)


def _fused_ce(**over):
    g = _g(5)
    args = dict(hidden=torch.randn(2, 3, 8, generator=g), weight=torch.randn(11, 8, generator=g),
                labels=torch.tensor([[1, 4, -100], [0, -100, 10]]))  # fmt: skip
    args.update(over)
    return lambda: ak.fused_linear_cross_entropy(**args)


X3 = torch.randn(2, 3, 4)
BAD_INPUTS = [
    # ---- grpo_loss
    ("grpo_loss", "int-logp", _grpo(logp=torch.zeros(B, T, dtype=torch.long)), TypeError, "logp must be a floating"),
    ("grpo_loss", "logp-1d", _grpo(logp=torch.zeros(B)), ValueError, r"logp must be \[B, T\]"),
    ("grpo_loss", "logp-3d", _grpo(logp=torch.zeros(B, T, 1)), ValueError, r"logp must be \[B, T\]"),
    ("grpo_loss", "mask-shape", _grpo(mask=torch.ones(B, T + 1)), ValueError, "mask must have the shape"),
    ("grpo_loss", "old-shape", _grpo(old_logp=torch.zeros(B, T - 1)), ValueError, "old_logp must have (the )?shape"),
    ("grpo_loss", "int-old", _grpo(old_logp=torch.zeros(B, T, dtype=torch.long)), TypeError,
     "old_logp must be a floating"),
    ("grpo_loss", "adv-shape", _grpo(advantages=torch.zeros(B + 1)), ValueError, "advantages must have shape"),
    ("grpo_loss", "int-adv", _grpo(advantages=torch.zeros(B, dtype=torch.long)), TypeError,
     "advantages must be a floating"),
    ("grpo_loss", "mask-meta", _grpo(mask=torch.ones(B, T, device="meta")), ValueError, "same device"),
    ("grpo_loss", "ref-meta", _grpo(ref_logp=torch.ones(B, T, device="meta")), ValueError, "same device"),
    ("grpo_loss", "loss_type", _grpo(loss_type="ppo"), ValueError, "valid loss types"),
    ("grpo_loss", "is_level", _grpo(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
    ("grpo_loss", "beta-no-ref", _grpo(ref_logp=None, beta=0.1), ValueError, "ref_logp is required"),
    ("grpo_loss", "dr_grpo-no-L", _grpo(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    ("grpo_loss", "quantile>1", _grpo(top_entropy_quantile=1.5, entropy=torch.zeros(B, T)), ValueError,
     "top_entropy_quantile"),
    ("grpo_loss", "entropy-missing", _grpo(entropy_coef=0.1), ValueError, "entropy is required"),
    ("grpo_loss", "backend", _grpo(backend="jax"), ValueError, "backend must be one of"),
    ("grpo_loss", "eps<0", _grpo(epsilon_low=-0.2), ValueError, "epsilon"),
    ("grpo_loss", "num_items=0", _grpo(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("grpo_loss", "GA=0", _grpo(gradient_accumulation_steps=0), ValueError, "gradient_accumulation"),
    ("grpo_loss", "beta-str", _grpo(beta="0.1"), TypeError, "beta must be a number"),
    ("grpo_loss", "eps-str", _grpo(epsilon_high="0.28"), TypeError, "epsilon_high must be a number"),
    ("grpo_loss", "sapo-tau=0", _grpo(loss_type="sapo", sapo_temperature_neg=0.0), ValueError,
     "sapo_temperature_neg must be > 0"),
    ("grpo_loss", "backend-cuda", _grpo(backend="cuda"), ValueError, r"grpo_loss has no backend='cuda'"),
    # ---- ppo_loss
    ("ppo_loss", "int-logp", _ppo(logp=torch.zeros(B, T, dtype=torch.long)), TypeError, "logp must be a floating"),
    ("ppo_loss", "logp-1d", _ppo(logp=torch.zeros(B)), ValueError, r"logp must be \[B, T\]"),
    ("ppo_loss", "old-shape", _ppo(old_logp=torch.zeros(B, T + 1)), ValueError, "old_logp must have the shape"),
    ("ppo_loss", "mask-shape", _ppo(mask=torch.ones(B)), ValueError, "mask must have the shape"),
    ("ppo_loss", "adv-shape", _ppo(advantages=torch.zeros(T)), ValueError, "advantages must have shape"),
    ("ppo_loss", "mask-meta", _ppo(mask=torch.ones(B, T, device="meta")), ValueError, "same device"),
    ("ppo_loss", "values-no-returns", _ppo(values=torch.zeros(B, T)), ValueError, "returns is required"),
    ("ppo_loss", "agg-mode", _ppo(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    ("ppo_loss", "dual-clip<=1", _ppo(clip_ratio_c=0.5), ValueError, "clip_ratio_c"),
    ("ppo_loss", "entropy-missing", _ppo(entropy_coef=0.01), ValueError, "entropy is required"),
    ("ppo_loss", "cliprange<0", _ppo(cliprange=-0.2), ValueError, "cliprange"),
    ("ppo_loss", "vf_coef-str", _ppo(vf_coef="0.1"), TypeError, "vf_coef must be a number"),
    ("ppo_loss", "cliprange-str", _ppo(cliprange="0.2"), TypeError, "cliprange must be a number"),
    ("ppo_loss", "backend-cuda", _ppo(backend="cuda"), ValueError, r"ppo_loss has no backend='cuda'"),
    ("vllm_importance_sampling_ratio", "clip-str", lambda: _vllm_ratio(clip_max="3"), TypeError,
     "clip_max must be a number"),
    # ---- dpo_loss
    ("dpo_loss", "int-logps", _dpo(policy_chosen_logps=torch.zeros(4, dtype=torch.long)), TypeError,
     "must be a floating"),
    ("dpo_loss", "2d-logps", _dpo(policy_chosen_logps=torch.zeros(4, 2)), ValueError, r"must be 1-D \[B\]"),
    ("dpo_loss", "shape", _dpo(ref_rejected_logps=torch.zeros(5)), ValueError, "must have shape"),
    ("dpo_loss", "meta", _dpo(ref_rejected_logps=torch.zeros(4, device="meta")), ValueError, "is on meta"),
    ("dpo_loss", "B=0", _dpo(**{k: torch.zeros(0) for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                           "ref_chosen_logps", "ref_rejected_logps")}),
     ValueError, "at least one"),
    ("dpo_loss", "loss_type", _dpo(loss_type="simpo2"), ValueError, "valid loss types"),
    ("dpo_loss", "beta=0", _dpo(beta=0.0), ValueError, "beta"),
    ("dpo_loss", "beta=nan", _dpo(beta=float("nan")), ValueError, "beta"),
    ("dpo_loss", "ipo-no-lengths", _dpo(loss_type="ipo"), ValueError, "chosen_lengths"),
    ("dpo_loss", "robust-0.5", _dpo(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
    ("dpo_loss", "f-div", _dpo(f_divergence_type="tv"), ValueError, "f_divergence_type"),
    ("dpo_loss", "beta-str", _dpo(beta="x"), TypeError, "beta must be a number"),
    ("dpo_loss", "smoothing-str", _dpo(label_smoothing="0.1"), TypeError, "label_smoothing must be a number"),
    ("dpo_loss", "negative-lengths", _dpo(loss_type="ipo", chosen_lengths=torch.tensor([3, -1, 2, 2]),
                                          rejected_lengths=torch.full((4,), 2)), ValueError,
     "chosen_lengths must be token counts >= 0"),
    ("dpo_loss", "bool-lengths", _dpo(loss_type="sigmoid_norm", chosen_lengths=torch.ones(4, dtype=torch.bool),
                                      rejected_lengths=torch.full((4,), 2)), TypeError, "chosen_lengths must hold"),
    ("dpo_loss", "nan-lengths", _dpo(loss_type="sft", chosen_lengths=torch.tensor([1.0, float("nan"), 2.0, 2.0])),
     ValueError, "chosen_lengths must be token counts"),
    # ---- bradley_terry_loss
    ("bradley_terry_loss", "int", _bt(chosen_rewards=torch.zeros(4, dtype=torch.long)), TypeError,
     "must be a floating"),
    ("bradley_terry_loss", "3d", _bt(chosen_rewards=torch.zeros(4, 1, 1), rejected_rewards=torch.zeros(4, 1, 1)),
     ValueError, r"\[B\] or \[B, K\]"),
    ("bradley_terry_loss", "shape", _bt(rejected_rewards=torch.zeros(5)), ValueError, "same shape"),
    ("bradley_terry_loss", "meta", _bt(rejected_rewards=torch.zeros(4, device="meta")), ValueError, "meta"),
    ("bradley_terry_loss", "B=0", _bt(chosen_rewards=torch.zeros(0), rejected_rewards=torch.zeros(0)), ValueError,
     "at least one"),
    ("bradley_terry_loss", "margin-shape", _bt(margin=torch.zeros(3)), ValueError, "margin must be"),
    ("bradley_terry_loss", "margin-meta", _bt(margin=torch.zeros(4, device="meta")), ValueError, "margin is on meta"),
    ("bradley_terry_loss", "reduction", _bt(reduction="sum"), ValueError, "reduction"),
    ("bradley_terry_loss", "margin-str", _bt(margin="1.0"), TypeError, "margin must be a number"),
    ("bradley_terry_loss", "center-str", _bt(center_rewards_coefficient="0.01"), TypeError,
     "center_rewards_coefficient must be a number"),
    # ---- gae
    ("gae", "int-rewards", _gae(rewards=torch.zeros(B, T, dtype=torch.long)), TypeError, "rewards must be a floating"),
    ("gae", "int-values", _gae(values=torch.zeros(B, T, dtype=torch.long)), TypeError, "values must be a floating"),
    ("gae", "rewards-1d", _gae(rewards=torch.zeros(T)), ValueError, r"rewards must be \[B, T\]"),
    ("gae", "values-shape", _gae(values=torch.zeros(B, T + 1)), ValueError, "values must have the shape"),
    ("gae", "mask-shape", _gae(mask=torch.ones(B, 1)), ValueError, "mask must have the shape"),
    ("gae", "mask-meta", _gae(mask=torch.ones(B, T, device="meta")), ValueError, "same device"),
    ("gae", "backend", _gae(backend="numpy"), ValueError, "backend must be one of"),
    ("gae", "gamma=nan", _gae(gamma=float("nan")), ValueError, "gamma"),
    ("gae", "lam-str", _gae(lam="0.95"), TypeError, "lam must be a number"),
    # ---- group_advantages
    ("group_advantages", "int", lambda: ak.group_advantages(torch.zeros(4, dtype=torch.long), 2), TypeError,
     "rewards must be a floating"),
    ("group_advantages", "3d", lambda: ak.group_advantages(torch.zeros(4, 2, 1), 2), ValueError, r"\[B\] or \[B, K\]"),
    ("group_advantages", "group=0", lambda: ak.group_advantages(torch.zeros(4), 0), ValueError, "group_size"),
    ("group_advantages", "group=1.5", lambda: ak.group_advantages(torch.zeros(4), 1.5), TypeError, "group_size"),
    ("group_advantages", "not-divisible", lambda: ak.group_advantages(torch.zeros(5), 2), ValueError, "must divide"),
    ("group_advantages", "scale", lambda: ak.group_advantages(torch.zeros(4), 2, scale="prompt"), ValueError, "scale"),
    ("group_advantages", "weights", lambda: ak.group_advantages(torch.zeros(4, 2), 2, reward_weights=[1.0]),
     ValueError, "reward_weights"),
    ("group_advantages", "B=0", lambda: ak.group_advantages(torch.zeros(0), 2), ValueError, "rewards"),
    ("group_advantages", "weights-str", lambda: ak.group_advantages(torch.zeros(4, 2), 2, reward_weights=["a", "b"]),
     TypeError, "reward_weights must be"),
    # ---- gather_last / last_token_index / sequence_logprobs
    ("gather_last", "mask-shape", lambda: ak.gather_last(X3, torch.ones(2, 4)), ValueError,
     "attention_mask must have shape"),
    ("gather_last", "two-masks", lambda: ak.gather_last(X3, torch.ones(2, 3), cu_seqlens=torch.tensor([0, 3])),
     ValueError, "at most one"),
    ("gather_last", "numpy", lambda: ak.gather_last(X3.numpy(), torch.ones(2, 3)), TypeError,
     "x must be a torch.Tensor"),
    ("gather_last", "1d-x", lambda: ak.gather_last(torch.zeros(3), torch.ones(3)), ValueError, r"\[B, T, \.\.\.\]"),
    ("gather_last", "T=0", lambda: ak.gather_last(torch.zeros(2, 0, 4), torch.ones(2, 0)), ValueError, "T = 0"),
    ("gather_last", "meta-mask", lambda: ak.gather_last(X3, torch.ones(2, 3, device="meta")), ValueError,
     "same device"),
    ("gather_last", "ids-no-pad", lambda: ak.gather_last(X3, input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError,
     "pad_token_id"),
    ("gather_last", "float-cu", lambda: ak.gather_last(X3[0], cu_seqlens=torch.tensor([0.0, 3.0])), TypeError,
     "cu_seqlens must be an integer"),
    ("last_token_index", "none", lambda: ak.last_token_index(), ValueError, "exactly one"),
    ("last_token_index", "scalar-mask", lambda: ak.last_token_index(torch.tensor(1)), ValueError, "at least 1"),
    ("last_token_index", "float-ids", lambda: ak.last_token_index(input_ids=torch.ones(2, 3), pad_token_id=0),
     TypeError, "input_ids must be an integer"),
    ("last_token_index", "cu-2d", lambda: ak.last_token_index(cu_seqlens=torch.zeros(2, 2, dtype=torch.long)),
     ValueError, "cu_seqlens must be 1-D"),
    ("sequence_logprobs", "int", lambda: ak.sequence_logprobs(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)),
     TypeError, "logp must be a floating"),
    ("sequence_logprobs", "shape", lambda: ak.sequence_logprobs(torch.zeros(2, 3), torch.ones(2, 4)), ValueError,
     "mask must have shape"),
    ("sequence_logprobs", "meta", lambda: ak.sequence_logprobs(torch.zeros(2, 3), torch.ones(2, 3, device="meta")),
     ValueError, "same device"),
    ("sequence_logprobs", "scalar", lambda: ak.sequence_logprobs(torch.tensor(0.0), torch.tensor(1.0)), ValueError,
     "at least 1"),
    # ---- fused losses (validation of linear_logprobs + the loss)
    ("fused_linear_grpo_loss", "mask-shape", _fused_grpo(completion_mask=torch.ones(2, 4)), ValueError,
     "mask must have the shape"),
    ("fused_linear_grpo_loss", "int-hidden", _fused_grpo(hidden=torch.zeros(2, 3, 8, dtype=torch.long)), TypeError,
     "hidden must be a floating"),
    ("fused_linear_grpo_loss", "label>=V", _fused_grpo(completion_ids=torch.full((2, 3), 11)), ValueError,
     "labels must be in"),
    ("fused_linear_grpo_loss", "loss_type", _fused_grpo(loss_type="x"), ValueError, "valid loss types"),
    ("fused_linear_dpo_loss", "odd-batch", _fused_dpo(labels=torch.zeros(3, 3, dtype=torch.long),
                                                      hidden=torch.zeros(3, 3, 8)), ValueError, r"\[2B, T\]"),
    ("fused_linear_dpo_loss", "one-ref", _fused_dpo(ref_rejected_logps=None), ValueError, "both"),
    ("fused_linear_dpo_loss", "no-ref", _fused_dpo(ref_rejected_logps=None, ref_chosen_logps=None), ValueError,
     "ref_hidden"),
    ("fused_linear_dpo_loss", "H-mismatch", _fused_dpo(weight=torch.zeros(11, 7)), ValueError, "weight.shape"),
    ("fused_linear_ppo_loss", "mask-shape", _fused_ppo(mask=torch.ones(2, 2)), ValueError, "mask must have the shape"),
    ("fused_linear_ppo_loss", "weight-meta", _fused_ppo(weight=torch.zeros(11, 8, device="meta")), ValueError,
     "same device"),
    ("fused_linear_ppo_loss", "T=0", _fused_ppo(temperature=0.0), ValueError, "temperature"),
    ("fused_linear_ppo_loss", "adv-shape", _fused_ppo(advantages=torch.zeros(5)), ValueError, "advantages"),
]


def _case(c):
    return c.values[0] if hasattr(c, "values") else c


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f"{_case(c)[0]}-{_case(c)[1]}" for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(case):
    _, _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def bad_input_counts():
    """{function: number of bad inputs tried} (reported in docs/RELIABILITY.md)."""
    counts = {}
    for c in BAD_INPUTS:
        counts[_case(c)[0]] = counts.get(_case(c)[0], 0) + 1
    return counts


# ==============================================================================================
# Configuration values: every count or length argument of every loss. Before, a
# zero gave an infinite or zero loss, a negative one a sign-flipped loss, a bool or float was
# used as a number -- all without an error.
# ==============================================================================================
def _agg_rows(*args):
    from alignkernels.losses.ppo import agg_rows

    return agg_rows(*args)


def _prm_loss(**kw):
    g = _g(20)
    return lambda: ak.prm_loss(torch.randn(5, 2, generator=g), torch.tensor([0, 1, 1, -100, 0]), **kw)


def _aggregate(**kw):
    return lambda: ak.aggregate_step_scores(torch.rand(4), seq_index=torch.tensor([0, 0, 1, 1]), **kw)


def _prm_scores(**kw):
    g = _g(21)
    h, w = torch.randn(2, 4, 6, generator=g), torch.randn(2, 6, generator=g)
    return lambda: ak.prm_step_scores(h, w, torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]]), **kw)


# (function, argument, call(value) -> thunk, minimum)
COUNT_ARGUMENTS = [
    ("grpo_loss", "gradient_accumulation_steps", lambda v: _grpo(gradient_accumulation_steps=v), 1),
    ("grpo_loss", "steps_per_generation", lambda v: _grpo(steps_per_generation=v), 1),
    ("grpo_loss", "num_processes", lambda v: _grpo(num_processes=v), 1),
    ("grpo_loss", "max_completion_length", lambda v: _grpo(loss_type="dr_grpo", max_completion_length=v), 1),
    ("grpo_loss", "num_items_in_batch", lambda v: _grpo(num_items_in_batch=v), 1),
    ("grpo_loss(eval)", "num_items_in_batch", lambda v: _grpo(num_items_in_batch=v, training=False), 1),
    ("group_advantages", "group_size", lambda v: lambda: ak.group_advantages(torch.zeros(4), v), 1),
    ("prm_loss", "num_items_in_batch", lambda v: _prm_loss(num_items_in_batch=v), 1),
    ("fused_linear_cross_entropy", "num_items_in_batch", lambda v: _fused_ce(num_items_in_batch=v), 1),
    ("aggregate_step_scores", "num_sequences", lambda v: _aggregate(num_sequences=v), 0),
    ("prm_step_scores", "positive_class", lambda v: _prm_scores(positive_class=v), 0),
    ("agg_rows", "seq_len", lambda v: lambda: _agg_rows(torch.ones(2), torch.ones(2), v, "seq-mean-token-sum-norm"), 1),
]
BAD_COUNTS = [  # (id, value, exception)
    ("zero", 0, ValueError), ("negative", -2, ValueError), ("bool", True, TypeError), ("float", 2.5, TypeError),
    ("whole-float", 4.0, TypeError), ("str", "4", TypeError), ("none", None, TypeError),
]  # fmt: skip


def _count_cases():
    for fn, arg, call, minimum in COUNT_ARGUMENTS:
        for vid, value, exc in BAD_COUNTS:
            if value == 0 and minimum == 0 and not isinstance(value, bool):
                continue  # zero is a valid index / an empty output there
            if value is None and arg in ("num_items_in_batch", "steps_per_generation", "max_completion_length",
                                         "num_sequences"):
                continue  # None means "not given" (the documented default)
            yield pytest.param(call, value, exc, arg, id=f"{fn}-{arg}-{vid}")


@pytest.mark.parametrize("call,value,exc,arg", list(_count_cases()))
def test_bad_count_is_a_clear_error_naming_it(call, value, exc, arg):
    with pytest.raises(exc, match=arg):
        call(value)()


@pytest.mark.parametrize("value,exc", [
    (torch.tensor(0), ValueError), (torch.tensor(-3.0), ValueError), (torch.tensor(float("nan")), ValueError),
    (torch.tensor(float("inf")), ValueError), (torch.tensor([4, 5]), TypeError), (torch.tensor(True), TypeError),
], ids=["zero", "negative", "nan", "inf", "two-values", "bool"])  # fmt: skip
@pytest.mark.parametrize("fn", ["grpo_loss", "prm_loss", "fused_linear_cross_entropy"])
def test_bad_num_items_tensor_is_a_clear_error(fn, value, exc):
    call = {"grpo_loss": _grpo, "prm_loss": _prm_loss, "fused_linear_cross_entropy": _fused_ce}[fn](
        num_items_in_batch=value)
    with pytest.raises(exc, match="num_items_in_batch"):
        call()


def test_num_items_in_batch_int_or_scalar_tensor_give_one_loss():
    """TRL passes a tensor (int or float); a plain int is the same count."""
    losses = [_grpo(num_items_in_batch=v, loss_type=lt)()[0] for lt in ("dapo", "cispo")
              for v in (7, torch.tensor(7), torch.tensor(7.0), torch.tensor([7]))]  # fmt: skip
    for loss in losses[1:4]:
        assert torch.equal(loss, losses[0])
    assert torch.isfinite(torch.stack(losses)).all()
    prm = [_prm_loss(num_items_in_batch=v)()[0] for v in (3, torch.tensor(3), torch.tensor(3.0))]
    assert torch.equal(prm[0], prm[1]) and torch.equal(prm[0], prm[2])


def test_num_items_zero_is_trl_for_a_fully_masked_batch_only():
    """TRL passes 0 when every completion is masked and clamps it at 1: loss 0, gradient 0. With
    valid tokens present the same 0 is an error (test_bad_count_... above)."""
    logp, old, ref, adv, mask = _grpo_inputs()
    lp = logp.requires_grad_()
    for zero in (0, torch.tensor(0), torch.tensor(0.0)):
        loss, _ = ak.grpo_loss(lp, old, ref, adv, torch.zeros_like(mask), beta=0.1, num_items_in_batch=zero)
        (grad,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0.0 and torch.all(grad == 0)


def test_valid_counts_still_scale_the_loss_as_trl():
    """The validated values keep TRL's arithmetic: dapo divides by num_items / num_processes * GA / steps."""
    base, _ = _grpo(num_items_in_batch=12)()
    scaled, _ = _grpo(num_items_in_batch=12, num_processes=2, gradient_accumulation_steps=4,
                      steps_per_generation=8)()  # fmt: skip
    torch.testing.assert_close(scaled, base * 2 * 8 / 4)


# ==============================================================================================
# One dispatch rule: a backend a loss lacks is the same clear error, never a silent fallback
# ==============================================================================================
@pytest.mark.parametrize("fn", ["grpo_loss", "ppo_loss"])
def test_backend_cuda_is_an_error_not_the_torch_path(fn):
    call = _grpo(backend="cuda") if fn == "grpo_loss" else _ppo(backend="cuda")
    with pytest.raises(ValueError, match=rf"{fn} has no backend='cuda'; its backends are \('triton', 'torch'"):
        call()


def test_gae_backend_cuda_needs_cuda_tensors():
    with pytest.raises(ValueError, match="gae: backend='cuda' needs CUDA tensors"):
        _gae(backend="cuda")()


def test_losses_declare_their_backends():
    from alignkernels._utils import OpBackends
    from alignkernels.losses import grpo, ppo  # noqa: F401  (declares on import)

    assert OpBackends.registry["grpo_loss"].backends == ("triton", "torch", "reference")
    assert OpBackends.registry["ppo_loss"].backends == ("triton", "torch", "reference")
    assert OpBackends.registry["gae"].backends == ("triton", "cuda", "torch", "reference")


# ==============================================================================================
# Double backward: the PyTorch paths are twice differentiable (checked against
# finite differences of the gradient); the Triton GRPO/PPO rows raise one clear error.
# ==============================================================================================
def _ggc(fn, *inputs):
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_double_backward_grpo_torch(loss_type):
    logp, old, ref, adv, mask = _grpo_inputs(dtype=torch.float64)
    _ggc(lambda lp: ak.grpo_loss(lp, old, ref, adv, mask, beta=0.05, loss_type=loss_type, backend="torch")[0],
         logp.requires_grad_())  # fmt: skip


def test_double_backward_ppo_dpo_reward_torch():
    logp, old, _, adv, mask = _grpo_inputs(dtype=torch.float64)
    g = _g(22)
    v = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    _ggc(lambda lp, v: ak.ppo_loss(lp, old, adv, mask, v, v.detach(), ret, backend="torch")[0],
         logp.requires_grad_(), v)  # fmt: skip
    pc, pr, rc, rr = [t.requires_grad_() for t in _dpo_inputs(dtype=torch.float64)]
    _ggc(lambda pc, pr: ak.dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)[0], pc, pr)
    c, r = (torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    _ggc(lambda c, r: ak.bradley_terry_loss(c, r, center_rewards_coefficient=0.01)[0], c, r)


@pytest.mark.parametrize("fn", ["grpo_loss", "ppo_loss"])
def test_double_backward_triton_is_one_clear_error(fn):
    logp, old, ref, adv, mask = _grpo_inputs(device=TRITON_DEVICE)
    lp = logp.requires_grad_()
    if fn == "grpo_loss":
        loss, _ = ak.grpo_loss(lp, old, ref, adv, mask, beta=0.05, backend="triton")
    else:
        loss, _ = ak.ppo_loss(lp, old, adv, mask, backend="triton")
    (grad,) = torch.autograd.grad(loss, lp)  # once: fine
    assert torch.isfinite(grad).all()
    loss, _ = (ak.grpo_loss(lp, old, ref, adv, mask, beta=0.05, backend="triton") if fn == "grpo_loss"
               else ak.ppo_loss(lp, old, adv, mask, backend="triton"))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss, lp, create_graph=True)


# ==============================================================================================
# Fully masked / empty batches: finite loss, zero gradient
# ==============================================================================================
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_fully_masked_batch_is_zero_with_zero_grad(backend, loss_type, level):
    logp, old, ref, adv, mask = _grpo_inputs()
    logp = logp.requires_grad_()
    loss, metrics = ak.grpo_loss(logp, old, ref, adv, torch.zeros_like(mask), beta=0.1, loss_type=loss_type,
                                 importance_sampling_level=level, max_completion_length=T, backend=backend)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    # TRL logs nanmin/nanmax over no token as NaN: the only NaNs allowed, and only in those two metrics
    assert all(torch.isfinite(v) for k, v in metrics.items() if k not in ("clip_ratio/low_min", "clip_ratio/high_max"))


def test_grpo_empty_batch():
    logp = torch.zeros(0, 4, requires_grad=True)
    try:
        loss, _ = ak.grpo_loss(logp, None, None, torch.zeros(0), torch.ones(0, 4), backend="torch")
    except ValueError as err:  # a clear error is acceptable
        assert "B" in str(err)
        return
    assert loss.item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_fully_masked_batch_is_zero_with_zero_grad(mode):
    logp, old, _, adv, mask = _grpo_inputs()
    logp, values = logp.requires_grad_(), torch.randn(B, T).requires_grad_()
    ent = torch.rand(B, T).requires_grad_()
    loss, metrics = ak.ppo_loss(logp, old, adv, torch.zeros_like(mask), values, torch.randn(B, T), torch.randn(B, T),
                                loss_agg_mode=mode, entropy=ent, entropy_coef=0.01)  # fmt: skip
    grads = torch.autograd.grad(loss, (logp, values, ent))
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_dpo_fully_masked_sequences_give_log2():
    from alignkernels.losses.dpo import dpo_loss_from_token_logps

    z = torch.zeros(2, 4, requires_grad=True)
    zeros = torch.zeros(2, 4)
    loss, _ = dpo_loss_from_token_logps(z, z, zeros, zeros, zeros, zeros)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_gae_empty(backend, shape):
    adv, ret = ak.gae(torch.zeros(shape), torch.zeros(shape), torch.ones(shape), backend=backend)
    assert adv.shape == shape and ret.shape == shape


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gae_fully_masked_rows_are_zero(backend):
    g = _g(5)
    m = torch.ones(B, T)
    m[1] = 0
    adv, ret = ak.gae(torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), m, backend=backend, whiten=True)
    assert torch.all(adv[1] == 0) and torch.all(ret[1] == 0) and torch.isfinite(adv).all()


def test_pooling_empty_and_fully_masked():
    logp = torch.randn(3, 4, requires_grad=True)
    mask = torch.ones(3, 4)
    mask[1] = 0
    for average in (False, True):
        s = ak.sequence_logprobs(logp, mask, average=average)
        (g,) = torch.autograd.grad(s.sum(), logp)
        assert s[1] == 0 and torch.all(g[1] == 0)
    assert ak.sequence_logprobs(torch.zeros(0, 4), torch.ones(0, 4)).shape == (0,)
    out = ak.gather_last(torch.randn(3, 4, 2), mask, zero_empty=True)
    assert torch.all(out[1] == 0)
    assert ak.gather_last(torch.randn(0, 4, 2), torch.ones(0, 4)).shape == (0, 2)
    assert ak.last_token_index(torch.zeros(0, 4)).shape == (0,)


# ==============================================================================================
# NaN isolation
# ==============================================================================================
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_nan_at_masked_positions_never_leaks(backend, loss_type, level):
    logp, old, ref, adv, mask = _grpo_inputs()
    dirty = [t.clone() for t in (logp, old, ref)]
    for t, v in zip(dirty, (float("nan"), float("inf"), float("-inf"))):
        t[1, 4] = v  # masked position
    kw = dict(beta=0.1, loss_type=loss_type, importance_sampling_level=level, max_completion_length=T, backend=backend)
    x = dirty[0].requires_grad_()
    loss, metrics = ak.grpo_loss(x, dirty[1], dirty[2], adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    y = logp.clone().requires_grad_()
    loss_c, _ = ak.grpo_loss(y, old, ref, adv, mask, **kw)
    (grad_c,) = torch.autograd.grad(loss_c, y)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, loss_c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_c, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_grpo_nan_in_one_sequence_is_loud_and_contained(backend, loss_type):
    """A NaN log-prob on a valid token makes the loss NaN (never hidden), while the gradient of every
    other sequence is exactly what it is without the bad sequence's contribution."""
    logp, old, ref, adv, mask = _grpo_inputs()
    x = logp.clone()
    x[2, 1] = float("nan")
    x.requires_grad_()
    kw = dict(loss_type=loss_type, backend=backend)
    loss, _ = ak.grpo_loss(x, old, None, adv, mask, **kw)
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad[:2]).all()
    y = logp.clone().requires_grad_()
    loss_c, _ = ak.grpo_loss(y, old, None, adv, mask, **kw)
    (grad_c,) = torch.autograd.grad(loss_c, y)
    torch.testing.assert_close(grad[:2], grad_c[:2], rtol=1e-6, atol=1e-7)


def test_ppo_nan_masked_never_leaks_and_nan_valid_is_contained():
    logp, old, _, adv, mask = _grpo_inputs()
    x = logp.clone()
    x[1, 4] = float("nan")  # masked
    o = old.clone()
    o[1, 4] = float("inf")
    v, ov, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    v[1, 4] = ov[1, 4] = ret[1, 4] = float("nan")
    loss, metrics = ak.ppo_loss(x, o, adv, mask, v, ov, ret)
    loss_c, _ = ak.ppo_loss(logp, old, adv, mask, torch.where(mask > 0, v, 0), torch.where(mask > 0, ov, 0),
                            torch.where(mask > 0, ret, 0))  # fmt: skip
    assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values())
    torch.testing.assert_close(loss, loss_c)
    x = logp.clone()
    x[0, 0] = float("nan")
    x.requires_grad_()
    loss, _ = ak.ppo_loss(x, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isnan(loss) and torch.isfinite(grad[1:]).all()


def test_dpo_and_bradley_terry_nan_pair_is_loud_and_contained():
    pc, pr, rc, rr = [t.clone() for t in _dpo_inputs()]
    pc[1] = float("nan")
    pc.requires_grad_()
    for lt in ("sigmoid", "hinge", "ipo", "robust", "bco_pair"):
        kw = dict(chosen_lengths=torch.full((4,), 3.0), rejected_lengths=torch.full((4,), 3.0)) if lt == "ipo" else {}
        loss, _ = ak.dpo_loss(pc, pr, rc, rr, loss_type=lt, label_smoothing=0.1 if lt == "robust" else 0.0, **kw)
        (grad,) = torch.autograd.grad(loss, pc)
        assert torch.isnan(loss), lt
        assert torch.isfinite(grad[[0, 2, 3]]).all(), lt
    c, r = torch.randn(4), torch.randn(4)
    c[2] = float("nan")
    c.requires_grad_()
    loss, _ = ak.bradley_terry_loss(c, r)
    (grad,) = torch.autograd.grad(loss, c)
    assert torch.isnan(loss) and torch.isfinite(grad[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gae_nan_in_one_row_stays_in_that_row(backend):
    g = _g(6)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    r[1, 2] = float("nan")
    adv, ret = ak.gae(r, v, torch.ones(B, T), backend=backend)
    assert torch.isnan(adv[1, :3]).all() and torch.isfinite(adv[[0, 2]]).all() and torch.isfinite(ret[[0, 2]]).all()
    clean_adv, _ = ak.gae(r[[0, 2]], v[[0, 2]], torch.ones(2, T), backend=backend)
    torch.testing.assert_close(adv[[0, 2]], clean_adv)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gae_nan_at_masked_positions_never_leaks(backend):
    """Masked steps "contribute neither reward nor value" (gae's docstring): garbage there must not
    change any output."""
    g = _g(7)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.ones(B, T)
    m[0, 4] = m[2, 1] = 0
    r_dirty, v_dirty = r.clone(), v.clone()
    r_dirty[0, 4] = v_dirty[0, 4] = float("nan")
    r_dirty[2, 1] = v_dirty[2, 1] = float("inf")
    adv, ret = ak.gae(r_dirty, v_dirty, m, backend=backend)
    adv_c, ret_c = ak.gae(r, v, m, backend=backend)
    torch.testing.assert_close(adv, adv_c)
    torch.testing.assert_close(ret, ret_c)


def test_sequence_logprobs_and_gather_last_isolate_nan():
    logp = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    logp[0, 3], mask[0, 3] = float("nan"), 0  # masked: ignored
    logp[2, 0] = float("inf")  # valid: that row only
    x = logp.clone().requires_grad_()
    s = ak.sequence_logprobs(x, mask)
    assert torch.isfinite(s[:2]).all() and torch.isinf(s[2])
    (g,) = torch.autograd.grad(s[:2].sum(), x)
    assert torch.isfinite(g).all() and torch.all(g[0, 3] == 0)
    h = torch.randn(3, 4, 2)
    h[1, 0] = float("nan")  # not the last valid position: never read
    out = ak.gather_last(h, mask)
    assert torch.isfinite(out).all()


# ==============================================================================================
# fp64 gradient checks of every differentiable public function
# ==============================================================================================
def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_token_logprobs_torch_backend():
    g = _g(10)
    x = torch.randn(2, 3, 13, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (2, 3), generator=g)
    labels[0, 1] = -100
    _gc(lambda t: ak.token_logprobs(t, labels, temperature=0.7, return_entropy=True, backend="torch"), x)
    _gc(lambda t: ak.token_logprobs(t[:, :-1], labels[:, 1:], backend="torch"), x)  # strided slice


def test_gradcheck_linear_logprobs_torch_backend():
    g = _g(11)
    h = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(9, 6, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = (torch.randn(9, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    labels = torch.randint(0, 9, (5,), generator=g)
    labels[2] = -100

    def f(h, w, b):
        return ak.linear_logprobs(h, w, labels, bias=b, return_entropy=True, logit_scale=1.3, softcap=4.0,
                                  temperature=0.8, chunk_size=2, vocab_block_size=4, backend="torch")  # fmt: skip

    _gc(f, h, w, b)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_grpo_loss(loss_type, level):
    logp, old, ref, adv, mask = _grpo_inputs(dtype=torch.float64)
    ent = torch.rand(B, T, dtype=torch.float64, generator=_g(12)).requires_grad_()
    kw = dict(beta=0.05, loss_type=loss_type, importance_sampling_level=level, max_completion_length=T,
              entropy=None, backend="torch")  # fmt: skip
    _gc(lambda lp: ak.grpo_loss(lp, old, ref, adv, mask, **kw)[0], logp.requires_grad_())
    kw.update(entropy=ent, entropy_coef=0.01)
    _gc(lambda lp, e: ak.grpo_loss(lp, old, ref, adv, mask, **{**kw, "entropy": e})[0], logp, ent)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gradcheck_ppo_loss(mode):
    logp, old, _, adv, mask = _grpo_inputs(dtype=torch.float64)
    g = _g(13)
    v = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    ov, ret = v.detach() + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(
        B, T, generator=g, dtype=torch.float64)  # fmt: skip
    ent = torch.rand(B, T, generator=g, dtype=torch.float64, requires_grad=True)

    def f(lp, v, e):
        return ak.ppo_loss(lp, old, adv, mask, v, ov, ret, loss_agg_mode=mode, entropy=e, entropy_coef=0.01,
                           clip_ratio_c=3.0)[0]  # fmt: skip

    _gc(f, logp.requires_grad_(), v, ent)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "bco_pair", "exo_pair", "apo_zero",
                                       "discopop", "sigmoid_norm", "sft"])  # fmt: skip
def test_gradcheck_dpo_loss(loss_type):
    pc, pr, rc, rr = [t.requires_grad_() for t in _dpo_inputs(dtype=torch.float64)]
    lengths = dict(chosen_lengths=torch.full((4,), 5.0, dtype=torch.float64),
                   rejected_lengths=torch.full((4,), 7.0, dtype=torch.float64))  # fmt: skip
    smoothing = {"robust": 0.1, "exo_pair": 0.1}.get(loss_type, 0.0)

    def f(pc, pr, rc, rr):
        return ak.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=smoothing, **lengths)[0]

    _gc(f, pc, pr, rc, rr)


def test_gradcheck_bradley_terry_and_pooling():
    g = _g(14)
    c = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(4, generator=g, dtype=torch.float64)
    _gc(lambda c, r: ak.bradley_terry_loss(c, r, margin=margin, center_rewards_coefficient=0.01)[0], c, r)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    _gc(lambda t: ak.sequence_logprobs(t, mask, average=True), logp)
    x = torch.randn(3, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    _gc(lambda t: ak.gather_last(t, mask, zero_empty=True), x)
    _gc(lambda t: ak.gather_last(t.reshape(15, 2), cu_seqlens=torch.tensor([0, 4, 4, 15])), x)


def test_gradcheck_fused_losses_torch_backend():
    g = _g(15)
    H, V = 4, 7
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    h = torch.randn(2, 3, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (2, 3), generator=g)
    mask = torch.ones(2, 3)
    mask[1, 2] = 0
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    old = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 2
    # gradcheck re-runs backward on one graph: the four-GEMM path (the three-GEMM head forms its gradient
    # once, in the forward; tests/losses/test_head_paths.py checks it by finite differences)
    _gc(lambda h, w: ak.fused_linear_grpo_loss(h, w, ids, adv, mask, old_logp=old, loss_type="grpo",
                                               backend="torch", head_path="four_gemm")[0], h, w)  # fmt: skip
    _gc(lambda h, w: ak.fused_linear_ppo_loss(h, w, ids, old, adv, mask, backend="torch", head_path="four_gemm")[0],
        h, w)  # fmt: skip
    h4 = torch.randn(4, 3, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (4, 3), generator=g)
    labels[:, 0] = -100
    refs = dict(ref_chosen_logps=-torch.rand(2, dtype=torch.float64) * 5,
                ref_rejected_logps=-torch.rand(2, dtype=torch.float64) * 5)  # fmt: skip
    _gc(lambda h, w: ak.fused_linear_dpo_loss(h, w, labels, backend="torch", **refs)[0], h4, w)


def test_gae_is_documented_as_not_differentiable():
    r = torch.randn(2, 3, requires_grad=True)
    adv, ret = ak.gae(r, torch.randn(2, 3), torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad
