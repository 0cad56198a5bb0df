"""The clipped value-function loss of PPO, aggregated by any ``AGGREGATION_MODES`` row.

With ``v`` the value predictions (differentiable), ``v_old`` the rollout's values and ``R`` the
returns (both detached), per valid token:

    vclip = clamp(v, v_old − c, v_old + c)          (c = cliprange_value; no clip when None)
    l     = max((v − R)², (vclip − R)²)

and the loss is ``0.5 · aggregate(l)`` with ``loss_agg_mode`` / ``semantics`` / ``global_batch`` of
``losses/aggregation.py`` ``aggregate``. The framework forms are options of it:

- TRL 0.x ``PPOTrainer`` (the value term of ``losses/ppo.py`` ``ppo_loss``): ``"token-mean"``,
  ``semantics="classic"`` (the defaults);
- verl ``compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode,
  dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)``: any mode, ``semantics="verl"``,
  ``global_batch=GlobalBatch(...)``; the sequence modes give the sequence-level value loss;
- OpenRLHF ``ValueLoss(clip_eps, token_level_loss)(values, old_values, returns, action_mask, dp_size,
  batch_num_tokens, global_batch_size)``: ``"token-mean"`` (``token_level_loss=True``) or
  ``"seq-mean-token-mean"`` (``False``), ``semantics="openrlhf"``. OpenRLHF writes the clip as
  ``v_old + clamp(v − v_old, ±c)``: the same values and gradient (one rounding apart).

Memory: eager PyTorch on ``[B, T]``, a few temporaries. Numerics: fp32 (fp64 for fp64 inputs); masked
positions read 0 before the formula (NaN padding never reaches the loss) and get no gradient; a fully
masked or empty batch gives 0 (verl and OpenRLHF: NaN).
Tests: ``tests/frameworks/test_value_parity.py``.
"""
from __future__ import annotations

import torch

from .._utils import check_same_device, check_tensor, output_dtype
from .aggregation import AGGREGATION_MODES, AGGREGATION_SEMANTICS, GlobalBatch, aggregate, lookup
from .validation import check_number


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    semantics: str = "classic",
    global_batch: GlobalBatch | None = None,
):
    """The clipped value loss (see the module docstring).

    Args:
        values: ``[B, T]`` floating value predictions (differentiable).
        old_values: ``[B, T]`` the rollout's values (the clip's centre), or None: no clipping.
        returns: ``[B, T]`` regression targets (e.g. ``gae``'s returns).
        mask: ``[B, T]`` tokens of the loss (nonzero = valid).
        cliprange_value: ``>= 0``, or None: no clipping.
        loss_agg_mode, semantics, global_batch: as ``losses/aggregation.py`` ``aggregate``.

    Returns:
        ``(loss, metrics)``: 0-d loss; ``metrics["critic/vf_loss"]`` (the loss, detached) and
        ``metrics["critic/vf_clipfrac"]`` (share of valid tokens where the clipped term is larger).
    """
    check_tensor("values", values, floating=True)
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    for name, t in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if t is None and name != "old_values":
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        if t is not None:
            check_tensor(name, t, floating=name != "mask")
            if tuple(t.shape) != tuple(values.shape):
                raise ValueError(f"{name} must have the shape of values {tuple(values.shape)}, got {tuple(t.shape)}")
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    cliprange_value = check_number("cliprange_value", cliprange_value, allow_none=True)
    if cliprange_value is not None and not cliprange_value >= 0:
        raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value}")
    lookup(AGGREGATION_MODES, loss_agg_mode, "loss_agg_mode")
    lookup(AGGREGATION_SEMANTICS, semantics, "semantics")

    cd = output_dtype(values.dtype)
    valid = mask != 0
    maskf = valid.to(cd)
    zero = torch.zeros((), dtype=cd, device=values.device)
    v = torch.where(valid, values.to(cd), zero)
    ret = torch.where(valid, returns.detach().to(cd), zero)
    losses = torch.square(v - ret)
    clipfrac = zero
    if old_values is not None and cliprange_value is not None:
        centre = torch.where(valid, old_values.detach().to(cd), zero)
        clipped = torch.square(torch.clamp(v, centre - cliprange_value, centre + cliprange_value) - ret)
        with torch.no_grad():
            clipfrac = (maskf * (clipped > losses).to(cd)).sum() / maskf.sum().clamp(min=1.0)
        losses = torch.maximum(losses, clipped)
    loss = 0.5 * aggregate(losses, maskf, loss_agg_mode, semantics=semantics, global_batch=global_batch)
    return loss, {"critic/vf_loss": loss.detach(), "critic/vf_clipfrac": clipfrac}
