"""Process reward models (a score at every reasoning step) and multi-aspect outcome rewards, read
from hidden states at the few positions that matter, without a ``[B, T, K]`` per-token head.

PRM semantics are TRL's PRM trainer (``trl/trainer/prm_trainer.py`` in TRL 0.x, later
``trl/experimental/prm/prm_trainer.py``; TRL 1.16 no longer ships it):

- ``PRMTrainer.tokenize_row`` appends the separator tokens to each step and writes the step's
  label (``int(bool)``: 1 = correct step, 0 = wrong) on the *last* token of step + separator;
  prompt tokens, step bodies and (via ``DataCollatorForTokenClassification``) padding get -100.
  ``train_on_last_step_only`` keeps only the last step's label (the others become -100).
- The model is an ``AutoModelForTokenClassification`` (``num_labels=2``) trained by the stock
  ``Trainer``: ``transformers``' ``ForTokenClassification`` loss, i.e.
  ``cross_entropy(logits.view(-1, C).float(), labels.view(-1), ignore_index=-100)`` -- the mean
  over every non-ignored token, which are exactly the step tokens.
- Its metric (``compute_accuracy``) is the argmax accuracy over non-ignored tokens.

So the loss only ever looks at ``P ≈ steps × B`` rows. :func:`fused_linear_prm_loss` gathers those
rows of the hidden states (:func:`alignkernels.gather_steps`, one Triton kernel on CUDA), applies
the score head to ``[P, H]`` only (``[P, H] @ [H, C]``) and computes the same cross-entropy. The
result equals the model's own loss (tested against ``LlamaForTokenClassification`` /
``Qwen2ForTokenClassification``), while the eager per-token head reads all ``B·T·H`` hidden
values forward and again for the weight gradient, and writes a dense ``[B, T, H]`` gradient
from a matmul (ours: zeros + a ``P``-row scatter).

Multi-aspect outcome rewards (helpfulness, safety, ... as K heads) are read at the last token
(:func:`alignkernels.gather_last`) and trained with one Bradley-Terry loss per head
(:func:`alignkernels.bradley_terry_loss` on ``[B, K]`` rewards): :func:`fused_linear_bradley_terry_loss`.

For RL, :func:`prm_step_scores` turns step logits into per-step scores and
:func:`aggregate_step_scores` reduces them to one score per sequence (min / mean / last / ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_label_range, check_same_device, check_tensor
from ..ops.gather import gather_last
from ..ops.steps import StepPositions, gather_steps
from .reward import bradley_terry_loss
from .validation import check_count, check_num_items

REDUCTIONS = ("mean", "sum", "none")
AGGREGATIONS = ("min", "mean", "last", "max", "prod", "sum")


# --------------------------------------------------------------------------------------------
# The loss (the one place the PRM cross-entropy is computed)
# --------------------------------------------------------------------------------------------
def prm_loss(
    step_logits: torch.Tensor,
    step_labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
):
    """Cross-entropy of step classes, exactly ``transformers``' token-classification loss that
    TRL's PRM trainer optimises: ``mean_j −log softmax(step_logits[j])[step_labels[j]]`` over the
    steps whose label is not ``ignore_index``.

    Args:
        step_logits: ``[..., C]`` logits (``C = num_labels``, 2 in TRL; any float dtype, math in
            fp32 / fp64) -- gathered ``[P, C]`` or token-aligned ``[B, T, C]``.
        step_labels: ``[...]`` integer class per step (same leading shape), ``ignore_index`` = no
            label (e.g. TRL's ``train_on_last_step_only``).
        ignore_index: label value to skip (TRL / transformers: -100).
        num_items_in_batch: if given, ``"mean"`` divides the summed loss by this count instead of
            the number of labelled steps (``transformers``' ``fixed_cross_entropy`` with gradient
            accumulation).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-step losses, 0 where ignored).

    Returns:
        ``(loss, metrics)``; ``metrics`` = ``accuracy`` (TRL ``compute_accuracy``: argmax == label
        over labelled steps) and ``num_steps`` (labelled steps), detached 0-dim tensors. No
        labelled step gives loss 0 and zero gradients (transformers would return NaN).
    """
    check_tensor("step_logits", step_logits, floating=True, ndim_min=1)
    check_tensor("step_labels", step_labels, integer=True)
    check_same_device(step_logits=step_logits, step_labels=step_labels)
    if tuple(step_labels.shape) != tuple(step_logits.shape[:-1]):
        raise ValueError(
            f"step_labels must have one label per step: shape {tuple(step_logits.shape[:-1])} "
            f"(step_logits.shape[:-1]), got {tuple(step_labels.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_classes = step_logits.shape[-1]
    if num_classes < 1:
        raise ValueError("step_logits must have at least one class (last dim C >= 1)")
    check_label_range(step_labels, num_classes, ignore_index, name="step_labels")

    cd = torch.float64 if step_logits.dtype == torch.float64 else torch.float32
    if num_items_in_batch is not None:
        num_items_in_batch = check_num_items("num_items_in_batch", num_items_in_batch, device=step_logits.device,
                                             dtype=cd)  # fmt: skip
    logits = step_logits.to(cd)
    valid = step_labels != ignore_index
    safe_labels = torch.where(valid, step_labels, torch.zeros_like(step_labels)).to(torch.int64)
    # −log p(label) = lse(z) − z_label; d/dz = softmax(z) − onehot(label) (autograd, [P, C] only)
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, nll, torch.zeros((), dtype=cd, device=nll.device))
    num_valid = valid.sum()
    if reduction == "none":
        loss = nll
    elif reduction == "sum":
        loss = nll.sum()
    else:
        denom = num_valid.clamp(min=1).to(cd) if num_items_in_batch is None else num_items_in_batch
        loss = nll.sum() / denom

    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == safe_labels) & valid
        metrics = {
            "accuracy": correct.sum().to(cd) / num_valid.clamp(min=1).to(cd),
            "num_steps": num_valid.to(cd),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Reward head over gathered positions
# --------------------------------------------------------------------------------------------
def _check_head(hidden, weight, bias):
    check_tensor("hidden", hidden, floating=True, ndim_min=2)
    check_tensor("weight", weight, floating=True)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [num_labels, H] = [K, {hidden.shape[-1]}] (nn.Linear layout, e.g. model.score.weight), "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [K] = [{weight.shape[0]}] (one per head), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias)


def _head(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rows @ weight.T + bias`` in the model's dtype (as ``nn.Linear``), then fp32 like
    transformers' loss (``logits.float()``); fp64 stays fp64."""
    out = F.linear(rows, weight, None if bias is None else bias.to(rows.dtype))
    return out if out.dtype == torch.float64 else out.float()


def fused_linear_prm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    step_labels: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    separator_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    return_step_logits: bool = False,
    backend: str = "auto",
):
    """PRM loss from hidden states and a ``[K, H]`` score head, applied at the step tokens only.

    Equals ``AutoModelForTokenClassification``'s loss (what TRL's PRM trainer optimises) computed
    from the same last hidden states (dropout off), without a ``[B, T, K]`` logit tensor.

    Args:
        hidden: ``[B, T, H]`` last hidden states (padded, either side), or packed ``[N, H]`` /
            ``[1, N, H]`` with ``cu_seqlens``.
        weight: ``[K, H]`` score head (``model.score.weight``; K = ``num_labels``, 2 in TRL).
        labels: token-aligned labels in TRL PRM format (``[B, T]`` / ``[N]``): the step class at
            each step token, ``ignore_index`` elsewhere. Steps are ``labels != ignore_index``
            unless ``step_mask`` / ``input_ids`` say where they are (then labels are read there and
            ``ignore_index`` ones skipped).
        bias: optional ``[K]`` (``model.score.bias``).
        step_labels: instead of ``labels``: ``[P]`` one class per step, in row-major step order,
            with the steps given by ``step_mask`` or ``input_ids`` + ``separator_id``.
        step_mask, input_ids, separator_id, attention_mask, cu_seqlens: see
            :func:`alignkernels.step_positions`.
        ignore_index, num_items_in_batch, reduction: see :func:`prm_loss`.
        return_step_logits: also return the fp32 ``[P, K]`` step logits and the
            :class:`~alignkernels.ops.steps.StepPositions` (for :func:`aggregate_step_scores`).
        backend: gather backend (see :func:`alignkernels.gather_steps`).

    Returns:
        ``(loss, metrics)`` as :func:`prm_loss`, or ``(loss, metrics, step_logits, positions)``.
        Differentiable w.r.t. ``hidden`` (non-zero only at step tokens), ``weight`` and ``bias``.
    """
    _check_head(hidden, weight, bias)
    if cu_seqlens is None and hidden.dim() != 3:
        raise ValueError(
            f"hidden must be [B, T, H] (or packed [N, H] with cu_seqlens), got shape {tuple(hidden.shape)}"
        )
    if (labels is None) == (step_labels is None):
        raise ValueError(
            "fused_linear_prm_loss needs exactly one of labels (token-aligned, TRL format) or step_labels ([P])"
        )
    located_by_labels = step_mask is None and input_ids is None
    if step_labels is not None and located_by_labels:
        raise ValueError("step_labels needs step_mask or input_ids + separator_id to say where the steps are")
    gathered, positions = gather_steps(
        hidden,
        step_mask,
        labels=labels if located_by_labels else None,
        input_ids=input_ids,
        separator_id=separator_id,
        attention_mask=attention_mask,
        cu_seqlens=cu_seqlens,
        ignore_index=ignore_index,
        return_positions=True,
        backend=backend,
    )
    P = positions.num_steps
    if labels is not None:
        check_tensor("labels", labels, integer=True)
        if cu_seqlens is None:
            token_shapes = [tuple(hidden.shape[:2])]
        else:
            n = hidden.shape[1] if (hidden.dim() >= 3 and hidden.shape[0] == 1) else hidden.shape[0]
            token_shapes = [(n,), (1, n)]
        if tuple(labels.shape) not in token_shapes:
            raise ValueError(
                f"labels must be token-aligned with hidden: shape {token_shapes[0]}, got {tuple(labels.shape)}"
            )
        step_labels = labels.reshape(-1)[positions.index]
    else:
        check_tensor("step_labels", step_labels, integer=True)
        if step_labels.dim() != 1 or step_labels.numel() != P:
            raise ValueError(
                f"step_labels must be [P] with one label per step position: found P = {P} steps, "
                f"got step_labels of shape {tuple(step_labels.shape)}"
            )
    step_logits = _head(gathered, weight, bias)
    loss, metrics = prm_loss(
        step_logits, step_labels, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, reduction=reduction
    )
    if return_step_logits:
        return loss, metrics, step_logits, positions
    return loss, metrics


def prm_step_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    separator_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    positive_class: int = 1,
    how: str | None = None,
    empty_value: float = 0.0,
    backend: str = "auto",
):
    """Per-step PRM scores for RL: ``softmax(head(h_step))[positive_class]`` (the probability that
    the step is correct; TRL labels 1 = correct), or ``sigmoid`` of the logit for a one-output head.

    Steps are located as in :func:`alignkernels.gather_steps`. Returns ``(scores [P], positions)``,
    or, with ``how`` (see :func:`aggregate_step_scores`), one fp32 score per sequence ``[S]``.
    """
    _check_head(hidden, weight, bias)
    gathered, positions = gather_steps(
        hidden, step_mask, labels=labels, input_ids=input_ids, separator_id=separator_id,
        attention_mask=attention_mask, cu_seqlens=cu_seqlens, return_positions=True, backend=backend,
    )  # fmt: skip
    positive_class = check_count("positive_class", positive_class, minimum=0)
    logits = _head(gathered, weight, bias)
    K = logits.shape[-1]
    if K == 1:
        scores = torch.sigmoid(logits[:, 0])
    else:
        if not 0 <= positive_class < K:
            raise ValueError(f"positive_class must be in [0, {K}) for a {K}-class head, got {positive_class}")
        scores = torch.softmax(logits, dim=-1)[:, positive_class]
    if how is None:
        return scores, positions
    return aggregate_step_scores(scores, positions=positions, how=how, empty_value=empty_value)


# --------------------------------------------------------------------------------------------
# Step scores -> sequence score
# --------------------------------------------------------------------------------------------
_SCATTER_REDUCE = {"min": "amin", "max": "amax", "mean": "mean", "prod": "prod", "sum": "sum"}


def aggregate_step_scores(
    scores: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    *,
    seq_index: torch.Tensor | None = None,
    num_sequences: int | None = None,
    positions: StepPositions | None = None,
    how: str = "min",
    empty_value: float = 0.0,
):
    """Reduce per-step scores to one score per sequence (the sequence reward of a PRM in RL).

    Give the steps in one of three ways:
        step_mask: ``scores`` is ``[B, T]`` (or ``[B, T, K]``) token- or step-aligned and
            ``step_mask`` ``[B, T]`` marks the steps (non-zero); returns ``[B]`` (``[B, K]``).
        seq_index (+ num_sequences): ``scores`` is ``[P]`` (or ``[P, K]``), ``seq_index[j]`` the
            sequence of step ``j``; returns ``[num_sequences]`` (default ``max + 1``).
        positions: a :class:`StepPositions` from :func:`alignkernels.gather_steps` /
            :func:`prm_step_scores` (``scores`` is ``[P]`` / ``[P, K]`` in its order).

    how: ``"min"`` (weakest step, the common PRM choice), ``"mean"``, ``"last"`` (the final step:
        the highest position for ``step_mask``, the last one in ``scores`` order otherwise),
        ``"max"``, ``"prod"`` (product of step probabilities), ``"sum"``.
    empty_value: score of a sequence without steps (no gradient flows to it).

    Returns fp32 (fp64 for fp64 scores); differentiable w.r.t. ``scores`` (``min`` / ``max``
    split the gradient evenly between tied steps, as ``torch.amin``).
    """
    check_tensor("scores", scores, floating=True, ndim_min=1)
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    ways = (("step_mask", step_mask), ("seq_index", seq_index), ("positions", positions))
    given = [name for name, value in ways if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"aggregate_step_scores needs exactly one of step_mask, seq_index, positions; got {given or 'none'}"
        )
    cd = torch.float64 if scores.dtype == torch.float64 else torch.float32

    if step_mask is not None:
        if not isinstance(step_mask, torch.Tensor):
            raise TypeError(f"step_mask must be a torch.Tensor, got {type(step_mask).__name__}")
        if step_mask.dim() != 2 or tuple(scores.shape[:2]) != tuple(step_mask.shape) or scores.dim() > 3:
            raise ValueError(
                f"with step_mask [B, T], scores must be [B, T] or [B, T, K]; got scores {tuple(scores.shape)} "
                f"and step_mask {tuple(step_mask.shape)}"
            )
        check_same_device(scores=scores, step_mask=step_mask)
        flags = step_mask != 0
        rows = flags.nonzero()  # row-major: positions ascending within a row
        flat_scores = scores[rows[:, 0], rows[:, 1]]
        seq = rows[:, 0]
        S = step_mask.shape[0]
    else:
        if positions is not None:
            if not isinstance(positions, StepPositions):
                raise TypeError(f"positions must be a StepPositions, got {type(positions).__name__}")
            seq, S = positions.seq_index, positions.num_sequences
        else:
            check_tensor("seq_index", seq_index, integer=True)
            if seq_index.dim() != 1:
                raise ValueError(f"seq_index must be [P], got shape {tuple(seq_index.shape)}")
            seq = seq_index.to(torch.int64)
            if num_sequences is None:
                S = int(seq.max().item()) + 1 if seq.numel() else 0
            else:
                S = check_count("num_sequences", num_sequences, minimum=0)
            if seq.numel() and bool(((seq < 0) | (seq >= S)).any().item()):
                raise ValueError(f"seq_index values must be in [0, {S}) (num_sequences = {S})")
        if scores.dim() > 2 or scores.shape[0] != seq.numel():
            raise ValueError(
                f"scores must be [P] or [P, K] with P = {seq.numel()} steps (one per step position), "
                f"got shape {tuple(scores.shape)}"
            )
        check_same_device(scores=scores, seq_index=seq)
        flat_scores = scores
    flat_scores = flat_scores.to(cd)
    trailing = tuple(flat_scores.shape[1:])
    P = seq.numel()
    counts = torch.bincount(seq, minlength=S)[:S] if P else torch.zeros(S, dtype=torch.int64, device=scores.device)
    has_steps = (counts > 0).view((S,) + (1,) * len(trailing))
    fill = torch.full((), float(empty_value), dtype=cd, device=scores.device)

    if how == "last":
        order = torch.arange(P, device=scores.device)
        last = torch.zeros(S, dtype=torch.int64, device=scores.device)
        last = last.scatter_reduce(0, seq, order, reduce="amax", include_self=False)
        picked = flat_scores[last.clamp(max=max(P - 1, 0))] if P else flat_scores.new_zeros((S,) + trailing)
        return torch.where(has_steps, picked, fill)

    index = seq.view((P,) + (1,) * len(trailing)).expand_as(flat_scores)
    base = torch.zeros((S,) + trailing, dtype=cd, device=scores.device)
    out = base.scatter_reduce(0, index, flat_scores, reduce=_SCATTER_REDUCE[how], include_self=False)
    return torch.where(has_steps, out, fill)


# --------------------------------------------------------------------------------------------
# Multi-aspect outcome rewards: K heads, one Bradley-Terry loss per head
# --------------------------------------------------------------------------------------------
def fused_linear_bradley_terry_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
):
    """Multi-aspect (K-head) outcome reward loss from hidden states: read each sequence at its last
    real token (:func:`alignkernels.gather_last`, transformers' pooling rule), apply the ``[K, H]``
    head to those ``2B`` rows only, and train every head with TRL RewardTrainer's Bradley-Terry loss
    (:func:`alignkernels.bradley_terry_loss` on ``[B, K]`` rewards: per-head loss, mean over heads).

    Args:
        hidden: ``[2B, T, H]`` with the chosen sequences first and the rejected second (TRL's
            RewardTrainer batch order: ``torch.chunk(rewards, 2)``), or packed ``[N, H]`` with
            ``cu_seqlens`` of ``2B`` sequences in the same order.
        weight: ``[K, H]`` reward heads (K aspects); bias: optional ``[K]``.
        attention_mask / input_ids + pad_token_id / cu_seqlens: where the last real token is.
        margin, center_rewards_coefficient, reduction: as :func:`alignkernels.bradley_terry_loss`
            (``reduction="none"`` gives the ``[K]`` per-head losses).

    Returns:
        ``(loss, metrics)`` of :func:`alignkernels.bradley_terry_loss` (per-head metrics
        ``accuracy/head_k`` etc. when K > 1).
    """
    _check_head(hidden, weight, bias)
    last = gather_last(
        hidden, attention_mask, cu_seqlens=cu_seqlens, input_ids=input_ids, pad_token_id=pad_token_id, backend=backend
    )
    if last.dim() != 2:
        raise ValueError(f"hidden must be [2B, T, H] or packed [N, H]; gathered rows have shape {tuple(last.shape)}")
    if last.shape[0] % 2 or last.shape[0] == 0:
        raise ValueError(
            f"hidden must hold 2B sequences (B chosen, then B rejected), got {last.shape[0]} sequences"
        )
    rewards = _head(last, weight, bias)  # [2B, K]
    chosen, rejected = torch.chunk(rewards, 2, dim=0)
    return bradley_terry_loss(
        chosen, rejected, margin=margin, center_rewards_coefficient=center_rewards_coefficient, reduction=reduction
    )
