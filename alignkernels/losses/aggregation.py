"""Loss aggregation modes as rows: a ``[B, T]`` per-token loss and its mask to one scalar.

Algorithm: every mode reduces rows first (``loss_sum[b] = Σ_t loss·mask``, ``count[b] = Σ_t mask``),
then one row of ``AGGREGATION_MODES`` turns the row sums into the scalar, given the
``Denominators`` resolved once by ``resolve_denominators``:

- ``token-mean``: ``Σ loss_sum / tokens · dp``
- ``token-sum``: ``Σ loss_sum · dp``
- ``seq-mean-token-sum``: ``Σ_b loss_sum[b] / sequences · dp``
- ``seq-mean-token-mean``: ``Σ_b (loss_sum[b] / count[b]) / sequences · dp``
- ``seq-mean-token-sum-norm``: ``Σ loss_sum / norm_sequences / horizon · dp``

The denominators are the global batch's when ``GlobalBatch`` carries them (verl ``agg_loss``'s
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``, ``dp_size``; OpenRLHF
``aggregate_loss``'s), so the losses of the micro-batches of one step sum to the loss of the whole
step; otherwise the micro-batch's own. ``AGGREGATION_SEMANTICS`` rows say what "the sequences" are:
``classic`` (the default, verl < 0.7): every row counts, ``-sum-norm`` divides by the horizon only;
``verl`` / ``openrlhf`` (verl ≥ 0.7, OpenRLHF 0.11): fully masked rows are excluded, ``-sum-norm``
divides by the number of sequences too.

Every mode is linear in the per-token loss with a weight known before the loss is (``1/tokens``,
``1/(count[b]·sequences)``, ...): all are token-separable (``AggregationMode.token_separable``).

Numerics: sums in the loss's dtype (fp32, fp64 for fp64); a zero denominator (no valid token, no
non-empty row) is replaced by 1 so a fully masked batch gives 0, never NaN.
Tests: ``tests/frameworks/test_verl_parity.py``, ``tests/frameworks/test_openrlhf_parity.py``.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch

from .validation import check_count


class GlobalBatch(NamedTuple):
    """Global-batch denominators (verl ``agg_loss`` / OpenRLHF ``aggregate_loss`` arguments).

    ``dp_size``: data-parallel ranks (the trainer averages gradients over them, so each rank's loss
    is multiplied by it); ``batch_num_tokens``: valid tokens in the global batch (token modes);
    ``global_batch_size``: sequences in the global batch (seq modes); ``loss_scale_factor``: the
    horizon of ``seq-mean-token-sum-norm`` (default: the micro-batch's ``T``). ``None``: the
    micro-batch's own value."""

    dp_size: int = 1
    batch_num_tokens: float | torch.Tensor | None = None
    global_batch_size: float | torch.Tensor | None = None
    loss_scale_factor: float | None = None


class Denominators(NamedTuple):
    """What a mode divides by, resolved for one call (0-d tensors, never 0)."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    norm_sequences: torch.Tensor  # sequences, or 1 where -sum-norm does not divide by them
    horizon: float
    dp_size: int


class AggregationMode(NamedTuple):
    name: str
    reduce: Callable[[torch.Tensor, torch.Tensor, Denominators], torch.Tensor]  # (loss_sum, count, d)
    divides_by: tuple[str, ...]  # the Denominators it reads: "tokens", "sequences", "horizon"
    token_separable: bool  # the per-token gradient weight is known before the loss
    summary: str

    @property
    def per_sequence(self) -> bool:
        return "sequences" in self.divides_by


class AggregationSemantics(NamedTuple):
    name: str
    count_empty_rows: bool  # fully masked rows count in the sequence denominator
    norm_divides_by_sequences: bool  # seq-mean-token-sum-norm divides by the sequences too
    summary: str


def _token_mean(loss_sum, count, d):
    return loss_sum.sum() / d.tokens * d.dp_size


def _token_sum(loss_sum, count, d):
    return loss_sum.sum() * d.dp_size


def _seq_mean_token_sum(loss_sum, count, d):
    return loss_sum.sum() / d.sequences * d.dp_size


def _seq_mean_token_mean(loss_sum, count, d):
    return (loss_sum / count.clamp(min=1.0)).sum() / d.sequences * d.dp_size


def _seq_mean_token_sum_norm(loss_sum, count, d):
    return loss_sum.sum() / d.norm_sequences / d.horizon * d.dp_size


AGGREGATION_MODES: dict[str, AggregationMode] = {
    row.name: row
    for row in (
        AggregationMode("token-mean", _token_mean, ("tokens",), True, "masked sum / valid tokens (TRL, verl default)"),
        AggregationMode("token-sum", _token_sum, (), True, "masked sum"),
        AggregationMode("seq-mean-token-sum", _seq_mean_token_sum, ("sequences",), True,
                        "mean over sequences of token sums"),  # fmt: skip
        AggregationMode("seq-mean-token-mean", _seq_mean_token_mean, ("sequences",), True,
                        "mean over sequences of token means"),  # fmt: skip
        AggregationMode("seq-mean-token-sum-norm", _seq_mean_token_sum_norm, ("sequences", "horizon"), True,
                        "token sum / horizon (Dr. GRPO)"),  # fmt: skip
    )
}
LOSS_AGG_MODES = tuple(AGGREGATION_MODES)

AGGREGATION_SEMANTICS: dict[str, AggregationSemantics] = {
    row.name: row
    for row in (
        AggregationSemantics("classic", True, False, "every row counts; -sum-norm: / horizon (verl < 0.7)"),
        AggregationSemantics("verl", False, True, "fully masked rows excluded; -sum-norm: / sequences / horizon"),
        AggregationSemantics("openrlhf", False, True, "as verl (aggregate_loss: token-mean, seq-mean-token-mean)"),
    )
}


def lookup(table: dict, name: str, what: str):
    """``table[name]``, or a ``ValueError`` naming the argument and listing the table's names."""
    row = table.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"{what} must be one of {', '.join(table)}; got {name!r}")
    return row


def _positive(name: str, value, like: torch.Tensor) -> torch.Tensor | None:
    """A global count as a 0-d tensor of ``like``'s dtype: a number must be finite and > 0; a tensor
    is taken as is (no host sync) and guarded against 0."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name} must be a number or a numeric scalar tensor, got a {value.dtype} tensor "
                            f"of shape {tuple(value.shape)}")  # fmt: skip
        t = value.detach().reshape(()).to(device=like.device, dtype=like.dtype)
        return torch.where(t > 0, t, torch.ones_like(t))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def resolve_denominators(
    count: torch.Tensor, horizon: int, mode: AggregationMode, semantics: AggregationSemantics, batch: GlobalBatch
) -> Denominators:
    """The denominators of one call: the global batch's where given, else the micro-batch's."""
    dp_size = check_count("dp_size", batch.dp_size)
    one = torch.ones((), dtype=count.dtype, device=count.device)
    tokens = _positive("batch_num_tokens", batch.batch_num_tokens, count)
    if tokens is None:
        if dp_size > 1 and "tokens" in mode.divides_by:
            raise ValueError("batch_num_tokens (the global batch's valid tokens) is required when dp_size > 1")
        total = count.sum()
        tokens = torch.where(total > 0, total, one)
    sequences = _positive("global_batch_size", batch.global_batch_size, count)
    if sequences is None:
        if dp_size > 1 and mode.per_sequence:
            raise ValueError("global_batch_size (the global batch's sequences) is required when dp_size > 1")
        n = count.new_tensor(float(count.numel())) if semantics.count_empty_rows else (count > 0).sum().to(count.dtype)
        sequences = torch.where(n > 0, n, one)
    scale = batch.loss_scale_factor
    if scale is None:
        scale = horizon
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"loss_scale_factor must be a number, got {type(scale).__name__} {scale!r}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"loss_scale_factor must be a finite number > 0, got {scale!r}")
    norm_sequences = sequences if semantics.norm_divides_by_sequences else one
    return Denominators(tokens, sequences, norm_sequences, float(scale), dp_size)


def aggregate_rows(
    loss_sum: torch.Tensor,
    count: torch.Tensor,
    horizon: int,
    loss_agg_mode: str = "token-mean",
    *,
    semantics: str = "classic",
    global_batch: GlobalBatch | None = None,
) -> torch.Tensor:
    """The dispatcher: per-row sums over valid tokens (``loss_sum``, ``count``: ``[B]``) to the
    scalar of ``loss_agg_mode``; every backend reduces rows first and calls this."""
    mode = lookup(AGGREGATION_MODES, loss_agg_mode, "loss_agg_mode")
    sem = lookup(AGGREGATION_SEMANTICS, semantics, "semantics")
    batch = global_batch or GlobalBatch()
    needs_horizon = "horizon" in mode.divides_by and batch.loss_scale_factor is None
    horizon = check_count("seq_len", horizon, minimum=1 if needs_horizon else 0)
    d = resolve_denominators(count, horizon, mode, sem, batch)
    return mode.reduce(loss_sum, count, d)


def aggregate(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    semantics: str = "classic",
    global_batch: GlobalBatch | None = None,
) -> torch.Tensor:
    """Aggregate a ``[B, T]`` per-token loss over ``loss_mask`` (see the module docstring).
    Values at masked positions never reach the result (NaN padding included)."""
    if not isinstance(loss_mat, torch.Tensor) or not loss_mat.dtype.is_floating_point:
        raise TypeError(f"loss_mat must be a floating torch.Tensor, got {type(loss_mat).__name__}")
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != tuple(loss_mat.shape):
        got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"loss_mask must be a tensor of loss_mat's shape {tuple(loss_mat.shape)}, got {got}")
    if loss_mat.dim() < 1:
        raise ValueError("loss_mat must be [B, T] (or [B]), got a scalar")
    valid = loss_mask != 0
    weight = loss_mask.to(loss_mat.dtype)
    masked = torch.where(valid, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)) * weight
    return aggregate_rows(masked.sum(-1), weight.sum(-1), loss_mat.shape[-1], loss_agg_mode,
                          semantics=semantics, global_batch=global_batch)  # fmt: skip
