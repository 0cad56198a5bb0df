"""The small typed values the losses take whole or field by field: ``grpo.PolicyConfig``,
``policy_rows.TrainerState``, ``ppo.PPOConfig`` and the fused entries' ``fused.HeadOptions``.
Given whole or as keywords they give the same bits; both at once, a value of another type or an
unknown keyword is a ``TypeError`` naming them. Values against TRL / fp64 are pinned in
``tests/losses/test_grpo.py``, ``test_ppo.py`` and ``test_fused_losses.py``."""
import dataclasses
import inspect

import pytest
import torch

from alignkernels.losses.fused import (
    HeadOptions, fused_linear_cross_entropy, fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_ppo_loss,
    fused_linear_verl_policy_loss, grpo_non_separable_reason,
)  # fmt: skip
from alignkernels.losses.grpo import GRPOLoss, PolicyConfig, grpo_loss
from alignkernels.losses.policy_rows import TrainerState
from alignkernels.losses.ppo import PPOConfig, PPOLoss, ppo_loss
from alignkernels.ops.linear_logprobs import linear_logprobs

B, T, H, V = 4, 6, 16, 53


def _tokens(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    ent = torch.rand(B, T, generator=g, dtype=dtype) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    return logp, old, ref, adv, ent, mask


def _head_inputs(seed=1, rows=B, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.3
    ids = torch.randint(0, V, (rows, T), generator=g)
    return hidden, weight, ids


def _loss_and_grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


GRPO_KEYWORDS = dict(loss_type="dr_grpo", beta=0.04, epsilon_low=0.1, epsilon_high=0.3, delta=1.5, entropy_coef=0.01,
                     max_completion_length=T, gradient_accumulation_steps=2, num_processes=1)  # fmt: skip


def test_grpo_loss_takes_policy_config_and_trainer_state_whole():
    logp, old, ref, adv, ent, mask = _tokens()
    config = PolicyConfig(loss_type="dr_grpo", beta=0.04, epsilon_low=0.1, epsilon_high=0.3, delta=1.5,
                          entropy_coef=0.01)  # fmt: skip
    state = TrainerState(max_completion_length=T, gradient_accumulation_steps=2, num_processes=1)

    def whole(x, e):
        return grpo_loss(x, old, ref, adv, mask, entropy=e, config=config, state=state, backend="torch")

    def keywords(x, e):
        return grpo_loss(x, old, ref, adv, mask, entropy=e, backend="torch", **GRPO_KEYWORDS)

    _same(_loss_and_grads(whole, logp, ent), _loss_and_grads(keywords, logp, ent))
    _, m1 = whole(logp, ent)
    _, m2 = keywords(logp, ent)
    assert m1.keys() == m2.keys() and "kl" in m1 and "policy_loss" in m1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: grpo_loss(*t, config=PolicyConfig(), beta=0.1), r"config= .*beta="),
        (lambda t: grpo_loss(*t, state=TrainerState(), gradient_accumulation_steps=2),
         r"state= .*gradient_accumulation_steps="),
        (lambda t: ppo_loss(t[0], t[1], t[3], t[4], config=PPOConfig(), cliprange=0.3), r"config= .*cliprange="),
    ],
    ids=["grpo-config", "grpo-state", "ppo-config"],
)
def test_a_typed_value_and_its_fields_together_is_a_type_error(call, match):
    logp, old, _, adv, _, mask = _tokens()
    with pytest.raises(TypeError, match=match):
        call((logp, old, None, adv, mask))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t: grpo_loss(*t, config={"beta": 0.1}), TypeError, "config must be a PolicyConfig"),
        (lambda t: grpo_loss(*t, state=3), TypeError, "state must be a TrainerState"),
        (lambda t: grpo_loss(*t, betta=0.1), TypeError, "unexpected keyword argument 'betta'"),
        (lambda t: ppo_loss(t[0], t[1], t[3], t[4], clip_range=0.1), TypeError, "unexpected keyword argument 'clip_range'"),
        (lambda t: ppo_loss(t[0], t[1], t[3], t[4], config=PolicyConfig()), TypeError, "config must be a PPOConfig"),
        (lambda t: grpo_loss(*t, config=PolicyConfig(loss_type="nope")), ValueError, "valid loss types"),
        (lambda t: grpo_loss(*t, config=PolicyConfig(epsilon_low=-1.0)), ValueError, "epsilon_low must be >= 0"),
        (lambda t: grpo_loss(*t, state=TrainerState(num_processes=0)), ValueError, "num_processes must be an int"),
        (lambda t: ppo_loss(t[0], t[1], t[3], t[4], config=PPOConfig(loss_agg_mode="x")), ValueError, "loss_agg_mode"),
        (lambda t: GRPOLoss(config=PolicyConfig(loss_type="nope")), ValueError, "valid loss types"),
        (lambda t: PPOLoss(config=PPOConfig(loss_agg_mode="x")), ValueError, "loss_agg_mode"),
    ],
    ids=["grpo-config-type", "grpo-state-type", "grpo-unknown", "ppo-unknown", "ppo-config-type", "config-row",
         "config-range", "state-count", "ppo-config-mode", "GRPOLoss-config", "PPOLoss-config"],  # fmt: skip
)
def test_typed_values_are_validated_by_name(call, error, match):
    logp, old, _, adv, _, mask = _tokens()
    with pytest.raises(error, match=match):
        call((logp, old, None, adv, mask))


def test_ppo_loss_takes_ppo_config_whole():
    logp, old, _, adv, ent, mask = _tokens(seed=3)
    g = torch.Generator().manual_seed(4)
    values, old_values, returns = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    config = PPOConfig(cliprange=0.15, cliprange_value=0.3, vf_coef=0.5, clip_ratio_c=3.0,
                       loss_agg_mode="seq-mean-token-mean", entropy_coef=0.02)  # fmt: skip

    def whole(x, v, e):
        return ppo_loss(x, old, adv, mask, v, old_values, returns, entropy=e, config=config, backend="torch")

    def keywords(x, v, e):
        return ppo_loss(x, old, adv, mask, v, old_values, returns, entropy=e, backend="torch", **config._asdict())

    _same(_loss_and_grads(whole, logp, values, ent), _loss_and_grads(keywords, logp, values, ent))
    assert "policy/clipfrac_lower" in whole(logp, values, ent)[1]


def test_the_fused_entries_read_the_typed_configs():
    """The separability decision and the entropy path of the fused losses read ``config=`` like
    its keywords: a sequence-level config takes four GEMMs, an entropy bonus gives the entropy's
    gradient on the three-GEMM path."""
    hidden, weight, ids = _head_inputs()
    _, old, _, adv, _, mask = _tokens()
    assert "sequence" in grpo_non_separable_reason(PolicyConfig(importance_sampling_level="sequence"))
    assert grpo_non_separable_reason({"config": PolicyConfig(loss_type="vespo")}) is not None
    _, metrics = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, old_logp=old, backend="torch",
                                        config=PolicyConfig(loss_type="grpo", importance_sampling_level="sequence"))  # fmt: skip
    assert metrics["head_path"] == "four_gemm"
    results = {}
    for path in ("three_gemm", "four_gemm"):
        results[path] = _loss_and_grads(
            lambda h, w: fused_linear_ppo_loss(h, w, ids, old, adv, mask, config=PPOConfig(entropy_coef=0.5),
                                               backend="torch", head_path=path),
            hidden, weight)  # fmt: skip
    for a, b in zip(results["three_gemm"], results["four_gemm"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ HeadOptions
HEAD = dict(temperature=0.7, logit_scale=1.3, softcap=4.0, chunk_size=3, check_labels=True, backend="torch")


def _fused_calls():
    hidden, weight, ids = _head_inputs()
    _, _, _, adv, _, mask = _tokens()
    g = torch.Generator().manual_seed(6)
    old = linear_logprobs(hidden, weight, ids) + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    labels = ids.masked_fill(~mask, -100)
    dpo_hidden, _, dpo_ids = _head_inputs(seed=5, rows=2 * B)
    dpo_labels = dpo_ids.clone()
    dpo_labels[:, :2] = -100
    zeros = torch.zeros(B, dtype=torch.float64)
    return {
        "cross_entropy": (lambda h, w, **kw: fused_linear_cross_entropy(h, w, labels, **kw), hidden),
        "grpo": (lambda h, w, **kw: fused_linear_grpo_loss(h, w, ids, adv, mask, old_logp=old, ref_logp=ref, beta=0.1,
                                                           **kw), hidden),
        "ppo": (lambda h, w, **kw: fused_linear_ppo_loss(h, w, ids, old, adv, mask, **kw), hidden),
        "dpo": (lambda h, w, **kw: fused_linear_dpo_loss(h, w, dpo_labels, ref_chosen_logps=zeros,
                                                         ref_rejected_logps=zeros, **kw), dpo_hidden),
        "verl": (lambda h, w, **kw: fused_linear_verl_policy_loss(h, w, ids, old, adv, mask, **kw),
                 hidden),
    }  # fmt: skip


@pytest.mark.parametrize("entry", ["cross_entropy", "grpo", "ppo", "dpo", "verl"])
def test_every_fused_entry_takes_head_options_whole_or_as_keywords(entry):
    fn, hidden = _fused_calls()[entry]
    weight = _head_inputs()[1]
    whole = _loss_and_grads(lambda h, w: fn(h, w, head=HeadOptions(**HEAD)), hidden, weight)
    keywords = _loss_and_grads(lambda h, w: fn(h, w, **HEAD), hidden, weight)
    plain = _loss_and_grads(lambda h, w: fn(h, w, backend="torch"), hidden, weight)
    _same(whole, keywords)
    assert not torch.equal(whole[0], plain[0])  # the options reached the head
    with pytest.raises(TypeError, match=r"head= .*temperature="):
        fn(hidden, weight, head=HeadOptions(), temperature=0.5)
    with pytest.raises(TypeError, match="head must be a HeadOptions"):
        fn(hidden, weight, head=dict(HEAD))


def test_head_options_are_checked_at_construction_and_unknown_keywords_named():
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        HeadOptions(chunk_size=0)
    with pytest.raises(ValueError, match="head_precision must be one of"):
        HeadOptions(head_precision="fp8")
    with pytest.raises(TypeError, match="head_precision must be one of"):
        HeadOptions(head_precision=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        HeadOptions().temperature = 2.0
    hidden, weight, ids = _head_inputs()
    with pytest.raises(TypeError, match="fused_linear_cross_entropy.*unexpected keyword argument 'temprature'"):
        fused_linear_cross_entropy(hidden, weight, ids, temprature=0.5)


def test_every_head_option_is_a_linear_logprobs_keyword():
    """The four-GEMM path hands every field to ``linear_logprobs``: a field is one line."""
    parameters = inspect.signature(linear_logprobs).parameters
    assert [f.name for f in dataclasses.fields(HeadOptions) if f.name not in parameters] == []
