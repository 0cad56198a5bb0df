"""Group-relative advantages (GRPO) and the NaN-aware statistics TRL computes them and logs with.

``group_advantages`` follows the advantage block of TRL 1.16
``GRPOTrainer._generate_and_score_completions`` (one process): a weighted NaN-sum over the reward
functions (NaN = "this function did not score this completion"), minus the group mean, divided
by ``std + 1e-4`` (group, batch or no scaling), or GDPO's per-function normalisation
(``normalize_then_sum``). ``nanstd`` / ``nanmin`` / ``nanmax`` have the semantics of
``trl.trainer.utils``' functions of the same names, without host syncs.

Numerics: fp32 (fp64 for fp64 rewards); std is Bessel-corrected. Not differentiable (rewards
carry no gradient in GRPO). The tests check these against TRL's own helpers and against an
independent loop-over-groups reference written from the formulas (``alignkernels.reference``).
"""
from __future__ import annotations

import torch

from .._utils import check_tensor, output_dtype
from .validation import check_count

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
