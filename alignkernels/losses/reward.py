"""Bradley-Terry reward-model loss with the semantics of TRL 1.16 ``RewardTrainer.compute_loss``
(``trl/trainer/reward_trainer.py``):

    loss = mean_b −logσ(r_c[b] − r_r[b] − margin[b])  +  c · mean_b (r_c[b] + r_r[b])²

(the second term only when ``center_rewards_coefficient`` c is given), with TRL's logged metrics
``accuracy`` = mean(r_c > r_r), ``margin`` = mean(r_c − r_r), and ``min_reward`` / ``mean_reward``
/ ``max_reward`` over all chosen and rejected rewards.

Several reward heads: rewards ``[B, K]`` give one loss per head (the formula above on column k);
the returned loss is their mean over heads (= the mean over all B·K elements, which is what TRL
computes when its ``score`` layer has K outputs), ``reduction="none"`` returns the ``[K]`` vector.
A ``[B]`` margin applies to every head; a ``[B, K]`` margin is per head.

The reward is read at the last real token: see :func:`alignkernels.gather_last`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import check_tensor
from .validation import check_number

REDUCTIONS = ("mean", "none")


def _as_heads(name, t):
    check_tensor(name, t, floating=True)
    if t.dim() == 1:
        return t.unsqueeze(-1)
    if t.dim() == 2:
        return t
    raise ValueError(f"{name} must be [B] or [B, K] (K reward heads), got shape {tuple(t.shape)}")


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
    reduction: str = "mean",
):
    """Pairwise Bradley-Terry loss of a reward model, exactly as TRL's RewardTrainer.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` or ``[B, 1]`` (one head) or ``[B, K]`` (K heads)
            rewards of the preferred and dispreferred responses (differentiable; any float dtype,
            math in fp32 / fp64).
        margin: optional required gap: a float, ``[B]`` (all heads) or ``[B, K]``; the loss
            becomes ``−logσ(r_c − r_r − margin)``. Not differentiated.
        center_rewards_coefficient: optional c adding ``c · mean((r_c + r_r)²)`` (keeps rewards
            centred at zero, Eisenstein et al. 2023).
        reduction: ``"mean"`` (scalar, mean over heads) or ``"none"`` (``[K]`` per-head losses).

    Returns:
        ``(loss, metrics)``. ``metrics`` holds TRL's names as detached 0-dim tensors, over all heads:
        ``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``; with K > 1 also
        ``accuracy/head_k``, ``margin/head_k`` and ``loss/head_k`` for each head k.
    """
    c = _as_heads("chosen_rewards", chosen_rewards)
    r = _as_heads("rejected_rewards", rejected_rewards)
    if c.shape != r.shape:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must have the same shape, got {tuple(chosen_rewards.shape)} "
            f"and {tuple(rejected_rewards.shape)}"
        )
    if c.device != r.device:
        raise ValueError(f"chosen_rewards is on {c.device} but rejected_rewards on {r.device}")
    if c.shape[0] == 0:
        raise ValueError("bradley_terry_loss needs at least one pair (B >= 1)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    B, K = c.shape
    cd = torch.float64 if torch.float64 in (c.dtype, r.dtype) else torch.float32
    c, r = c.to(cd), r.to(cd)

    diff = c - r
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            if margin.device != c.device:
                raise ValueError(f"margin is on {margin.device}, expected {c.device}")
            if margin.dim() == 1 and margin.shape[0] == B:
                m = margin.view(B, 1)
            elif margin.dim() == 2 and tuple(margin.shape) in ((B, K), (B, 1)):
                m = margin
            elif margin.dim() == 0:
                m = margin
            else:
                raise ValueError(
                    f"margin must be a float, [B] = [{B}] or [B, K] = [{B}, {K}], got {tuple(margin.shape)}"
                )
            m = m.detach().to(cd)
        else:
            m = check_number("margin", margin)
        diff_with_margin = diff - m
    else:
        diff_with_margin = diff
    per_head = -F.logsigmoid(diff_with_margin).mean(dim=0)  # [K]
    if center_rewards_coefficient is not None:
        coefficient = check_number("center_rewards_coefficient", center_rewards_coefficient)
        per_head = per_head + coefficient * ((c + r) ** 2).mean(dim=0)
    loss = per_head.mean() if reduction == "mean" else per_head

    with torch.no_grad():
        both = torch.cat([c, r], dim=0)
        correct = (c > r).to(cd)
        metrics = {
            "accuracy": correct.mean(),
            "margin": diff.mean(),
            "min_reward": both.min(),
            "mean_reward": both.mean(),
            "max_reward": both.max(),
        }
        if K > 1:
            head_acc, head_margin = correct.mean(dim=0), diff.mean(dim=0)
            for k in range(K):
                metrics[f"accuracy/head_{k}"] = head_acc[k]
                metrics[f"margin/head_{k}"] = head_margin[k]
                metrics[f"loss/head_{k}"] = per_head[k].detach()
    return loss, metrics


class BradleyTerryLoss(nn.Module):
    """``nn.Module`` form of :func:`bradley_terry_loss`; ``forward(chosen, rejected, margin=None)``."""

    def __init__(self, center_rewards_coefficient: float | None = None, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.center_rewards_coefficient = center_rewards_coefficient
        self.reduction = reduction

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return bradley_terry_loss(
            chosen_rewards,
            rejected_rewards,
            margin=margin,
            center_rewards_coefficient=self.center_rewards_coefficient,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"center_rewards_coefficient={self.center_rewards_coefficient}, reduction={self.reduction!r}"
