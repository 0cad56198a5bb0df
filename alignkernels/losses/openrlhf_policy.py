"""OpenRLHF's ``PolicyLoss`` (``openrlhf.models.loss``, 0.11.2) with its train/rollout
importance-sampling gates, as rows.

``openrlhf_policy_loss`` computes, with ``lr = logp − old`` and ``A`` the advantages:

- ``policy_loss_type`` (a row of ``OPENRLHF_POLICY_TYPES``): ``ppo`` — ``r = exp(clamp(lr, ±20))``
  per token; ``gspo`` — ``r = exp(mean of lr)`` per sequence (against ``rollout_logp`` when the
  correction is on), always aggregated per sequence;
- ``−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)``, for ``A < 0`` capped at ``−dual_clip·A``;
- ``ppo`` with a correction (``ISCorrection``): the per-token loss times a detached coefficient
  from a gate (a row of ``IS_GATES``) on the train/rollout mismatch of ``old`` vs ``rollout_logp``:
  its statistic per token or per sequence (``ratio``: ``exp`` of the mean log-ratio, i.e. the
  geometric mean; ``binary_kl`` / ``tv``: the plain mean of the sampled-token divergence of the two
  Bernoullis ``p = exp(rollout)``, ``q = exp(old)``, clamped to ``[1e-6, 1 − 1e-6]``). ``mask``
  mode keeps the token IS weight ``exp(old − rollout)`` inside ``[low, high]`` and 0 outside;
  ``clip`` mode (token ratios only) clamps the ratio into the band (TIS);
- aggregated by ``losses/aggregation.py`` ``aggregate_rows`` with ``semantics="openrlhf"``:
  ``token-mean`` (``token_level_loss``) or ``seq-mean-token-mean``, global batch optional.

Memory: eager PyTorch on ``[B, T]``. Numerics: fp32 (fp64 for fp64 inputs); masked positions read
0 before any exp/log; a fully masked batch gives 0 (OpenRLHF: NaN); a fully masked sequence has no
statistic and counts as filtered, as in OpenRLHF.
Tests: ``tests/frameworks/test_openrlhf_policy_parity.py`` (vs ``openrlhf.models.loss.PolicyLoss``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._utils import check_same_device, output_dtype
from .aggregation import GlobalBatch, aggregate_rows, lookup
from .validation import check_number, check_token_tensors


class ISGate(NamedTuple):
    name: str
    statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (old, rollout) -> per-token statistic
    finish: Callable[[torch.Tensor], torch.Tensor]  # applied after the per-sequence mean
    clippable: bool  # a weight that clip mode may clamp (the ratio); else a rejection filter
    summary: str


def _bernoullis(old, rollout):
    return rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)


def _binary_kl(old, rollout):
    p, q = _bernoullis(old, rollout)
    return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()


def _tv(old, rollout):
    p, q = _bernoullis(old, rollout)
    return (p - q).abs()


IS_GATES: dict[str, ISGate] = {
    row.name: row
    for row in (
        ISGate("ratio", lambda old, rollout: old - rollout, torch.exp, True,
               "π_train/π_rollout (per sequence: the geometric mean)"),  # fmt: skip
        ISGate("binary_kl", _binary_kl, lambda s: s, False, "binary KL of the sampled token's probabilities"),
        ISGate("tv", _tv, lambda s: s, False, "|p_rollout − p_train| of the sampled token"),
    )
}
IS_LEVELS = ("off", "token", "seq")
IS_MODES = ("mask", "clip")


class ISCorrection(NamedTuple):
    """OpenRLHF's ``is_correction_level`` / ``_mode`` / ``_gating`` / ``_threshold``."""

    level: str = "off"
    mode: str = "mask"
    gating: str = "ratio"
    threshold: tuple[float, float] = (0.5, 5.0)


class OpenRLHFPolicyType(NamedTuple):
    name: str
    sequence_ratio: bool  # one ratio per sequence (GSPO), differentiable through its mean
    token_level_loss: bool | None  # forced aggregation (None: the caller's token_level_loss)
    gated: bool  # the IS correction multiplies its loss
    summary: str


OPENRLHF_POLICY_TYPES: dict[str, OpenRLHFPolicyType] = {
    row.name: row
    for row in (
        OpenRLHFPolicyType("ppo", False, None, True, "token ratio, log-ratio in ±20"),
        OpenRLHFPolicyType("gspo", True, False, False, "sequence ratio exp(mean lr), per-sequence mean"),
    )
}


def _check_correction(c: ISCorrection) -> tuple[ISGate, float, float]:
    if c.level not in IS_LEVELS:
        raise ValueError(f"is_correction level must be one of {', '.join(IS_LEVELS)}; got {c.level!r}")
    if c.mode not in IS_MODES:
        raise ValueError(f"is_correction mode must be one of {', '.join(IS_MODES)}; got {c.mode!r}")
    gate = lookup(IS_GATES, c.gating, "is_correction gating")
    if not (isinstance(c.threshold, (tuple, list)) and len(c.threshold) == 2):
        raise TypeError(f"is_correction threshold must be a (low, high) pair, got {c.threshold!r}")
    low, high = (check_number("is_correction threshold", v) for v in c.threshold)
    if c.mode == "clip" and (c.level == "seq" or not gate.clippable):
        raise ValueError("is_correction mode='clip' needs level='token' and gating='ratio' (a weight to clamp)")
    if not gate.clippable and c.level != "off" and low > 0:
        raise ValueError(f"is_correction gating={gate.name!r} takes an upper bound only (threshold low <= 0), "
                         f"got low={low}")  # fmt: skip
    return gate, low, high


def _masked_mean(x, maskf, dim=None):
    if dim is None:
        return (x * maskf).sum() / maskf.sum().clamp(min=1.0)
    return (x * maskf).sum(dim) / maskf.sum(dim).clamp(min=1.0)


def openrlhf_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy_loss_type: str = "ppo",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    token_level_loss: bool = True,
    rollout_logp: torch.Tensor | None = None,
    is_correction: ISCorrection | None = None,
    global_batch: GlobalBatch | None = None,
):
    """OpenRLHF ``PolicyLoss(clip_eps_low, clip_eps_high, dual_clip, token_level_loss,
    policy_loss_type, is_correction_*)(log_probs, old_log_probs, advantages, action_mask,
    rollout_log_probs, dp_size, batch_num_tokens, global_batch_size)`` (see the module docstring).

    Returns ``(loss, metrics)``: ``clip_ratio``, ``ppo_kl`` and, with a correction on a ``ppo`` loss,
    ``vllm_kl`` and ``is_filter_ratio`` (OpenRLHF's return values, detached 0-d tensors)."""
    row = lookup(OPENRLHF_POLICY_TYPES, policy_loss_type, "policy_loss_type")
    correction = is_correction or ISCorrection()
    gate, low, high = _check_correction(correction)
    for name, value in (("clip_eps_low", clip_eps_low), ("clip_eps_high", clip_eps_high)):
        if not check_number(name, value) >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if check_number("dual_clip", dual_clip, allow_none=True) is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
    if not isinstance(token_level_loss, bool):
        raise TypeError(f"token_level_loss must be a bool, got {type(token_level_loss).__name__}")
    B, T = check_token_tensors(logp, advantages, old_logp=old_logp, mask=mask, rollout_logp=rollout_logp)
    if correction.level != "off" and rollout_logp is None:
        raise ValueError(f"rollout_logp is required when is_correction level={correction.level!r}")
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, rollout_logp=rollout_logp)

    cd = output_dtype(logp.dtype)
    valid = mask != 0
    maskf = valid.to(cd)
    zero = torch.zeros((), dtype=cd, device=logp.device)
    lp = torch.where(valid, logp.to(cd), zero)
    old = torch.where(valid, old_logp.detach().to(cd), zero)
    rollout = None if rollout_logp is None else torch.where(valid, rollout_logp.detach().to(cd), zero)
    adv = advantages.detach().to(cd)
    adv = torch.where(valid, (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(B, T), zero)
    correcting = correction.level != "off"

    raw_lr = lp - old
    if row.sequence_ratio:
        lr = lp - rollout if correcting else raw_lr
        ratio = torch.exp(_masked_mean(lr, maskf, dim=-1)).unsqueeze(-1) * maskf
    else:
        ratio = raw_lr.clamp(min=-20.0, max=20.0).exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    clip1 = torch.min(surr1, surr2)
    if dual_clip is not None:
        clip1 = torch.where(adv < 0, torch.max(clip1, dual_clip * adv), clip1)
    loss = -clip1

    metrics = {}
    if correcting and row.gated:
        with torch.no_grad():
            seq_level = correction.level == "seq"
            is_log_ratio = old - rollout
            stat = gate.statistic(old, rollout)
            if seq_level:
                stat = _masked_mean(stat, maskf, dim=-1).unsqueeze(-1)
            stat = gate.finish(stat)
            if correction.mode == "clip":
                coef = stat.clamp(min=low, max=high)
                filtered = (stat < low) | (stat > high)
            else:
                keep = (stat >= low) & (stat <= high)
                if seq_level:  # a sequence without tokens has no statistic: filtered (OpenRLHF: NaN)
                    keep = keep & valid.any(-1, keepdim=True)
                coef = torch.where(keep, is_log_ratio.exp(), zero)
                filtered = ~keep
            # the share of filtered sequences (B = 0: 0, not NaN) or of filtered valid tokens
            metrics["is_filter_ratio"] = (filtered.to(cd).sum() / max(filtered.numel(), 1) if seq_level
                                          else _masked_mean(filtered.to(cd), maskf))  # fmt: skip
            metrics["vllm_kl"] = _masked_mean(rollout - old, maskf)
        loss = coef * loss

    token_level = row.token_level_loss if row.token_level_loss is not None else token_level_loss
    loss_sum = torch.where(valid, loss, zero).mul(maskf).sum(-1)
    loss = aggregate_rows(loss_sum, maskf.sum(-1), T, "token-mean" if token_level else "seq-mean-token-mean",
                          semantics="openrlhf", global_batch=global_batch)  # fmt: skip
    with torch.no_grad():
        metrics["clip_ratio"] = _masked_mean((surr2 < surr1).to(cd), maskf)
        metrics["ppo_kl"] = _masked_mean(-raw_lr.detach(), maskf)
    return loss, metrics
