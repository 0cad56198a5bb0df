"""verl's rollout-correction diagnostics (``verl.trainer.ppo.rollout_corr_helper``), with verl's keys
(without the ``rollout_corr/`` prefix, which ``verl_policy.verl_rollout_correction`` adds).

Three groups, each a function of detached ``[B, T]`` tensors that are 0 at masked positions:

- :func:`offpolicy_metrics` (verl ``compute_offpolicy_metrics``): per-sequence perplexities of the
  training and rollout policies (``exp(−mean logp)`` averaged over the ``B`` sequences), their log
  difference (mean, |mean|, max, min), ``ppl_ratio``, and the χ² divergences ``E[ρ²] − 1`` per token and
  ``E_seq[(Πρ)²] − 1`` per sequence (log-ratios in ±20 before exp);
- :func:`is_metrics` (``compute_is_metrics``): the IS weights' spread (max / min, the fraction of raw
  ratios above / below the bounds, std and effective sample size of the weights clipped to
  ``[0, upper]``, per-sequence mean weights' mean / std / max / min / max deviation from 1 and the
  fractions of raw per-sequence means out of bounds), ``rollout_is_oob_ratio`` for IcePop;
- :func:`rejection_metrics` (``compute_rs_metrics`` and the masked fractions of
  ``compute_rollout_rejection_mask``): per option, its statistic's mean / max / min / std (clipped to
  the bounds), the fraction above / below them, the same per sequence, and the share of tokens and
  sequences it rejects.

As verl, sequence-wise means run over all ``B`` rows (a fully masked row has per-sequence mean 0, so
perplexity 1) and token-wise means over the valid tokens. Differences, on purpose: counts are clamped
at 1 instead of verl's ``+ 1e-8`` (1e-8 relative), the effective sample size is ``mean(w)² / mean(w²)``
(verl divides by ``mean + 1e-8``) and 0 when every weight is 0; the clipped std is computed in two
passes (verl's ``E[x²] − E[x]²`` over ``count + 1e-8`` is off by up to ``|x|·√(1e-8/n)`` ~ 1e-5 where
the std is 0); a batch with no valid token or no row
gives finite metrics (empty reductions 0; verl raises). Memory: a few ``[B, T]`` temporaries, no gradient.
Tests: ``tests/frameworks/test_rollout_metrics_parity.py`` (every key and value vs verl's helper).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SAFETY_BOUND = 20.0  # verl: log-ratios (token or summed) in ±20 before exp


def _mean(x: torch.Tensor, maskf: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens (0 without any)."""
    return (x * maskf).sum() / maskf.sum().clamp(min=1.0)


def _row_means(x: torch.Tensor, maskf: torch.Tensor) -> torch.Tensor:
    """``[B]``: each row's mean over its valid tokens (0 for a fully masked row)."""
    return (x * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)


def _over(x: torch.Tensor, reduce: str) -> torch.Tensor:
    """``mean`` / ``max`` / ``min`` / ``std`` (unbiased, 0 for one value) of a 1-d tensor; 0 when empty."""
    if x.numel() == 0 or (reduce == "std" and x.numel() == 1):
        return x.new_zeros(())
    return getattr(x, reduce)()


def _clipped_std(x: torch.Tensor, maskf: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Std over the valid tokens of ``x`` clipped to ``[low, high]`` (0 with one valid token or none)."""
    clipped = x.clamp(min=low, max=high)
    var = _mean((clipped - _mean(clipped, maskf)).square(), maskf)  # two passes (module docstring)
    return torch.where(maskf.sum() > 1, var.sqrt(), torch.zeros_like(var))


def offpolicy_metrics(logp: torch.Tensor, rollout_logp: torch.Tensor, maskf: torch.Tensor) -> dict:
    """verl ``compute_offpolicy_metrics(logp, rollout_logp, mask)``."""
    lr = logp - rollout_logp
    train, rollout = _row_means(logp, maskf), _row_means(rollout_logp, maskf)
    diff = rollout - train
    seq_lr = (lr * maskf).sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return {
        "training_ppl": _over(torch.exp(-train), "mean"), "training_log_ppl": _over(-train, "mean"),
        "kl": _mean(-lr, maskf), "k3_kl": _mean(torch.expm1(lr) - lr, maskf),
        "rollout_ppl": _over(torch.exp(-rollout), "mean"), "rollout_log_ppl": _over(-rollout, "mean"),
        "log_ppl_diff": _over(diff, "mean"), "log_ppl_abs_diff": _over(diff.abs(), "mean"),
        "log_ppl_diff_max": _over(diff, "max"), "log_ppl_diff_min": _over(diff, "min"),
        "ppl_ratio": _over(torch.exp(diff), "mean"),
        "chi2_token": _mean(torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).square(), maskf) - 1.0,
        "chi2_seq": _over(torch.exp(2.0 * seq_lr), "mean") - 1.0 if seq_lr.numel() else seq_lr.new_zeros(()),
    }  # fmt: skip


class ISWeights(NamedTuple):
    """The IS weights of one batch and what their metrics read."""

    weights: torch.Tensor  # [B, T] after truncation / IcePop, before batch normalisation
    raw: torch.Tensor  # [B, T] exp(clamped level log-ratio) · mask
    level_lr: torch.Tensor  # [B, T] (token) or [B, 1] (sequence: the row sums), unclamped
    sequence: bool
    lower: float | None  # None: truncation (metrics read 1 / upper)
    upper: float


def is_metrics(w: ISWeights, maskf: torch.Tensor) -> dict:
    """verl ``compute_is_metrics`` (and ``rollout_is_oob_ratio`` of ``compute_rollout_correction_weights``)."""
    upper = w.upper
    lower = 1.0 / upper if w.lower is None else w.lower
    valid = maskf > 0
    out = {"rollout_is_mean": _mean(w.weights, maskf)}
    if w.sequence:
        seq_lr = w.level_lr[:, 0]
        out["rollout_is_max"] = torch.exp(_over(seq_lr, "max").clamp(max=SAFETY_BOUND))
        out["rollout_is_min"] = torch.exp(_over(seq_lr, "min"))
        out["rollout_is_ratio_fraction_high"] = _over((seq_lr > math.log(upper)).to(maskf.dtype), "mean")
        out["rollout_is_ratio_fraction_low"] = _over((seq_lr < math.log(lower)).to(maskf.dtype), "mean")
    else:
        out["rollout_is_ratio_fraction_high"] = _mean((w.raw > upper).to(maskf.dtype), maskf)
        out["rollout_is_ratio_fraction_low"] = _mean((w.raw < lower).to(maskf.dtype), maskf)
        out["rollout_is_max"] = _over(w.weights[valid], "max")
        out["rollout_is_min"] = _over(w.weights[valid], "min")
    out["rollout_is_std"] = _clipped_std(w.weights, maskf, 0.0, upper)
    clipped = w.weights.clamp(min=0.0, max=upper)
    mean, mean_sq = _mean(clipped, maskf), _mean(clipped.square(), maskf)
    out["rollout_is_eff_sample_size"] = torch.where(mean_sq > 0, mean.square() / mean_sq, torch.zeros_like(mean))
    seq = _row_means(w.weights, maskf)
    raw_seq = _row_means(w.raw, maskf)
    out.update({
        "rollout_is_seq_mean": _over(seq, "mean"), "rollout_is_seq_std": _over(seq, "std"),
        "rollout_is_seq_max": _over(seq, "max"), "rollout_is_seq_min": _over(seq, "min"),
        "rollout_is_seq_max_deviation": _over((seq - 1.0).abs(), "max"),
        "rollout_is_seq_fraction_high": _over((raw_seq > upper).to(maskf.dtype), "mean"),
        "rollout_is_seq_fraction_low": _over((raw_seq < lower).to(maskf.dtype), "mean"),
    })  # fmt: skip
    if w.lower is not None:
        out["rollout_is_oob_ratio"] = _mean(((w.raw < lower) | (w.raw > upper)).to(maskf.dtype), maskf)
    return out


class RejectionStat(NamedTuple):
    """One rejection option's statistic and verdict."""

    name: str  # verl's option name, e.g. "seq_mean_k3"
    token_stat: torch.Tensor  # [B, T]: the token's statistic, or its sequence's broadcast
    seq_stat: torch.Tensor | None  # [B] for a sequence-level option
    keep: torch.Tensor  # [B, T] bool: the option keeps the token
    lower: float | None  # k1: the log of the lower ratio bound
    upper: float  # k1: the log of the upper ratio bound


def rejection_metrics(options: tuple[RejectionStat, ...], kept: torch.Tensor, maskf: torch.Tensor) -> dict:
    """verl ``compute_rs_metrics`` per option plus the masked fractions of ``compute_rollout_rejection_mask``;
    ``kept``: the tokens every option keeps."""
    valid = maskf > 0
    seq_valid = valid.any(-1)
    fdt = maskf.dtype
    out = {}
    for o in options:
        p = f"rollout_rs_{o.name}"
        seq_values = (o.seq_stat if o.seq_stat is not None else _row_means(o.token_stat, maskf))[seq_valid]
        low = 0.0 if o.lower is None else o.lower
        out[f"{p}_mean"] = _mean(o.token_stat, maskf)
        per_seq = o.seq_stat is not None and seq_values.numel() > 0
        for reduce in ("max", "min"):
            out[f"{p}_{reduce}"] = _over(seq_values if per_seq else o.token_stat[valid], reduce)
        if per_seq:
            out[f"{p}_fraction_high"] = _over((seq_values > o.upper).to(fdt), "mean")
            out[f"{p}_fraction_low"] = _over((seq_values < low).to(fdt), "mean") if o.lower is not None else \
                maskf.new_zeros(())  # fmt: skip
        else:
            out[f"{p}_fraction_high"] = _mean((o.token_stat > o.upper).to(fdt), maskf)
            out[f"{p}_fraction_low"] = _mean((o.token_stat < low).to(fdt), maskf) if o.lower is not None else \
                maskf.new_zeros(())  # fmt: skip
        out[f"{p}_std"] = _clipped_std(o.token_stat, maskf, low, o.upper)
        out.update({f"{p}_seq_{r}": _over(seq_values, r) for r in ("mean", "std", "max", "min")})
        out[f"{p}_seq_max_deviation"] = _over(seq_values.abs(), "max")
        out[f"{p}_seq_fraction_high"] = _over((seq_values > o.upper).to(fdt), "mean")
        if o.lower is not None:
            out[f"{p}_seq_fraction_low"] = _over((seq_values < low).to(fdt), "mean")
        out[f"{p}_masked_fraction"] = _mean((~o.keep).to(fdt), maskf)
        out[f"{p}_seq_masked_fraction"] = _over((~o.keep & valid).any(-1)[seq_valid].to(fdt), "mean")
    out["rollout_rs_masked_fraction"] = _mean((~kept).to(fdt), maskf)
    out["rollout_rs_seq_masked_fraction"] = _over((~kept & valid).any(-1).to(fdt), "mean")
    return out
