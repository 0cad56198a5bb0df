"""Aggregation modes, KL estimators and advantage estimators pinned against the installed verl
(``verl.trainer.ppo.core_algos``) in fp64: values and gradients, fully masked rows, empty
batches, and the micro-batch identity of the global-batch arguments. Skipped without verl."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from alignkernels.losses.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, estimate_advantages
from alignkernels.losses.aggregation import AGGREGATION_MODES, GlobalBatch
from alignkernels.losses.kl import KL_ESTIMATORS, kl_estimate
from alignkernels.losses.ppo import agg_loss

F64 = dict(rtol=1e-10, atol=1e-12)
VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _batch(B=7, T=9, seed=0, empty_rows=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True
    for r in empty_rows:
        if r < B:
            mask[r] = False
    return loss, mask


# ---------------------------------------------------------------- aggregation
def test_every_verl_mode_is_a_row():
    assert set(VERL_MODES) == set(AGGREGATION_MODES)


@pytest.mark.parametrize("mode", VERL_MODES)
def test_agg_loss_matches_verl_values_and_gradients(verl_core, mode):
    loss, mask = _batch()
    ours_in = loss.clone().requires_grad_(True)
    theirs_in = loss.clone().requires_grad_(True)
    ours = agg_loss(ours_in, mask, mode, semantics="verl")
    theirs = verl_core.agg_loss(theirs_in, mask.to(torch.float64), mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)  # verl: token means over count + 1e-8
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("dp_size", [1, 2])
def test_micro_batches_sum_to_the_global_batch_loss(verl_core, mode, dp_size):
    """Rows split over ``dp_size`` ranks x 3 micro-batches: with the global arguments each
    micro-batch loss equals verl's, and (1/dp) x the sum over ranks and micro-batches is the
    loss of the whole batch."""
    loss, mask = _batch(B=12, T=8, seed=1, empty_rows=(3, 4, 10))
    whole = agg_loss(loss, mask, mode, semantics="verl", loss_scale_factor=8)
    tokens = mask.sum().item()
    sequences = int(mask.any(-1).sum())
    gb = GlobalBatch(dp_size=dp_size, batch_num_tokens=tokens, global_batch_size=sequences, loss_scale_factor=8)
    total = torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(12).chunk(3 * dp_size):
        part = loss[rows].clone().requires_grad_(True)
        ours = agg_loss(part, mask[rows], mode, semantics="verl", global_batch=gb)
        theirs = verl_core.agg_loss(part, mask[rows].to(torch.float64), mode, dp_size=dp_size,
                                    batch_num_tokens=tokens, global_batch_size=sequences, loss_scale_factor=8)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)
        # the same global arguments as keywords
        torch.testing.assert_close(agg_loss(part, mask[rows], mode, semantics="verl", dp_size=dp_size,
                                            batch_num_tokens=tokens, global_batch_size=sequences,
                                            loss_scale_factor=8), ours)  # fmt: skip
        total = total + ours.detach()
    torch.testing.assert_close(total / dp_size, whole, **F64)


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("semantics", ["classic", "verl"])
def test_fully_masked_and_empty_batches_give_zero_not_nan(mode, semantics):
    for loss, mask in ((torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.bool)),
                       (torch.randn(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.bool))):  # fmt: skip
        x = loss.masked_fill(~mask, float("nan")).requires_grad_(True)  # NaN padding never leaks
        out = agg_loss(x, mask, mode, semantics=semantics)
        out.backward()
        assert out.item() == 0.0
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_verl_semantics_differ_from_classic_where_verl_changed():
    """verl >= 0.7: fully masked rows leave the sequence means; -sum-norm divides by the sequences."""
    loss, mask = _batch()
    n_rows, n_nonempty, T = 7, int(mask.any(-1).sum()), loss.shape[1]
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        torch.testing.assert_close(agg_loss(loss, mask, mode, semantics="verl") * n_nonempty,
                                   agg_loss(loss, mask, mode) * n_rows, **F64)  # fmt: skip
    torch.testing.assert_close(agg_loss(loss, mask, "seq-mean-token-sum-norm", semantics="verl") * n_nonempty,
                               agg_loss(loss, mask, "seq-mean-token-sum-norm"), **F64)  # fmt: skip
    torch.testing.assert_close(agg_loss(loss, mask, "seq-mean-token-sum-norm"), (loss * mask).sum() / T, **F64)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode must be one of token-mean, token-sum"),
        (dict(semantics="trl"), ValueError, "semantics must be one of classic, verl, openrlhf"),
        (dict(dp_size=2), ValueError, "batch_num_tokens"),
        (dict(dp_size=2, loss_agg_mode="seq-mean-token-mean", batch_num_tokens=5), ValueError, "global_batch_size"),
        (dict(dp_size=0), ValueError, "dp_size"),
        (dict(dp_size=1.5), TypeError, "dp_size"),
        (dict(batch_num_tokens=0), ValueError, "batch_num_tokens"),
        (dict(batch_num_tokens="7"), TypeError, "batch_num_tokens"),
        (dict(global_batch_size=float("nan"), loss_agg_mode="seq-mean-token-sum"), ValueError, "global_batch_size"),
        (dict(loss_scale_factor=-1.0, loss_agg_mode="seq-mean-token-sum-norm"), ValueError, "loss_scale_factor"),
    ],
)
def test_agg_loss_rejects_bad_arguments_by_name(kwargs, error, match):
    loss, mask = _batch()
    with pytest.raises(error, match=match):
        agg_loss(loss, mask, **kwargs)


# ---------------------------------------------------------------- KL estimators
VERL_KL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


def _logps(seed=0, B=5, T=8):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.7
    ref[0, :4] = logp[0, :4] + torch.tensor([25.0, -25.0, 12.0, -12.0], dtype=torch.float64)  # the clamps
    return logp, ref


def test_every_verl_kl_name_resolves_to_a_row():
    from alignkernels.losses.kl import KL_ALIASES

    assert set(VERL_KL_NAMES) <= set(KL_ALIASES)
    assert set(KL_ALIASES.values()) == set(KL_ESTIMATORS)


@pytest.mark.parametrize("name", VERL_KL_NAMES + tuple(n + "+" for n in VERL_KL_NAMES))
def test_kl_estimators_match_verl_values_and_gradients(verl_core, name):
    logp, ref = _logps()
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    outs = []
    for fn in (lambda a, b: kl_estimate(a, b, name, clamp="verl"), lambda a, b: verl_core.kl_penalty(a, b, name)):
        a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        out = fn(a, b)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(outs[0], outs[1], **F64)
    torch.testing.assert_close(grads[0][0], grads[1][0], **F64)
    torch.testing.assert_close(grads[0][1], grads[1][1], **F64)


@pytest.mark.parametrize("name", ["k1", "abs", "k2", "k3", "k3+"])
def test_kl_masked_positions_give_zero_and_no_gradient(name):
    logp, ref = _logps()
    mask = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    a = logp.masked_fill(~mask, float("nan")).requires_grad_(True)
    out = kl_estimate(a, ref, name, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()
    assert (out[~mask] == 0).all() and (a.grad[~mask] == 0).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of abs, k1, k2, k3, kl, low_var_kl, mse"),
        (dict(kl_estimator="k3", gradient="score"), ValueError, "gradient must be one of"),
        (dict(kl_estimator="k3+", gradient="estimator"), ValueError, "gradient='reverse_kl'"),
        (dict(clamp="trl"), ValueError, "clamp must be one of none, verl, openrlhf"),
        (dict(is_clip=0.0, gradient="reverse_kl"), ValueError, "is_clip"),
        (dict(mask=torch.ones(2, 2)), ValueError, "mask must have the shape of logp"),
    ],
)
def test_kl_estimate_rejects_bad_arguments_by_name(kwargs, error, match):
    logp, ref = _logps()
    with pytest.raises(error, match=match):
        kl_estimate(logp, ref, **kwargs)


# ---------------------------------------------------------------- advantage estimators
def _rollout(seed=0, sizes=(3, 1, 4, 2)):
    """Rows of several prompts in a shuffled order, groups of different sizes, a fully masked row."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array([f"p{i}" for i, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(uids), generator=g).numpy()
    uids = uids[perm]
    B, T = len(uids), 7
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[1, 3:5] = False  # a hole (tool output)
    mask[4] = False  # a fully masked row
    rewards = torch.zeros(B, T, dtype=torch.float64)
    last = torch.where(mask, torch.arange(T), -1).amax(-1).clamp(min=0)
    rewards[torch.arange(B), last] = torch.randn(B, generator=g, dtype=torch.float64)
    rewards += 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64) * mask  # token-level shaping
    return rewards, mask, uids


def _verl(verl_core, name, rewards, mask, uids, **kw):
    fn = {
        "grpo": verl_core.compute_grpo_outcome_advantage,
        "rloo": verl_core.compute_rloo_outcome_advantage,
        "opo": verl_core.compute_opo_outcome_advantage,
        "reinforce_plus_plus_baseline": verl_core.compute_reinforce_plus_plus_baseline_outcome_advantage,
        "reinforce_plus_plus": verl_core.compute_reinforce_plus_plus_outcome_advantage,
        "remax": verl_core.compute_remax_outcome_advantage,
    }[name]
    m = mask.to(torch.float64)
    if name == "reinforce_plus_plus":
        return fn(rewards.clone(), m, config=types.SimpleNamespace(gamma=kw.get("gamma", 1.0)))
    if name == "remax":
        return fn(rewards.clone(), kw["reward_baselines"], m)
    extra = {k: v for k, v in kw.items() if k in ("epsilon", "norm_adv_by_std_in_grpo")}
    return fn(rewards.clone(), m, uids, **extra)


CASES = [
    ("grpo", {}),
    ("grpo", dict(epsilon=1e-3)),
    ("grpo", dict(norm_adv_by_std_in_grpo=False)),
    ("rloo", {}),
    ("opo", {}),
    ("reinforce_plus_plus_baseline", {}),
    ("reinforce_plus_plus", {}),
    ("reinforce_plus_plus", dict(gamma=0.9)),
    ("remax", {}),
]


CASE_IDS = [f"{n}-{'-'.join(map(str, k.values())) or 'default'}" for n, k in CASES]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, kw", CASES, ids=CASE_IDS)
def test_advantages_match_verl(verl_core, name, kw, seed):
    rewards, mask, uids = _rollout(seed)
    if name == "remax":
        kw = dict(reward_baselines=torch.randn(len(uids), generator=torch.Generator().manual_seed(9),
                                               dtype=torch.float64))  # fmt: skip
    adv, ret = estimate_advantages(rewards, mask, list(uids), estimator=name, **kw)
    verl_adv, verl_ret = _verl(verl_core, name, rewards, mask, uids, **kw)
    torch.testing.assert_close(adv, verl_adv, rtol=1e-7, atol=1e-10)  # verl's masked means: count + 1e-8
    torch.testing.assert_close(ret, verl_ret, rtol=1e-7, atol=1e-10)


def test_grouping_by_uid_ignores_row_order_and_id_type():
    rewards, mask, uids = _rollout(2)
    perm = torch.randperm(len(uids), generator=torch.Generator().manual_seed(5))
    as_ints = torch.tensor([int(u[1:]) for u in uids])
    for name in ("grpo", "rloo", "opo", "reinforce_plus_plus_baseline"):
        adv, _ = estimate_advantages(rewards, mask, uids, estimator=name)
        adv_perm, _ = estimate_advantages(rewards[perm], mask[perm], as_ints[perm], estimator=name)
        torch.testing.assert_close(adv_perm, adv[perm], **F64)


def _extras(B, T, seed=0, dtype=torch.float64):
    """The optional inputs of every row: ReMax baselines, GDPO components, OTB token statistics."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    return dict(
        reward_baselines=torch.randn(B, generator=g, dtype=dtype),
        reward_components=torch.randint(-8, 9, (B, 2), generator=g).to(dtype) / 8,  # exact in fp32 (verl casts)
        old_log_probs=old,
        sum_pi_squared=old.exp().square() + torch.rand(B, T, generator=g, dtype=dtype) * 0.3,
        rollout_is_weights=0.5 + torch.rand(B, T, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("name", list(ADVANTAGE_ESTIMATORS))
def test_advantages_of_an_empty_batch_are_empty(name):
    rewards, mask = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.bool)
    adv, ret = estimate_advantages(rewards, mask, [], estimator=name, **_extras(0, 5))
    assert adv.shape == ret.shape == (0, 5)


@pytest.mark.parametrize("name", list(ADVANTAGE_ESTIMATORS))
def test_advantages_fp32_match_fp64(name):
    rewards, mask, uids = _rollout(3, sizes=(3, 2, 4, 2))
    extras = _extras(*rewards.shape)
    a64, r64 = estimate_advantages(rewards, mask, uids, estimator=name, **extras)
    a32, r32 = estimate_advantages(rewards.float(), mask, uids, estimator=name,
                                   **{k: v.float() for k, v in extras.items()})  # fmt: skip
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), a64, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(r32.double(), r64, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_vectorized_grpo_and_rloo_match_verl(verl_core, norm):
    """verl's vectorised forms: GRPO with fp32 group statistics; RLOO giving 0 to a group of one."""
    rewards, mask, uids = _rollout(6)
    adv, _ = estimate_advantages(rewards, mask, uids, estimator="grpo_vectorized", norm_adv_by_std_in_grpo=norm)
    theirs, _ = verl_core.compute_grpo_vectorized_outcome_advantage(rewards.clone(), mask.double(), uids,
                                                                    norm_adv_by_std_in_grpo=norm)  # fmt: skip
    torch.testing.assert_close(adv, theirs, rtol=1e-6, atol=1e-6)
    adv, _ = estimate_advantages(rewards, mask, uids, estimator="rloo_vectorized")
    theirs, _ = verl_core.compute_rloo_vectorized_outcome_advantage(rewards.clone(), mask.double(), uids)
    torch.testing.assert_close(adv, theirs, **F64)
    single = [i for i, u in enumerate(uids) if u == "p1"]  # the group of one
    assert (adv[single] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kw", [{}, dict(f_norm=2.0)])
def test_gpg_matches_verl(verl_core, seed, kw):
    rewards, mask, uids = _rollout(seed)
    rewards[3] = 0.0  # a zero score: alpha = B / #nonzero
    adv, ret = estimate_advantages(rewards, mask, uids, estimator="gpg", **kw)
    theirs, theirs_ret = verl_core.compute_gpg_outcome_advantage(rewards.clone(), mask.double(), uids, **kw)
    # verl's alpha = B / int-tensor is an fp32 scalar (6e-8 relative); ours stays fp64
    torch.testing.assert_close(adv, theirs, rtol=2e-7, atol=1e-12)
    torch.testing.assert_close(ret, theirs_ret, rtol=2e-7, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_matches_verl(verl_core, seed, norm):
    rewards, mask, uids = _rollout(seed, sizes=(3, 2, 4, 2))
    config = {"norm_adv_by_std_in_grpo": norm}
    adv, ret = estimate_advantages(rewards, mask, uids, estimator="grpo_passk", norm_adv_by_std_in_grpo=norm)
    theirs, _ = verl_core.compute_grpo_passk_outcome_advantage(rewards.clone(), mask.double(), uids, config=config)
    torch.testing.assert_close(adv, theirs, **F64)
    # a tie for the best response: r_max - r_second_max = 0 whichever row verl's topk picks
    tied = rewards.clone()
    rows = [i for i, u in enumerate(uids) if u == "p2"]  # the group of 4
    tied[rows[1]] = tied[rows[0]] + 1.0
    tied[rows[2]] = tied[rows[0]] + 1.0
    adv, _ = estimate_advantages(tied, mask, uids, estimator="grpo_passk", norm_adv_by_std_in_grpo=norm)
    theirs, _ = verl_core.compute_grpo_passk_outcome_advantage(tied.clone(), mask.double(), uids, config=config)
    torch.testing.assert_close(adv, theirs, **F64)
    with pytest.raises(ValueError, match="at least 2 responses per prompt"):
        estimate_advantages(rewards, mask, [f"u{i}" for i in range(len(uids))], estimator="grpo_passk")


@pytest.mark.parametrize("components", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_gdpo_matches_verl(verl_core, components, norm):
    rewards, _, uids = _rollout(4)
    B, T = rewards.shape
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(T) < lengths[:, None]  # right padding: verl places each component at the last token
    extras = _extras(B, T)
    kw, their_kw = {}, {}
    if components:
        weights = (1.0, 0.5)
        kw = dict(reward_components=extras["reward_components"], reward_weights=weights)
        P = 3
        their_kw = dict(
            config={"gdpo_reward_keys": ["fmt", "acc"], "gdpo_reward_weights": list(weights)},
            non_tensor_batch={"fmt": extras["reward_components"][:, 0].numpy(),
                              "acc": extras["reward_components"][:, 1].numpy()},
            batch={"prompts": torch.zeros(B, P, dtype=torch.long),
                   "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)},
        )  # fmt: skip
    adv, _ = estimate_advantages(rewards, mask, uids, estimator="gdpo", norm_adv_by_std_in_grpo=norm, **kw)
    theirs, _ = verl_core.compute_gdpo_outcome_advantage(rewards.clone(), mask.double(), uids,
                                                         norm_adv_by_std_in_grpo=norm, **their_kw)  # fmt: skip
    torch.testing.assert_close(adv, theirs, rtol=1e-6, atol=1e-7)  # verl: component scores in fp32


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("is_weights", [False, True])
@pytest.mark.parametrize("handle_zero_tail", [True, False])
def test_optimal_token_baseline_matches_verl(verl_core, seed, is_weights, handle_zero_tail):
    rewards, mask, uids = _rollout(seed, sizes=(3, 1, 4, 2))
    extras = _extras(*rewards.shape, seed=seed)
    if not is_weights:
        extras["rollout_is_weights"] = None
    adv, ret = estimate_advantages(rewards, mask, uids, estimator="optimal_token_baseline",
                                   handle_zero_tail=handle_zero_tail, **extras)  # fmt: skip
    theirs, theirs_ret = verl_core.compute_optimal_token_baseline_advantage(
        rewards.clone(), mask.double(), uids, extras["old_log_probs"], extras["sum_pi_squared"],
        rollout_is_weights=extras["rollout_is_weights"], handle_zero_tail=handle_zero_tail)  # fmt: skip
    torch.testing.assert_close(adv, theirs, **F64)
    torch.testing.assert_close(ret, theirs_ret, **F64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("is_weights", [False, True])
@pytest.mark.parametrize("handle_zero_tail", [True, False])
def test_multi_turn_optimal_token_baseline_matches_verl(verl_core, seed, is_weights, handle_zero_tail):
    """Holes (tool outputs) inside responses, a fully masked row, a group of one."""
    rewards, mask, uids = _rollout(seed, sizes=(3, 1, 4, 2))
    mask[7, 1:3] = False  # more holes
    mask[2, 4:] = False
    extras = _extras(*rewards.shape, seed=seed)
    if not is_weights:
        extras["rollout_is_weights"] = None
    adv, ret = estimate_advantages(rewards, mask, uids, estimator="tir_optimal_token_baseline",
                                   handle_zero_tail=handle_zero_tail, **extras)  # fmt: skip
    theirs, theirs_ret = verl_core.compute_multi_turn_optimal_token_baseline_advantage(
        rewards.clone(), mask.double(), uids, extras["old_log_probs"], extras["sum_pi_squared"],
        rollout_is_weights=extras["rollout_is_weights"], handle_zero_tail=handle_zero_tail)  # fmt: skip
    torch.testing.assert_close(adv, theirs, **F64)
    torch.testing.assert_close(ret, theirs_ret, **F64)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((), dict(estimator="ppo"), ValueError, "estimator must be one of grpo, rloo, grpo_vectorized, rloo_vecto"),
        ((), dict(estimator="grpo"), ValueError, "index"),
        ((["a", "b"],), dict(estimator="grpo"), ValueError, "index must hold one prompt id per row"),
        ((), dict(estimator="remax"), ValueError, "reward_baselines"),
        ((), dict(estimator="remax", reward_baselines=torch.zeros(3, dtype=torch.float64)), ValueError,
         "reward_baselines must have shape"),
        ((["a"] * 10,), dict(estimator="optimal_token_baseline"), ValueError, "old_log_probs"),
        ((["a"] * 10,), dict(estimator="gdpo", reward_weights=(1.0, 2.0)), ValueError, "reward_weights"),
        ((["a"] * 10,), dict(estimator="gpg", f_norm=0.0), ValueError, "f_norm"),
        ((), dict(estimator="reinforce_plus_plus", gamma=1.5), ValueError, "gamma"),
        ((), dict(estimator="rloo", eps=0.1), TypeError, "eps"),
        ((), dict(estimator="grpo", config=AdvantageConfig(), epsilon=0.1), TypeError, "config"),
    ],
)
def test_estimate_advantages_rejects_bad_arguments_by_name(args, kwargs, error, match):
    rewards, mask, _ = _rollout()
    with pytest.raises(error, match=match):
        estimate_advantages(rewards, mask, *args, **kwargs)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_verl_through_holes(verl_core, gamma, lam):
    """verl's GAE skips masked steps (observation tokens): ``gae(holes="bridge")``, whitened."""
    from alignkernels.losses.ppo import gae

    rewards, mask, _ = _rollout(5)
    values = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    theirs, theirs_ret = verl_core.compute_gae_advantage_return(rewards, values, mask.double(), gamma, lam)
    # verl leaves values at masked positions; ours are 0 there
    torch.testing.assert_close(adv, theirs * mask, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(ret * mask, theirs_ret * mask, **F64)


@pytest.mark.parametrize("semantics", ["classic", "verl"])
@pytest.mark.parametrize("mode", VERL_MODES)
def test_agg_loss_fp32_matches_fp64(mode, semantics):
    loss, mask = _batch(B=16, T=40, seed=7)
    a64, a32 = loss.clone().requires_grad_(True), loss.float().requires_grad_(True)
    out64 = agg_loss(a64, mask, mode, semantics=semantics)
    out32 = agg_loss(a32, mask, mode, semantics=semantics)
    out64.backward()
    out32.backward()
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a32.grad.double(), a64.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["k1", "abs", "k2", "k3", "k3+"])
def test_kl_estimate_fp32_matches_fp64(name):
    logp, ref = _logps(B=8, T=30)
    ref = logp + (ref - logp).clamp(-8, 8)  # fp32 exp range
    outs, grads = [], []
    for dtype in (torch.float64, torch.float32):
        a = logp.detach().to(dtype).clone().requires_grad_(True)
        out = kl_estimate(a, ref.to(dtype), name)
        out.sum().backward()
        outs.append(out.double())
        grads.append(a.grad.double())
    # fp32 inputs are rounded copies of the fp64 ones: compare to the fp64 result within fp32 rounding of d
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)
