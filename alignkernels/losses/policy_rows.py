"""Policy-loss types as rows: what each GRPO ``loss_type`` is, declared once.

A row of ``POLICY_LOSS_TYPES`` says, for one ``grpo_loss(loss_type=...)``:

- ``term``: the per-token formula of the row engine (``clipped_policy.POLICY_KINDS``: ``clipped``
  = PPO clip ``-min(r·A, clip(r)·A)``, ``cispo`` = ``-sg(min(r, ε_high))·A·logp``, ``sapo`` = the
  soft gate ``-σ(τ(r−1))·4/τ·A``, ``vespo`` = ``-sg(φ(w_seq))·A·logp``);
- ``ratio``, ``clipping``, ``is_weighting``: the ratio level(s) it takes, its clipping rule and how
  the importance ratio weights a token (documentation columns, rendered into ``docs``);
- ``aggregation``: the row of ``losses/aggregation.py`` ``AGGREGATION_MODES`` that reduces its row
  sums, and ``normaliser``: which of TRL's denominators that mode reads (``NORMALISERS``):
  ``own`` (the micro-batch's), ``max_completion_length`` (``B · max_completion_length``, Dr. GRPO)
  or ``num_items`` (TRL's ``num_items_in_batch / num_processes · GA / steps_per_generation``; the
  gradient-accumulation scaling is inside it, the other normalisers divide by GA afterwards);
- ``metrics``: the names it logs besides ``kl`` / ``entropy`` / the entropy-bonus pair;
- ``not_separable``: why ∂L/∂logp_t depends on other tokens (``None``: token-separable, so the
  three-GEMM head of ``losses/fused.py`` can form its gradient in the forward pass);
- ``triton``: whether the fused row kernel (``kernels/grpo.py``, variant ``LOSS_KINDS[term]``) runs it.

``grpo_loss`` validates ``loss_type`` with ``lookup`` (the error lists the table), runs the row's
``term``, aggregates with ``aggregate_rows`` and logs the row's metrics;
``fused.grpo_non_separable_reason`` reads ``not_separable``; the Triton launcher reads ``term``;
``markdown_table`` renders the table of ``docs/ARCHITECTURE.md``.

Memory / numerics: the rows are data; the formulas live in ``clipped_policy`` (torch and Triton)
and ``aggregation`` (the reductions, exact TRL arithmetic: one division per denominator).
Tests: ``tests/losses/test_grpo.py`` (every row vs TRL's own ``_compute_loss``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .aggregation import AGGREGATION_MODES, GlobalBatch, aggregate_rows
from .clipped_policy import POLICY_KINDS
from .validation import check_count, check_num_items

CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max")  # fmt: skip
NORMALISERS = ("own", "max_completion_length", "num_items")


class PolicyLossType(NamedTuple):
    name: str
    term: str  # the row engine's per-token formula (clipped_policy.POLICY_KINDS)
    ratio: tuple[str, ...]  # importance_sampling_level values it takes
    clipping: str
    is_weighting: str
    aggregation: str  # a row of AGGREGATION_MODES
    normaliser: str  # one of NORMALISERS
    metrics: tuple[str, ...]
    not_separable: str | None  # None: token-separable (three-GEMM head)
    triton: bool  # the fused row kernel runs it

    @property
    def token_separable(self) -> bool:
        return self.not_separable is None


_TOKEN_OR_SEQ = ("token", "sequence")
_PPO_CLIP = "clip(r, 1−ε_low, 1+ε_high); r ≤ δ if delta"
_RATIO = "r multiplies A"

POLICY_LOSS_TYPES: dict[str, PolicyLossType] = {
    row.name: row
    for row in (
        PolicyLossType("grpo", "clipped", _TOKEN_OR_SEQ, _PPO_CLIP, _RATIO, "seq-mean-token-mean", "own",
                       CLIP_METRICS, None, True),  # fmt: skip
        PolicyLossType("bnpo", "clipped", _TOKEN_OR_SEQ, _PPO_CLIP, _RATIO, "token-mean", "own", CLIP_METRICS, None,
                       True),  # fmt: skip
        PolicyLossType("dr_grpo", "clipped", _TOKEN_OR_SEQ, _PPO_CLIP, _RATIO, "seq-mean-token-sum-norm",
                       "max_completion_length", CLIP_METRICS, None, True),  # fmt: skip
        PolicyLossType("dapo", "clipped", _TOKEN_OR_SEQ, _PPO_CLIP, _RATIO, "token-mean", "num_items", CLIP_METRICS,
                       None, True),  # fmt: skip
        PolicyLossType("cispo", "cispo", _TOKEN_OR_SEQ, "sg(min(r, ε_high))", "sg(clamped r) · A · logp",
                       "token-mean", "num_items", ("cispo_clip_ratio",), None, True),  # fmt: skip
        PolicyLossType("sapo", "sapo", _TOKEN_OR_SEQ, "none (soft gate σ(τ(r−1))·4/τ)", "gate of r multiplies A",
                       "seq-mean-token-mean", "own", (), None, True),  # fmt: skip
        PolicyLossType("luspo", "clipped", _TOKEN_OR_SEQ, _PPO_CLIP, _RATIO, "seq-mean-token-sum", "own",
                       CLIP_METRICS, None, True),  # fmt: skip
        PolicyLossType("vespo", "vespo", _TOKEN_OR_SEQ, "none (gamma weights, log-ratio in ±20)",
                       "sg(φ(w_seq)) · A · logp", "token-mean", "num_items", ("vespo/phi_seq_mean",),
                       "weights each token by a function of its sequence's ratio", False),  # fmt: skip
    )
}
assert all(row.term in POLICY_KINDS and row.aggregation in AGGREGATION_MODES and row.normaliser in NORMALISERS
           for row in POLICY_LOSS_TYPES.values())  # fmt: skip


def policy_loss_type(name) -> PolicyLossType:
    """The row of ``name``, or a ``ValueError`` naming ``loss_type`` and listing the table."""
    row = POLICY_LOSS_TYPES.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"Unknown loss_type {name!r}; valid loss types: {', '.join(POLICY_LOSS_TYPES)}")
    return row


class TrainerState(NamedTuple):
    """What TRL's normalisation reads (``GRPOTrainer``'s state): ``grpo_loss``'s keywords of the same
    names, validated by ``checked_state`` and ``with_num_items``."""

    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None  # None: gradient_accumulation_steps (TRL's default)
    num_processes: int = 1
    training: bool = True
    num_items_in_batch: int | torch.Tensor | None = None  # checked: 0-d, compute dtype; None: the batch's tokens
    max_completion_length: int | None = None


def checked_state(state: TrainerState) -> TrainerState:
    """The counts as ints >= 1 (TE / VE naming the field: 0, negative, bool or float would give a
    zero, infinite or sign-flipped loss); ``steps_per_generation`` None -> GA."""
    ga = check_count("gradient_accumulation_steps", state.gradient_accumulation_steps)
    spg = state.steps_per_generation
    return state._replace(
        gradient_accumulation_steps=ga, steps_per_generation=ga if spg is None else check_count("steps_per_generation", spg),
        num_processes=check_count("num_processes", state.num_processes), training=bool(state.training),
        max_completion_length=None if state.max_completion_length is None else check_count(
            "max_completion_length", state.max_completion_length),
    )  # fmt: skip


def with_num_items(state: TrainerState, mask: torch.Tensor, dtype: torch.dtype) -> TrainerState:
    """``num_items_in_batch`` as a 0-d ``dtype`` tensor on ``mask``'s device. TRL clamps the count at
    1: a count of 0 is what it passes when every completion of the generation batch is masked (e.g.
    ``mask_truncated_completions``) -- right only if this batch has no valid token either."""
    if state.num_items_in_batch is None:
        return state
    return state._replace(num_items_in_batch=check_num_items(
        "num_items_in_batch", state.num_items_in_batch, device=mask.device, dtype=dtype, minimum=0,
        valid_tokens=(mask != 0).sum()))  # fmt: skip


def aggregate_policy_rows(row: PolicyLossType, loss_sum: torch.Tensor, count: torch.Tensor, horizon: int,
                          state: TrainerState) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, policy_loss)``: the row sums reduced by the row's aggregation mode over TRL's
    denominators (``GRPOTrainer._compute_loss``), and the detached loss before the
    gradient-accumulation division (what TRL logs as ``policy_loss``)."""
    batch = None
    if row.normaliser == "max_completion_length":  # Dr. GRPO: Σ / (B · max_completion_length)
        batch = GlobalBatch(loss_scale_factor=float(loss_sum.shape[0] * state.max_completion_length))
    elif row.normaliser == "num_items":
        n_items = count.sum() if state.num_items_in_batch is None else state.num_items_in_batch
        normalizer = n_items.clamp(min=1.0) / state.num_processes
        if state.training:
            normalizer = normalizer * state.gradient_accumulation_steps / state.steps_per_generation
        batch = GlobalBatch(batch_num_tokens=normalizer)
    loss = aggregate_rows(loss_sum, count, horizon, row.aggregation, semantics="classic", global_batch=batch)
    policy_loss = loss.detach()
    if row.normaliser != "num_items" and state.training:
        loss = loss / state.gradient_accumulation_steps
    return loss, policy_loss


def markdown_table() -> str:
    """The rows as the Markdown table of ``docs/ARCHITECTURE.md`` (a test keeps the two equal)."""
    lines = ["| `loss_type` | term | clipping | IS weighting | aggregation (normaliser) | metrics | three-GEMM "
             "| Triton |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in POLICY_LOSS_TYPES.values():
        metrics = "`clip_ratio/*` (5)" if row.metrics == CLIP_METRICS else ", ".join(f"`{m}`" for m in row.metrics)
        metrics = metrics or "—"
        lines.append(f"| `{row.name}` | {row.term} | {row.clipping} | {row.is_weighting} | `{row.aggregation}` "
                     f"({row.normaliser}) | {metrics} | {'yes' if row.token_separable else 'no'} | "
                     f"{'yes' if row.triton else 'no'} |")  # fmt: skip
    return "\n".join(lines)
