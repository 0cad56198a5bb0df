"""Advantages: TRL's group-relative advantages (GRPO) and the RL frameworks' estimators as rows.

``group_advantages`` follows the advantage block of TRL 1.16
``GRPOTrainer._generate_and_score_completions`` (one process): a weighted NaN-sum over the reward
functions (NaN = "this function did not score this completion"), minus the group mean, divided
by ``std + 1e-4`` (group, batch or no scaling), or GDPO's per-function normalisation
(``normalize_then_sum``). ``nanstd`` / ``nanmin`` / ``nanmax`` have the semantics of
``trl.trainer.utils``' functions of the same names, without host syncs.

``ADVANTAGE_ESTIMATORS``: one ``AdvantageEstimator`` row per estimator of verl's ``core_algos``
(GRPO, RLOO, REINFORCE++ and its baseline form, ReMax, OPO, GPG, GRPO pass@k, GDPO, the optimal
token baseline and its multi-turn form), read by the one dispatcher ``estimate_advantages``. Rows
are grouped by prompt id (verl's ``uid``: any order, any group sizes) without a Python loop over rows: the ids are
mapped once to ``0..G-1`` and every group statistic is an ``index_add_`` / ``scatter_reduce``
over ``[B]`` (``group_stats``); token-level rows (REINFORCE++) reuse ``ppo.gae``'s reverse scan.

Memory: ``O(B·T)`` for the outputs, ``O(G·T)`` for the optimal token baseline's group sums.
Numerics: fp32 (fp64 for fp64 rewards); group std is Bessel-corrected. Not differentiable (rewards
carry no gradient). The tests check ``group_advantages`` against TRL's own helpers and an
independent loop-over-groups reference (``alignkernels.reference``), and every row against verl's
function of the same name in fp64 (``tests/frameworks/test_verl_parity.py``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._utils import check_same_device, check_tensor, output_dtype
from .aggregation import lookup as lookup_row
from .ppo import gae, masked_whiten
from .validation import check_count, check_number, no_other_keywords, typed_value

SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
STD_EPS = 1e-4  # TRL's divisor is std + 1e-4


# --------------------------------------------------------------------------------------------
# NaN-aware statistics (trl.trainer.utils.nanstd / nanmin / nanmax)
# --------------------------------------------------------------------------------------------
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation over the non-NaN values: ``sqrt(Σ (x - mean)² / (n - 1))``, NaN
    where fewer than two values are present (``trl.trainer.utils.nanstd``)."""
    present = ~torch.isnan(x)
    n = present.sum(dim=dim, keepdim=True).to(x.dtype)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    squares = torch.where(present, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=dim, keepdim=True)
    std = torch.where(n > 1, squares / (n - 1).clamp(min=1), torch.full_like(squares, float("nan"))).sqrt()
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.reshape(())


def nanmin(x: torch.Tensor) -> torch.Tensor:
    """min ignoring NaNs, NaN if all are NaN (trl.trainer.utils.nanmin), without a host sync."""
    keep = ~torch.isnan(x)
    smallest = torch.where(keep, x, torch.full_like(x, float("inf"))).min()
    return torch.where(keep.any(), smallest, torch.full_like(smallest, float("nan")))


def nanmax(x: torch.Tensor) -> torch.Tensor:
    """max ignoring NaNs, NaN if all are NaN (trl.trainer.utils.nanmax), without a host sync."""
    keep = ~torch.isnan(x)
    largest = torch.where(keep, x, torch.full_like(x, float("-inf"))).max()
    return torch.where(keep.any(), largest, torch.full_like(largest, float("nan")))


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------
def _batch_std(x: torch.Tensor) -> torch.Tensor:
    """TRL's batch std: nanstd over everything, 0 for a batch of one."""
    return nanstd(x).expand_as(x) if x.numel() > 1 else torch.zeros_like(x)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale="group",
    reward_weights=None,
    multi_objective_aggregation: str = "sum_then_normalize",
    return_stats: bool = False,
):
    """Group-relative advantages exactly as ``GRPOTrainer._generate_and_score_completions``
    (TRL 1.16) computes them.

    Args:
        rewards: ``[B]`` (one reward function) or ``[B, K]`` (K reward functions), rows ordered
            so that each consecutive run of ``group_size`` rows are completions of one prompt.
            NaN marks a reward function that did not score a completion; a row that is NaN for
            every function is "unscorable" and gets advantage 0.
        group_size: completions per prompt (TRL ``num_generations``), a positive int that
            divides ``B``.
        scale: ``"group"`` (or True): divide by the group std; ``"batch"``: by the std of the
            whole batch; ``"none"`` (or False): no scaling (Dr. GRPO). Std is Bessel-corrected,
            NaN-aware, and the divisor is ``std + 1e-4``.
        reward_weights: ``[K]`` weights of the reward functions (default all 1).
        multi_objective_aggregation: ``"sum_then_normalize"`` (weighted NaN-sum, then the group
            normalisation above) or ``"normalize_then_sum"`` (GDPO: normalise each function within
            its group, weighted sum, then normalise over the batch; ``scale`` is not used).
        return_stats: also return the statistics TRL logs: ``reward``, ``reward_std``,
            ``frac_reward_zero_std`` and ``rewards/<k>/mean``, ``rewards/<k>/std`` per reward
            function ``k`` (TRL uses the function's name in place of ``k``).

    Returns:
        ``advantages`` ``[B]`` fp32 (fp64 for fp64 rewards), or ``(advantages, stats)``.
    """
    check_tensor("rewards", rewards, floating=True, ndim_min=1)
    if rewards.dim() > 2:
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    group_size = check_count("group_size", group_size)
    B = rewards.shape[0]
    if B == 0:
        raise ValueError("rewards must hold at least one completion (B >= 1), got an empty batch")
    if B % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the batch size B={B}")
    if scale is True:
        scale = "group"
    elif scale is False:
        scale = "none"
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS} (or True/False), got {scale!r}")
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
            f"got {multi_objective_aggregation!r}"
        )
    cd = output_dtype(rewards.dtype)
    rewards_per_func = rewards.to(cd).reshape(B, -1)
    K = rewards_per_func.shape[1]
    if reward_weights is None:
        weights = torch.ones(K, dtype=cd, device=rewards.device)
    else:
        try:
            weights = torch.as_tensor(reward_weights, dtype=cd, device=rewards.device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"reward_weights must be K numbers, got {reward_weights!r}") from None
        if weights.numel() != K:
            raise ValueError(f"reward_weights has {weights.numel()} entries but rewards has K={K} columns")

    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    n_groups = B // group_size
    if multi_objective_aggregation == "sum_then_normalize":
        summed = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        grouped = summed.view(n_groups, group_size)
        centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(B)
        if scale == "batch":
            std = _batch_std(summed)
        elif group_size > 1:
            std = nanstd(grouped, dim=1, keepdim=True).expand(n_groups, group_size).reshape(B)
        else:
            std = torch.zeros_like(summed)
        advantages = centred if scale == "none" else centred / (std + STD_EPS)
    else:
        grouped = rewards_per_func.view(n_groups, group_size, K)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_k)
        normalised = ((grouped - mean_k) / (std_k + STD_EPS)).view(B, K)
        summed = (normalised * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        std = _batch_std(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    if not return_stats:
        return advantages
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    logged = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
    stats = {}
    for k in range(K):  # TRL names them by reward function: rewards/<func_name>/mean|std
        stats[f"rewards/{k}/mean"] = torch.nanmean(rewards_per_func[:, k])
        stats[f"rewards/{k}/std"] = nanstd(rewards_per_func[:, k])
    stats["reward"] = torch.nanmean(logged)
    stats["reward_std"] = nanstd(logged)
    stats["frac_reward_zero_std"] = is_std_zero.to(cd).mean()
    return advantages, stats


# --------------------------------------------------------------------------------------------
# Outcome / token advantage estimators as rows (verl core_algos' estimators)
# --------------------------------------------------------------------------------------------
class AdvantageConfig(NamedTuple):
    """Hyper-parameters of the estimators (verl's names and defaults)."""

    epsilon: float | None = None  # None: the row's default (verl: 1e-6, OTB 1e-8)
    norm_adv_by_std_in_grpo: bool = True  # GRPO, pass@k, GDPO: False = Dr. GRPO (no std scaling)
    gamma: float = 1.0  # REINFORCE++: discount of the token returns
    f_norm: float = 1.0  # GPG: the advantage's divisor
    reward_weights: tuple[float, ...] | None = None  # GDPO: weight of each reward component
    handle_zero_tail: bool = True  # OTB: no baseline past the second-longest response of a group


class GroupIndex(NamedTuple):
    """Rows grouped by prompt id: ``inverse[b]`` is row ``b``'s group in ``0..n_groups-1``."""

    inverse: torch.Tensor
    n_groups: int


class AdvantageInputs(NamedTuple):
    rewards: torch.Tensor  # [B, T] token-level rewards (an outcome reward sits on one token)
    mask: torch.Tensor  # [B, T] response tokens, as rewards' dtype (0/1)
    groups: GroupIndex | None
    config: AdvantageConfig  # epsilon resolved
    reward_baselines: torch.Tensor | None = None  # [B] ReMax: the greedy rollout's reward
    reward_components: torch.Tensor | None = None  # [B, K] GDPO: one score per reward function
    old_log_probs: torch.Tensor | None = None  # [B, T] OTB: the rollout policy's log-probs
    sum_pi_squared: torch.Tensor | None = None  # [B, T] OTB: Σ_v π(v)² at each token
    rollout_is_weights: torch.Tensor | None = None  # [B, T] OTB: truncated IS weights (optional)


# the optional inputs a row may need, and their shapes ("B", "BT", "BK")
EXTRA_INPUTS = {"reward_baselines": "B", "reward_components": "BK", "old_log_probs": "BT", "sum_pi_squared": "BT",
                "rollout_is_weights": "BT"}  # fmt: skip


class AdvantageEstimator(NamedTuple):
    name: str
    compute: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]  # -> (advantages, returns)
    needs_groups: bool  # needs the prompt id of each row (index=)
    needs: tuple[str, ...]  # required EXTRA_INPUTS
    token_level: bool  # uses each token's reward (False: only the row sum, the outcome score)
    epsilon: float  # default of AdvantageConfig.epsilon
    summary: str


def group_index(index, batch: int, device) -> GroupIndex:
    """Group ids from ``index``: a 1-D tensor, a numpy array or a sequence of hashables (verl's
    ``uid`` strings), one per row, in any order; groups may differ in size."""
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.shape[0] != batch:
            raise ValueError(f"index must hold one prompt id per row ({batch}), got shape {tuple(index.shape)}")
        _, inverse = torch.unique(index, return_inverse=True)
        inverse = inverse.to(device)
    else:
        try:
            keys = [k.item() if hasattr(k, "item") else k for k in index]
        except TypeError:
            raise TypeError(f"index must be a tensor, an array or a sequence of prompt ids, got "
                            f"{type(index).__name__}") from None  # fmt: skip
        if len(keys) != batch:
            raise ValueError(f"index must hold one prompt id per row ({batch}), got {len(keys)}")
        ids: dict = {}
        try:
            inverse = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long, device=device)
        except TypeError:
            raise TypeError("index must hold hashable prompt ids (str, int, ...)") from None
    n_groups = int(inverse.max().item()) + 1 if batch else 0
    return GroupIndex(inverse.reshape(batch), n_groups)


def group_stats(scores: torch.Tensor, groups: GroupIndex):
    """Per-row ``(count, mean, std)`` of the row's group: counts as floats, Bessel-corrected std
    (0 for a group of one)."""
    inv, G = groups.inverse, groups.n_groups
    count = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, inv, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, inv, scores)
    mean = total / count.clamp(min=1.0)
    squares = torch.zeros_like(count).index_add_(0, inv, (scores - mean[inv]).square())
    std = (squares / (count - 1).clamp(min=1.0)).sqrt()
    return count[inv], mean[inv], std[inv]


def _outcome(x: AdvantageInputs, advantage: torch.Tensor):
    out = advantage.unsqueeze(-1) * x.mask
    return out, out


def _grpo(x: AdvantageInputs):
    # verl compute_grpo_outcome_advantage: a group of one has mean 0 and std 1
    scores = x.rewards.sum(-1)
    count, mean, std = group_stats(scores, x.groups)
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    centred = scores - mean
    if not x.config.norm_adv_by_std_in_grpo:
        return _outcome(x, centred)
    std = torch.where(single, torch.ones_like(std), std)
    return _outcome(x, centred / (std + x.config.epsilon))


def _rloo(x: AdvantageInputs):
    # leave-one-out baseline: (s - mean) * n / (n - 1); a group of one keeps its score
    scores = x.rewards.sum(-1)
    count, mean, _ = group_stats(scores, x.groups)
    loo = (scores - mean) * count / (count - 1).clamp(min=1.0)
    return _outcome(x, torch.where(count > 1, loo, scores))


def _rloo_vectorized(x: AdvantageInputs):
    # verl's vectorised RLOO: the same leave-one-out baseline, but a group of one gets 0
    scores = x.rewards.sum(-1)
    count, mean, _ = group_stats(scores, x.groups)
    loo = (scores - mean) * count / (count - 1).clamp(min=1.0)
    return _outcome(x, torch.where(count > 1, loo, torch.zeros_like(loo)))


def _reinforce_pp_baseline(x: AdvantageInputs):
    # group-mean baseline, then whitening over all response tokens of the batch
    scores = x.rewards.sum(-1)
    count, mean, _ = group_stats(scores, x.groups)
    centred = (scores - torch.where(count > 1, mean, torch.zeros_like(mean))).unsqueeze(-1) * x.mask
    out = masked_whiten(centred, x.mask) * x.mask
    return out, out


def _reinforce_pp(x: AdvantageInputs):
    # discounted token returns that carry across masked holes (GAE with V = 0, lambda = 1), whitened
    returns, _ = gae(x.rewards, torch.zeros_like(x.rewards), x.mask, gamma=x.config.gamma, lam=1.0)
    returns = returns.to(x.rewards.dtype)
    return masked_whiten(returns, x.mask) * x.mask, returns


def _remax(x: AdvantageInputs):
    # reward-to-go minus the greedy rollout's reward
    returns = (x.rewards * x.mask).flip(-1).cumsum(-1).flip(-1)
    return returns - x.reward_baselines.unsqueeze(-1) * x.mask, returns


def _opo(x: AdvantageInputs):
    # baseline: the length-weighted mean score of the group (0 for a group of one)
    scores = x.rewards.sum(-1)
    length = x.mask.sum(-1)
    inv, G = x.groups.inverse, x.groups.n_groups
    weighted = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, inv, length * scores)
    lengths = torch.zeros_like(weighted).index_add_(0, inv, length)
    count, _, _ = group_stats(scores, x.groups)
    baseline = (weighted / torch.where(lengths > 0, lengths, torch.ones_like(lengths)))[inv]
    return _outcome(x, scores - torch.where(count > 1, baseline, torch.zeros_like(baseline)))


def _gpg(x: AdvantageInputs):
    # alpha (s - group mean) / f_norm, alpha = B / (rows with a nonzero score)
    scores = x.rewards.sum(-1)
    count, mean, _ = group_stats(scores, x.groups)
    alpha = scores.numel() / (scores != 0).sum().clamp(min=1).to(scores.dtype)
    centred = scores - torch.where(count > 1, mean, torch.zeros_like(mean))
    return _outcome(x, alpha * centred / x.config.f_norm)


def _group_max(values: torch.Tensor, groups: GroupIndex) -> torch.Tensor:
    """Per-row maximum of the row's group."""
    out = torch.full((groups.n_groups,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, groups.inverse, values, reduce="amax")[groups.inverse]


def _grpo_passk(x: AdvantageInputs):
    # only the group's best response gets an advantage: (r_max - r_second_max) [/ (std + eps)]
    scores = x.rewards.sum(-1)
    count, _, std = group_stats(scores, x.groups)
    if bool((count < 2).any()):
        raise ValueError("estimator 'grpo_passk' needs at least 2 responses per prompt (index) in every group")
    best = _group_max(scores, x.groups)
    is_best = scores == best
    ties = torch.zeros_like(scores).index_add_(0, x.groups.inverse, is_best.to(scores.dtype))[x.groups.inverse]
    second = _group_max(torch.where(is_best, torch.full_like(scores, float("-inf")), scores), x.groups)
    gap = torch.where(ties > 1, torch.zeros_like(scores), best - second)  # tied best: r_max - r_second = 0
    if x.config.norm_adv_by_std_in_grpo:
        gap = gap / (std + x.config.epsilon)
    return _outcome(x, torch.where(is_best, gap, torch.zeros_like(gap)))


def _gdpo(x: AdvantageInputs):
    # GRPO on each reward component, weighted sum, whitened over the batch's tokens
    components = x.reward_components if x.reward_components is not None else x.rewards.sum(-1, keepdim=True)
    K = components.shape[1]
    weights = x.config.reward_weights if x.config.reward_weights is not None else (1.0,) * K
    if len(weights) != K:
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {K} reward components")
    total = torch.zeros_like(x.rewards)
    for k in range(K):
        component = torch.zeros_like(x.rewards)
        component[:, 0] = components[:, k]
        adv, _ = _grpo(x._replace(rewards=component))
        total = total + float(weights[k]) * adv
    out = masked_whiten(total, x.mask) * x.mask
    return out, out


def _token_baselines(returns, cumulative, m, groups: GroupIndex, epsilon: float, handle_zero_tail: bool):
    """Per-token group baseline ``B_t = Σ_group G_t W_t m_t / (Σ_group W_t m_t + epsilon)`` (0 in a
    group of one); with ``handle_zero_tail`` the unique longest row of a group gets no baseline past
    the second-longest row's length."""
    inv, G = groups.inverse, groups.n_groups
    T = returns.shape[1]
    numerator = returns.new_zeros(G, T).index_add_(0, inv, returns * cumulative * m)
    denominator = torch.zeros_like(numerator).index_add_(0, inv, cumulative * m) + epsilon
    count, _, _ = group_stats(returns.new_zeros(returns.shape[0]), groups)  # rows per group
    baselines = torch.where((count > 1).unsqueeze(-1), (numerator / denominator)[inv], torch.zeros_like(returns))
    if handle_zero_tail:
        length = m.sum(-1)
        longest = _group_max(length, groups)
        is_longest = length == longest
        n_longest = torch.zeros_like(length).index_add_(0, inv, is_longest.to(length.dtype))[inv]
        second = _group_max(torch.where(is_longest, torch.full_like(length, float("-inf")), length), groups)
        tail = (is_longest & (n_longest == 1) & (count > 1)).unsqueeze(-1) & (
            torch.arange(T, device=m.device) >= second.unsqueeze(-1))
        baselines = baselines.masked_fill(tail, 0.0)
    return baselines


def _returns_and_path_variance(x: AdvantageInputs):
    """Reward-to-go ``G_t`` and the cumulative path-variance proxy ``W_t = Σ_{j<=t} (1 - 2π_j + Σπ²)
    [ρ_j²]`` over the response tokens."""
    m = x.mask
    returns = (x.rewards * m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(x.old_log_probs) + x.sum_pi_squared
    if x.rollout_is_weights is not None:
        w = w * x.rollout_is_weights.square()
    return returns, (w * m).cumsum(-1)


def _optimal_token_baseline(x: AdvantageInputs):
    # per-token baseline over the positions of the [B, T] frame
    returns, cumulative = _returns_and_path_variance(x)
    baselines = _token_baselines(returns, cumulative, x.mask, x.groups, x.config.epsilon, x.config.handle_zero_tail)
    return (returns - baselines) * x.mask, returns


def _multi_turn_optimal_token_baseline(x: AdvantageInputs):
    # the same baseline over the k-th *response* token of each row (holes such as tool outputs
    # removed, rows left-aligned); fully masked rows leave their groups
    returns, cumulative = _returns_and_path_variance(x)
    valid = x.mask != 0
    B, T = valid.shape
    length = valid.sum(-1)
    L = int(length.max().item()) if B else 0
    rank = torch.where(valid, valid.cumsum(-1) - 1, torch.full_like(length, L).unsqueeze(-1).expand(B, T))

    def compact(t):  # [B, T] -> [B, L]: the k-th response token of each row at column k
        return t.new_zeros(B, L + 1).scatter_(1, rank, torch.where(valid, t, torch.zeros_like(t)))[:, :L]

    m = (torch.arange(L, device=valid.device) < length.unsqueeze(-1)).to(returns.dtype)
    inv = torch.where(length > 0, x.groups.inverse, x.groups.n_groups + torch.arange(B, device=valid.device))
    groups = GroupIndex(inv, x.groups.n_groups + B)
    returns_c = compact(returns)
    baselines = _token_baselines(returns_c, compact(cumulative), m, groups, x.config.epsilon,
                                 x.config.handle_zero_tail)  # fmt: skip
    advantages_c = torch.cat([returns_c - baselines, returns_c.new_zeros(B, 1)], dim=1)
    return torch.gather(advantages_c, 1, rank) * x.mask, returns


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    row.name: row
    for row in (
        AdvantageEstimator("grpo", _grpo, True, (), False, 1e-6, "(s - group mean) / (group std + epsilon)"),
        AdvantageEstimator("rloo", _rloo, True, (), False, 1e-6, "s minus the mean of the group's other scores"),
        AdvantageEstimator("grpo_vectorized", _grpo, True, (), False, 1e-6,
                           "grpo (verl's vectorised form: fp32 group statistics there)"),  # fmt: skip
        AdvantageEstimator("rloo_vectorized", _rloo_vectorized, True, (), False, 1e-6,
                           "rloo, but a group of one gets 0"),  # fmt: skip
        AdvantageEstimator("reinforce_plus_plus", _reinforce_pp, False, (), True, 1e-6,
                           "discounted token returns, whitened over the batch"),  # fmt: skip
        AdvantageEstimator("reinforce_plus_plus_baseline", _reinforce_pp_baseline, True, (), False, 1e-6,
                           "s - group mean, whitened over the batch's tokens"),  # fmt: skip
        AdvantageEstimator("remax", _remax, False, ("reward_baselines",), True, 1e-6,
                           "reward-to-go minus the greedy rollout's reward"),  # fmt: skip
        AdvantageEstimator("opo", _opo, True, (), False, 1e-6, "s minus the group's length-weighted mean score"),
        AdvantageEstimator("gpg", _gpg, True, (), False, 1e-6, "B / #nonzero x (s - group mean) / f_norm"),
        AdvantageEstimator("grpo_passk", _grpo_passk, True, (), False, 1e-6,
                           "best of the group: (r_max - r_second) / (std + epsilon); others 0"),  # fmt: skip
        AdvantageEstimator("gdpo", _gdpo, True, (), False, 1e-6,
                           "GRPO per reward component, weighted sum, whitened"),  # fmt: skip
        AdvantageEstimator("optimal_token_baseline", _optimal_token_baseline, True,
                           ("old_log_probs", "sum_pi_squared"), True, 1e-8,
                           "reward-to-go minus a per-token, path-variance-weighted group baseline"),  # fmt: skip
        AdvantageEstimator("tir_optimal_token_baseline", _multi_turn_optimal_token_baseline, True,
                           ("old_log_probs", "sum_pi_squared"), True, 1e-8,
                           "optimal token baseline over the k-th response token (multi-turn)"),  # fmt: skip
    )
}


def estimate_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index=None,
    *,
    estimator: str = "grpo",
    config: AdvantageConfig | None = None,
    reward_baselines: torch.Tensor | None = None,
    reward_components: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    **options,
):
    """Advantages and returns of one ``ADVANTAGE_ESTIMATORS`` row, with verl's semantics
    (``verl.trainer.ppo.core_algos``' estimator of the same name).

    Args:
        token_level_rewards: ``[B, T]`` rewards (an outcome reward on one token, typically the last).
        response_mask: ``[B, T]`` response tokens (0/1 or bool; holes allowed).
        index: one prompt id per row (verl ``uid``: strings, ints, a tensor), any order, groups of
            any size; required by the rows with ``needs_groups``.
        estimator: a row name.
        config: an ``AdvantageConfig``, or its fields as keywords (``epsilon``,
            ``norm_adv_by_std_in_grpo``, ``gamma``, ``f_norm``, ``reward_weights``,
            ``handle_zero_tail``).
        reward_baselines: ``[B]`` (ReMax). reward_components: ``[B, K]`` (GDPO; default: the
            row sums as one component). old_log_probs, sum_pi_squared, rollout_is_weights:
            ``[B, T]`` (optimal token baseline).

    Returns:
        ``(advantages, returns)``, ``[B, T]`` in the rewards' dtype promoted to at least fp32; not
        differentiable (computed under ``no_grad``, as verl does).
    """
    row = lookup_row(ADVANTAGE_ESTIMATORS, estimator, "estimator")
    config = typed_value("config", AdvantageConfig, config, options)
    no_other_keywords("estimate_advantages", options)
    if config.epsilon is None:
        config = config._replace(epsilon=row.epsilon)
    if not check_number("epsilon", config.epsilon) >= 0:
        raise ValueError(f"epsilon must be >= 0, got {config.epsilon}")
    if not 0.0 <= check_number("gamma", config.gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {config.gamma}")
    if check_number("f_norm", config.f_norm) == 0:
        raise ValueError("f_norm must be nonzero (the GPG advantage is divided by it)")
    check_tensor("token_level_rewards", token_level_rewards, floating=True)
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must be [B, T], got shape {tuple(token_level_rewards.shape)}")
    check_tensor("response_mask", response_mask)
    if tuple(response_mask.shape) != tuple(token_level_rewards.shape):
        raise ValueError(f"response_mask must have the shape of token_level_rewards "
                         f"{tuple(token_level_rewards.shape)}, got {tuple(response_mask.shape)}")  # fmt: skip
    B, T = token_level_rewards.shape
    device = token_level_rewards.device
    cd = torch.promote_types(token_level_rewards.dtype, torch.float32)
    groups = None
    if row.needs_groups:
        if index is None:
            raise ValueError(f"estimator {row.name!r} groups rows by prompt: index (one prompt id per row) is required")
        groups = group_index(index, B, device)
    given = dict(reward_baselines=reward_baselines, reward_components=reward_components, old_log_probs=old_log_probs,
                 sum_pi_squared=sum_pi_squared, rollout_is_weights=rollout_is_weights)  # fmt: skip
    extras = {}
    for name, t in given.items():
        if t is None:
            if name in row.needs:
                raise ValueError(f"estimator {row.name!r} needs {name} ({EXTRA_INPUTS[name]})")
            continue
        check_tensor(name, t, floating=True)
        shape = {"B": (B,), "BT": (B, T), "BK": (B, t.shape[-1] if t.dim() == 2 else -1)}[EXTRA_INPUTS[name]]
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        extras[name] = t.detach().to(cd)
    check_same_device(token_level_rewards=token_level_rewards, response_mask=response_mask, **given)
    valid = response_mask != 0
    with torch.no_grad():
        rewards = token_level_rewards.detach().to(cd)
        inputs = AdvantageInputs(rewards, valid.to(cd), groups, config, **extras)
        return row.compute(inputs)
