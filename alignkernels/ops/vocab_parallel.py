"""Vocab-parallel log-probs on ``torch.distributed``: logits or an lm_head weight sharded over the
vocabulary (tensor parallel, Megatron-style), every rank gets the full log-prob and entropy.

Layout: a process group of ``W`` ranks; rank ``k`` holds the vocabulary slice
``[vocab_start_k, vocab_start_k + V_k)`` -- logits ``[..., V_k]`` or weight rows ``[V_k, H]`` --
and the slices tile ``[0, V)``. Labels (global ids) and, for the linear form, hidden states are
replicated: identical on every rank.

Algorithm (no new kernels; every rank runs the single-device backends on its shard):
1. Local pass (``token_logprobs`` / ``linear_logprobs`` forward on the shard): per row
   ``lse_k = log Σ_{v∈k} e^{z_v}`` and ``H_k`` (the shard-local entropy), so
   ``Σ_{v∈k} e^{z_v} = e^{lse_k}`` and ``Σ_{v∈k} e^{z_v} z_v = e^{lse_k} (lse_k - H_k)``.
   A label outside the shard is handed to the backend as an out-of-range id that is not
   ``ignore_index`` (its local logp is NaN and unused; lse/entropy stay exact; the backward's
   one-hot never matches), so ignored rows stay ignored.
2. Combine: ``M = allreduce_max(lse_k)``; ``[S, P, zl] = allreduce_sum([e^{lse_k-M},
   e^{lse_k-M}(lse_k-H_k), z_label if owned else 0])``; then ``lse = M + log S``,
   ``Σp·z = P / S``, ``entropy = lse - Σp·z``, ``logp = zl - lse``. 4 fp32 numbers per row
   (3 without entropy) -- O(N) per rank, never O(N·V).
3. Backward is local: the backend's backward with the GLOBAL ``lse`` and ``entropy`` gives
   ``dz = g_logp (onehot - p) - g_H p (z - Σp·z)`` for the shard's columns (``p = e^{z - lse}``,
   ``Σp·z = lse - entropy``), one-hot only on the rank owning the label. For the linear form
   ``grad_weight``/``grad_bias`` stay local and ``grad_hidden`` (a partial sum over the shard's
   vocabulary) is all-reduced (SUM, fp32) across the group: ``N_valid x H`` floats. With
   ``grad_hidden="partial"`` that all-reduce is skipped and each rank returns its own term
   ``dz_k @ W_k`` (a Megatron column-parallel linear's input gradient, which Megatron reduces itself).

Batch invariance (``batch_invariant=True``): each rank runs the single-device op's fixed plan on its
shard (the logits form: ``_logits_engine.BATCH_INVARIANT_TOKEN_KERNELS``; the linear form:
``_lmhead_engine.batch_invariant_plan``, rows padded to whole tiles), and every cross-rank SUM
(step 2's packed terms, the backward's ``grad_hidden``) becomes an all-gather of the ranks' partial
results added in rank order 0, 1, ..., W-1 on every rank (:func:`_sum_in_rank_order`): a collective's
own reduction order (ring / tree, split by buffer size) would depend on where a row sits in the
buffer. The MAX all-reduce is exact. A row's logp, entropy and ``grad_hidden`` row are then bitwise
independent of the batch, for a fixed layout of shards. Cost: the all-gathers move ``W`` times the
all-reduces' numbers (``W·3N`` forward, ``W·N·H`` backward) and hold them at once.

Every rank must compute the same downstream loss (so the upstream gradients agree), as in
Megatron-LM; each call and each backward is a collective (every rank calls it, same order).

The sampler's kept set (``support=``, ``ops/_support.py``): every rank takes the GLOBAL packed words
``[..., ceil(V/32)]`` (replicated like the labels: what a sampler returns, whatever the tensor-parallel
layout), checks the labels against them, and cuts its own slice's words (``shard_words``: a funnel shift,
``V/32`` words per row); the local pass then masks the shard's logits outside the set, and the combine
and backward are unchanged (a shard with no kept token in a row contributes no mass; a row with none on
any shard has no mass at all: logp ``-inf``, entropy 0, gradient 0, as on one process).
``top_k=`` forms that set across the shards (:func:`_top_k_support`): each rank takes its shard's
``min(k, V_k)`` best per row with their GLOBAL ids (``_support.shard_top_k`` on the logits;
``_lmhead_engine.head_top_k_candidates`` streaming the shard's vocabulary blocks), one all-gather of
``[N, k]`` (values, ids) per rank, and every rank picks the same global ``k`` best from that table, ties
at the ``k``-th value to the lowest global ids (``_support.pick_top_k``): the set ``top_k=`` gives on one
process, whatever the shard layout or rank order. Then the GLOBAL words, the labels' check and the path
of ``support=``. Exact comparisons only: with ``batch_invariant=True`` the set is batch invariant too.

Consistency checks (``check_shards=True``, default): one all-gather of a few int64 per rank per
call verifies that the slices tile ``[0, V)``, that every rank has the same number of rows, the
same labels (a fingerprint) and the same ``requires_grad`` for ``hidden``, and that no rank
rejected its inputs -- every rank raises the same ``ValueError`` instead of one rank raising and
the others hanging in the next collective. It costs one host sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._utils import (
    OpBackends,
    check_batch_invariant,
    check_label_range,
    check_same_device,
    check_temperature,
    check_tensor,
    labels_checking_enabled,
    output_dtype,
    refuse_double_backward,
    widen_labels,
)
from ._lmhead_engine import (
    FOLDS,
    batch_invariant_plan,
    check_positive_int,
    compact_rows,
    head_backward,
    head_forward,
    make_plan,
    pad_rows,
    validate_head,
)
from ._lmhead_engine import head_precision as head_precision_row
from ._logits_engine import BATCH_INVARIANT_TOKEN_KERNELS, TOKEN_KERNELS
from ._lora import LoraHead, validate_lora
from ._softmax_torch import RowStats, log_prob, merge_terms, merged
from ._lmhead_engine import head_top_k_candidates
from ._support import (
    Support,
    TopK,
    check_labels_kept,
    ids_to_words,
    label_bits,
    pick_top_k,
    shard_top_k,
    shard_words,
    validate_support,
)

# The single-device backends each rank can run on its shard (no eager "reference": it cannot be split).
VOCAB_PARALLEL_TOKEN_LOGPROBS = OpBackends("vocab_parallel_token_logprobs", ("triton", "cuda", "torch"))
VOCAB_PARALLEL_LINEAR_LOGPROBS = OpBackends("vocab_parallel_linear_logprobs", ("triton", "torch"))
# vocab_parallel_linear_logprobs(grad_hidden=): the full gradient (all-reduced SUM) or this rank's term of it
GRAD_HIDDEN_MODES = ("reduced", "partial")


def _reduce_grad_hidden(value) -> bool:
    """``grad_hidden=`` validated by name: True for ``"reduced"`` (the backward all-reduces it)."""
    if not isinstance(value, str):
        raise TypeError(f"grad_hidden must be one of {GRAD_HIDDEN_MODES} (a str), got {value!r}")
    if value not in GRAD_HIDDEN_MODES:
        raise ValueError(f"grad_hidden must be one of {GRAD_HIDDEN_MODES}, got {value!r}")
    return value == "reduced"


# --------------------------------------------------------------------------------------------
# Group plumbing and the cross-rank consistency check
# --------------------------------------------------------------------------------------------
def _group_size(process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vocab-parallel log-probs need torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the call"
        )
    return dist.get_world_size(process_group)


def _collective_device(process_group, *tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _out_of_shard_label(ignore_index: int) -> int:
    """The local label of rows whose label lives on another rank: out of range, not ignore_index."""
    return -1 if ignore_index != -1 else -2


def _labels_fingerprint(labels: torch.Tensor) -> torch.Tensor:
    """An int64 checksum of the label sequence (position-weighted, wraps on overflow)."""
    flat = labels.reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 1021 + 1
    return (flat * weights).sum()


# Columns of the per-rank record gathered by _agree
_ERR, _START, _SIZE, _VOCAB, _ROWS, _FINGERPRINT, _GRAD = range(7)


def _agree(process_group, device, local_error, vocab_start, shard_size, vocab_size, labels, requires_grad):
    """One all-gather of ``[error, start, size, V, rows, label fingerprint, requires_grad]`` per rank;
    every rank runs the same checks on the same table, so every rank raises the same error."""
    world = dist.get_world_size(process_group)
    record = torch.zeros(7, dtype=torch.int64, device=device)
    if local_error is None:
        record[_START], record[_SIZE], record[_VOCAB] = vocab_start, shard_size, vocab_size
        record[_ROWS] = labels.numel()
        record[_FINGERPRINT] = _labels_fingerprint(labels)
        record[_GRAD] = int(requires_grad)
    else:
        record[_ERR] = 1
    table = [torch.empty_like(record) for _ in range(world)]
    dist.all_gather(table, record, group=process_group)
    table = torch.stack(table).tolist()  # host sync

    if local_error is not None:
        raise local_error
    bad = [r for r, row in enumerate(table) if row[_ERR]]
    if bad:
        raise ValueError(f"vocab-parallel call: rank(s) {bad} of the process group rejected their inputs "
                         "(see the error raised on those ranks)")  # fmt: skip
    vocabs = sorted({row[_VOCAB] for row in table})
    if len(vocabs) != 1:
        raise ValueError(f"vocab_size must be the same on every rank, got {[row[_VOCAB] for row in table]}")
    rows = [row[_ROWS] for row in table]
    if len(set(rows)) != 1:
        raise ValueError(f"every rank must hold the same tokens (labels.numel() per rank: {rows}); "
                         "vocab-parallel shards split the vocabulary, not the batch")  # fmt: skip
    if len({row[_FINGERPRINT] for row in table}) != 1:
        raise ValueError("labels differ across ranks: vocab-parallel inputs need identical (replicated) "
                         "labels on every rank of the process group")  # fmt: skip
    if len({row[_GRAD] for row in table}) != 1:
        raise ValueError("hidden.requires_grad differs across ranks (or lora= / lora_A.requires_grad / grad_hidden= "
                         "does): the backward all-reduces of grad_hidden (grad_lora_A) need every rank to take "
                         "part")  # fmt: skip
    slices = sorted((row[_START], row[_SIZE], r) for r, row in enumerate(table))
    expected = 0
    for start, size, rank in slices:
        if start != expected:
            what = "overlaps the previous slice" if start < expected else f"leaves [{expected}, {start}) uncovered"
            desc = ", ".join(f"rank {r}: [{s}, {s + n})" for s, n, r in slices)
            raise ValueError(f"vocabulary shards do not tile [0, {vocabs[0]}): rank {rank}'s slice starting at "
                             f"{start} {what} ({desc})")  # fmt: skip
        expected = start + size
    if expected != vocabs[0]:
        desc = ", ".join(f"rank {r}: [{s}, {s + n})" for s, n, r in slices)
        raise ValueError(f"vocabulary shards do not tile [0, {vocabs[0]}): they end at {expected} ({desc})")


def _run_checked(validate, process_group, check_shards, device_candidates, vocab_start, shard_size, vocab_size,
                 labels, requires_grad):  # fmt: skip
    """Validate locally; with ``check_shards`` share the verdict (and the layout) with every rank."""
    local_error, result = None, None
    try:
        result = validate()
    except (ValueError, TypeError) as exc:
        if not check_shards:
            raise
        local_error = exc
    if check_shards:
        device = _collective_device(process_group, *device_candidates)
        _agree(process_group, device, local_error, vocab_start, shard_size, vocab_size, labels, requires_grad)
    return result


def _check_vocab_args(vocab_start, vocab_size, shard_size):
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size (the global vocabulary size) must be > 0, got {vocab_size}")
    if vocab_start < 0 or vocab_start + shard_size > vocab_size:
        raise ValueError(f"this rank's vocabulary slice [vocab_start, vocab_start + shard) = [{vocab_start}, "
                         f"{vocab_start + shard_size}) must lie inside [0, vocab_size={vocab_size})")  # fmt: skip


def _local_labels(labels, vocab_start, shard_size, ignore_index):
    """Global labels -> (labels local to this shard, bool "this rank owns the label"). Rows whose
    label is elsewhere get an out-of-range id that is not ignore_index; ignored rows keep it."""
    local = labels.long() - vocab_start
    owned = (local >= 0) & (local < shard_size) & (labels != ignore_index)
    other = torch.where(labels == ignore_index, ignore_index, _out_of_shard_label(ignore_index))
    return torch.where(owned, local, other), owned


def _sum_in_rank_order(t: torch.Tensor, process_group) -> torch.Tensor:
    """``t`` summed over the group's ranks, the terms added in rank order on every rank (one
    all-gather; ``batch_invariant=True``): each element's sum is the same whatever the buffer holds
    around it, unlike an all-reduce whose algorithm may split the buffer by size."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, t.contiguous(), group=process_group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def _all_reduce_sum(t: torch.Tensor, process_group, rank_order: bool) -> torch.Tensor:
    """SUM over the group: an all-reduce in place, or :func:`_sum_in_rank_order` (a new tensor)."""
    if rank_order:
        return _sum_in_rank_order(t, process_group)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


# --------------------------------------------------------------------------------------------
# The combine step: the one place where shard statistics become global log-probs and entropies
# --------------------------------------------------------------------------------------------
def _combine_shards(logp_k, stats_k: RowStats, owned, valid, want_entropy, process_group, rank_order=False):
    """Per row: this shard's ``logp_k`` (meaningful where it owns the label) and centred state
    ``stats_k``. Returns the global ``(logp, RowStats)`` on every rank (``_softmax_torch``'s merge,
    summed across ranks instead of over a local dim).

    Two all-reduces: MAX of ``row_max_k`` (N floats), then one SUM of the packed
    ``[Σ_k e^(z-M), Σ_k (z-M) e^(z-M) (entropy only), z_label - M (owner only)]`` (2-3 N floats).
    The owner's ``z_label - M = logp_k + log_sum_k + (row_max_k - M)``: centred, no digit lost.
    ``rank_order``: the SUM as :func:`_sum_in_rank_order` (``batch_invariant=True``)."""
    zero = torch.zeros((), dtype=stats_k.row_max.dtype, device=stats_k.row_max.device)
    # ignored rows: finite dummies (backends may leave 0 / garbage there)
    part = RowStats(*(torch.where(valid, x, zero) for x in stats_k))
    row_max = part.row_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=process_group)
    terms = merge_terms(part, row_max)
    label_centred = torch.where(owned, logp_k + part.log_sum + (part.row_max - row_max), zero)
    packed = torch.cat((terms if want_entropy else terms[:1], label_centred[None]))
    packed = _all_reduce_sum(packed, process_group, rank_order)
    total = packed[:2] if want_entropy else torch.stack((packed[0], torch.zeros_like(packed[0])))
    stats = merged(row_max, total)
    return log_prob(packed[-1], stats.log_sum), stats


def _global_support(support, top_k, labels, vocab_size, device, check_labels, ignore_index) -> Support | None:
    """``support=`` / ``top_k=`` validated against the global vocabulary; ``support``'s labels checked
    (inside the agreed validation: every rank raises alike; ``top_k``'s after :func:`_top_k_support`)."""
    kept = validate_support(support, top_k, labels.shape, vocab_size, device, labels_checking_enabled(check_labels))
    if kept is not None and kept.bits is not None:
        _check_kept_labels(kept, labels.reshape(-1), vocab_size, ignore_index)
    return kept


def _check_kept_labels(kept: Support, labels, vocab_size, ignore_index) -> None:
    """``ValueError`` naming the first valid label (``[n]``, the GLOBAL words' rows) outside its kept set."""
    if kept.check:
        check_labels_kept(label_bits(kept.bits, labels.clamp(0, vocab_size - 1)), labels != ignore_index, kept.shape)


def _top_k_support(local: TopK, kept: Support, vocab_size: int, process_group) -> Support:
    """``top_k=`` across the shards: this rank's candidates ``local`` (each row's ``min(k, V_k)`` best,
    GLOBAL ids) -> the GLOBAL words of each row's ``k`` best on every rank (``ops/_support.py``
    ``pick_top_k``: ties at the ``k``-th value to the lowest global ids, as ``first_k_largest`` on the
    whole row). One all-gather of ``[2, rows, k]`` int64 per rank (the values' bits and the ids; a
    shard narrower than ``k`` pads with ``-inf`` at ids past ``V``, never picked: the real candidates
    number ``≥ k``). Every rank picks from the same table, so every rank gets the same set."""
    k = kept.top_k
    values, ids = local
    rows, pad = ids.shape[0], k - ids.shape[1]
    if pad:
        values = torch.cat((values, values.new_full((rows, pad), float("-inf"))), 1)
        ids = torch.cat((ids, vocab_size + torch.arange(pad, device=ids.device).expand(rows, -1)), 1)
    as_int = torch.int64 if values.dtype == torch.float64 else torch.int32
    packed = torch.stack((values.contiguous().view(as_int).long(), ids))
    table = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(table, packed, group=process_group)
    table = torch.cat(table, 2)
    chosen = pick_top_k(table[0].to(as_int).view(values.dtype), table[1], k)
    return Support(ids_to_words(chosen, vocab_size), None, kept.check, kept.shape)


def _shard_support(kept: Support | None, vocab_start: int, shard: int, rows=None) -> Support | None:
    """This shard's kept set (labels already checked globally); ``rows``: the compact rows to keep."""
    if kept is None:
        return None
    bits = kept.bits if rows is None else kept.bits.index_select(0, rows)
    return Support(shard_words(bits, vocab_start, shard), None, False, kept.shape)


# --------------------------------------------------------------------------------------------
# Logits form
# --------------------------------------------------------------------------------------------
class VocabParallelTokenLogprobsFunction(torch.autograd.Function):
    """Autograd over a logits shard ``[..., V_k]``; ``local_labels``/``owned``/``valid`` are flat
    ``[N]``. Saves the shard, the local labels and the GLOBAL row state."""

    @staticmethod
    def forward(ctx, logits, local_labels, owned, valid, temperature, ignore_index, backend, want_entropy,
                process_group, batch_invariant=False, support=None):  # fmt: skip
        kernels = (BATCH_INVARIANT_TOKEN_KERNELS if batch_invariant else TOKEN_KERNELS)[backend]
        kernels = kernels.with_support(support)  # support: this shard's words
        logp_k, stats_k = kernels.forward(logits, local_labels, temperature, ignore_index)
        logp, stats = _combine_shards(logp_k, stats_k, owned, valid, want_entropy, process_group, batch_invariant)
        ctx.save_for_backward(logits, local_labels, *stats)
        ctx.temperature, ctx.ignore_index, ctx.kernels, ctx.backend = temperature, ignore_index, kernels, backend
        ctx.set_materialize_grads(False)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        return torch.where(valid, logp, zero), torch.where(valid, stats.entropy, zero)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("vocab_parallel_token_logprobs", ctx.backend)
        none = (None,) * 10
        if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return (None, *none)
        logits, local_labels, *stats = ctx.saved_tensors
        grad_logp = grad_logp.contiguous() if grad_logp is not None else None
        grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
        # The backend's backward with the global state is exactly d(global logp, entropy)/d(shard): a
        # foreign-shard label is out of range locally, so it has no one-hot column here.
        grad_logits = ctx.kernels.backward(logits, local_labels, RowStats(*stats), grad_logp, grad_entropy,
                                           ctx.temperature, ctx.ignore_index)  # fmt: skip
        return (grad_logits, *none)


def vocab_parallel_token_logprobs(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    process_group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    check_labels: bool | None = None,
    check_shards: bool = True,
    batch_invariant: bool = False,
    support: torch.Tensor | None = None,
    top_k: int | None = None,
):
    """``token_logprobs`` for logits sharded over the vocabulary across ``process_group``.

    Rank ``k`` holds the logits columns ``[vocab_start, vocab_start + logits_shard.shape[-1])`` of
    the global ``[..., vocab_size]`` logits (e.g. the output of a column-parallel lm_head); the
    slices of all ranks must tile ``[0, vocab_size)``. Every rank gets the full result, equal to
    ``token_logprobs`` on the concatenated logits. Communication per call: two all-reduces of
    ``N`` and ``3N`` (``2N`` without entropy) fp32 numbers, plus the small consistency all-gather.

    Args:
        logits_shard: ``[..., V_k]`` this rank's logits slice (dtypes and layouts as
            ``token_logprobs``).
        labels: ``[...]`` = ``logits_shard.shape[:-1]``, GLOBAL token ids in ``[0, vocab_size)`` or
            ``ignore_index``; identical on every rank.
        vocab_start: first global vocabulary id of this rank's slice.
        vocab_size: the global vocabulary size ``V`` (sum of all shards).
        process_group: the tensor-parallel group (``None``: the default group).
        temperature, ignore_index, return_entropy: as ``token_logprobs``.
        backend: the single-device backend each rank runs on its shard: ``"auto"``, ``"triton"``,
            ``"cuda"`` or ``"torch"`` (no ``"reference"``: the eager reference cannot be split over ranks).
        check_labels: range check of the global labels (as ``token_logprobs``).
        check_shards: verify the layout across ranks (one small all-gather and a host sync; see the
            module docstring). Turn off once a training loop's layout is known to be right.
        batch_invariant: each row's logp, entropy and gradient row bitwise independent of the other
            rows (``token_logprobs``'s fixed chunks on each shard, the shards' sums added in rank
            order: module docstring). ``torch`` and ``triton`` only (``ValueError`` otherwise).
        support: the sampler's kept tokens as ``token_logprobs(support=)``: the GLOBAL packed words
            ``labels.shape + (ceil(vocab_size/32),)``, identical on every rank (each cuts its slice).
        top_k: the kept set formed here, as ``token_logprobs(top_k=)``: each row's ``top_k`` largest
            logits over the GLOBAL vocabulary, ties at the ``k``-th value to the lowest global ids --
            the same set as on one process. Each rank's ``min(k, V_k)`` best per row, one all-gather
            of ``[N, k]`` (values, ids) per rank, the same pick on every rank, then as ``support``.

    Returns:
        ``logp`` (fp32; fp64 for fp64 logits; shape of ``labels``) or ``(logp, entropy)``, the same
        on every rank. Differentiable w.r.t. ``logits_shard``: the gradient of this rank's slice,
        computed locally (every rank must backpropagate the same downstream loss).
    """
    _group_size(process_group)

    def validate():
        check_tensor("logits_shard", logits_shard, floating=True, ndim_min=1)
        wide = widen_labels("labels", labels)
        check_same_device(logits_shard=logits_shard, labels=wide)
        if tuple(labels.shape) != tuple(logits_shard.shape[:-1]):
            raise ValueError(f"labels must have shape logits_shard.shape[:-1] = {tuple(logits_shard.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")  # fmt: skip
        if logits_shard.shape[-1] == 0:
            raise ValueError("logits_shard must have a non-empty last (vocabulary) dimension")
        _check_vocab_args(vocab_start, vocab_size, logits_shard.shape[-1])
        t = check_temperature(temperature)
        if labels_checking_enabled(check_labels):
            check_label_range(wide, vocab_size, ignore_index)
        impl = VOCAB_PARALLEL_TOKEN_LOGPROBS.resolve(backend, logits_shard.device, logits_shard.dtype)
        invariant_backends = tuple(BATCH_INVARIANT_TOKEN_KERNELS)
        if check_batch_invariant(batch_invariant) and impl not in invariant_backends:
            raise ValueError(f"batch_invariant=True is implemented on the backends {invariant_backends}, "
                             f"got backend={impl!r}")  # fmt: skip
        kept = _global_support(support, top_k, wide, vocab_size, logits_shard.device, check_labels, ignore_index)
        return t, impl, wide, kept

    shard = logits_shard.shape[-1] if isinstance(logits_shard, torch.Tensor) and logits_shard.dim() else 0
    t, impl, wide_labels, kept = _run_checked(validate, process_group, check_shards, (logits_shard, labels),
                                              vocab_start, shard, vocab_size, labels, False)  # fmt: skip
    flat_labels = wide_labels.reshape(-1)
    local_labels, owned = _local_labels(flat_labels, vocab_start, shard, int(ignore_index))
    valid = flat_labels != ignore_index
    if kept is not None and kept.top_k is not None:  # the raw logits' order (the temperature keeps it)
        kept = _top_k_support(shard_top_k(logits_shard, kept.top_k, vocab_start), kept, vocab_size, process_group)
        _check_kept_labels(kept, flat_labels, vocab_size, ignore_index)
    local_support = _shard_support(kept, vocab_start, shard)
    logp, entropy = VocabParallelTokenLogprobsFunction.apply(
        logits_shard, local_labels.contiguous(), owned, valid, t, int(ignore_index), impl, bool(return_entropy),
        process_group, batch_invariant, local_support,
    )  # fmt: skip
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# Hidden-states form (column-parallel lm_head)
# --------------------------------------------------------------------------------------------
class VocabParallelLinearLogprobsFunction(torch.autograd.Function):
    """Autograd over the compact (valid-only) rows: ``hidden [n, H]`` (replicated), ``weight_shard
    [V_k, H]``, ``bias_shard [V_k] | None``, ``local_labels [n]`` int64. Runs the lm-head engine on
    the shard; saves the GLOBAL row state."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local_labels, owned, tr, plan, fold, want_entropy, process_group,
                lora_A=None, lora_B=None, lora_scaling=None, support=None, reduce_grad_hidden=True):  # fmt: skip
        ctx.set_materialize_grads(False)
        lora = LoraHead(lora_A, lora_B, lora_scaling) if lora_A is not None else None
        with torch.autocast(hidden.device.type, enabled=False):  # support: this shard's words of the compact rows
            out = head_forward(hidden, weight, bias, local_labels, tr, plan, fold, False, lora=lora, support=support)
        logp, stats = _combine_shards(out.logp, out.stats, owned, torch.ones_like(owned), want_entropy,
                                      process_group, plan.padded)  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, local_labels, lora_A, lora_B, *stats)
        ctx.tr, ctx.plan, ctx.fold, ctx.has_entropy, ctx.process_group = tr, plan, fold, want_entropy, process_group
        ctx.lora_scaling, ctx.support, ctx.reduce_grad_hidden = lora_scaling, support, reduce_grad_hidden
        ctx.backend = fold.NAME
        return logp, stats.entropy.clone()

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("vocab_parallel_linear_logprobs", ctx.backend)
        hidden, weight, bias, local_labels, lora_A, lora_B, *stats = ctx.saved_tensors
        lora = LoraHead(lora_A, lora_B, ctx.lora_scaling) if lora_A is not None else None
        needs = tuple(ctx.needs_input_grad[:3]) + (tuple(ctx.needs_input_grad[10:12]) if lora is not None else ())
        none = (None,) * 7
        if not ctx.has_entropy:
            grad_entropy = None
        cd = stats[0].dtype
        if grad_logp is None and grad_entropy is None:
            grad_logp = torch.zeros_like(stats[0])  # keep the grad_hidden all-reduce collective on every rank
        g_logp = grad_logp.to(cd).contiguous() if grad_logp is not None else None
        g_entropy = grad_entropy.to(cd).contiguous() if grad_entropy is not None else None
        grad_hidden = grad_weight = grad_bias = grad_lora_A = grad_lora_B = None
        if any(needs):
            with torch.autocast(hidden.device.type, enabled=False):
                grad_hidden, grad_weight, grad_bias, *grad_lora = head_backward(
                    hidden, weight, bias, local_labels, RowStats(*stats), g_logp, g_entropy, ctx.tr, ctx.plan,
                    ctx.fold, needs, lora=lora, support=ctx.support,
                )  # fmt: skip
            if grad_lora:
                grad_lora_A, grad_lora_B = grad_lora
        if grad_lora_A is not None:
            # lora_A is replicated: grad_A = s·Σ_k (dz_k·B_k)ᵀ·h is a sum over the shards, like grad_hidden
            grad_lora_A = grad_lora_A.to(output_dtype(hidden.dtype))
            dist.all_reduce(grad_lora_A, op=dist.ReduceOp.SUM, group=ctx.process_group)
            grad_lora_A = grad_lora_A.to(lora_A.dtype)
        if needs[0]:
            # grad_hidden = Σ_k dz_k @ W_k: this rank holds one term of the sum (fp32 accumulator)
            if ctx.reduce_grad_hidden:
                grad_hidden = _all_reduce_sum(grad_hidden, ctx.process_group, ctx.plan.padded)
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden, grad_weight, grad_bias, *none, grad_lora_A, grad_lora_B, None, None, None)


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    process_group=None,
    bias_shard: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    backend: str = "auto",
    check_labels: bool | None = None,
    check_shards: bool = True,
    lora=None,
    head_precision: str = "input",
    batch_invariant: bool = False,
    support: torch.Tensor | None = None,
    grad_hidden: str = "reduced",
    top_k: int | None = None,
):
    """``linear_logprobs`` with the lm_head sharded over the vocabulary across ``process_group``
    (column-parallel lm_head): no rank ever holds ``[N, V]`` logits or the full ``[V, H]`` weight.

    Rank ``k`` holds the weight rows ``[vocab_start, vocab_start + weight_shard.shape[0])`` (and
    the matching ``bias_shard``); the slices must tile ``[0, vocab_size)``. ``hidden`` and
    ``labels`` are replicated. Each rank runs the chunked ``linear_logprobs`` algorithm on its
    shard, then the shard statistics are combined as in :func:`vocab_parallel_token_logprobs`.
    Every rank gets the full result, equal to ``linear_logprobs`` with the concatenated weight.

    Args:
        hidden: ``[..., H]`` hidden states, identical on every rank.
        weight_shard: ``[V_k, H]`` this rank's lm_head rows, ``hidden``'s dtype.
        labels: ``[...]`` = ``hidden.shape[:-1]``, GLOBAL ids in ``[0, vocab_size)`` or
            ``ignore_index``; identical on every rank. Ignored rows cost no FLOPs.
        vocab_start, vocab_size, process_group: as :func:`vocab_parallel_token_logprobs`.
        bias_shard: optional ``[V_k]`` slice of the lm_head bias.
        temperature, logit_scale, softcap, ignore_index, return_entropy, chunk_size,
            vocab_block_size, check_labels, head_precision: as ``linear_logprobs`` (the logit
            transform is elementwise, so it applies per shard unchanged).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (the fold each rank runs on its shard).
        check_shards: verify the layout across ranks (see :func:`vocab_parallel_token_logprobs`).
        lora: ``(lora_A [r, H], lora_B_shard [V_k, r], scaling)``: a LoRA adapter on the head,
            ``lora_A`` replicated, ``lora_B`` sharded like ``weight_shard`` (see ``linear_logprobs``).
            Every rank passes an adapter (or none) alike; ``grad_lora_A`` is all-reduced (SUM) like
            ``grad_hidden``, ``grad_lora_B`` stays local.
        batch_invariant: each row's logp, entropy and ``grad_hidden`` row bitwise independent of the
            other rows, the batch layout, ``chunk_size`` / ``vocab_block_size`` and whether gradients
            are on: ``linear_logprobs``'s fixed plan on each shard (rows padded to whole tiles), the
            shards' sums added in rank order (module docstring). ``torch`` / ``triton``, ``lora=`` too.
        support: the GLOBAL packed kept-token words, as :func:`vocab_parallel_token_logprobs`.
        top_k: each row's ``top_k`` largest transformed logits over the GLOBAL vocabulary, ties to
            the lowest global ids (as ``linear_logprobs(top_k=)``): each rank streams its shard's
            candidates over its vocabulary blocks (one extra GEMM pass, ``_lmhead_engine.head_top_k_candidates``),
            then as :func:`vocab_parallel_token_logprobs`'s ``top_k``. Not with ``lora=``.
        grad_hidden: ``"reduced"`` (default): ``hidden`` gets the full gradient, all-reduced.
            ``"partial"``: ``hidden`` gets this rank's term ``dz_k @ W_k`` only, no communication in
            the backward (``grad_lora_A`` is still all-reduced): for a caller that reduces it itself,
            as Megatron's column-parallel linear does (``alignkernels.integrations.verl.linear_cross_entropy``).
            The same value on every rank.

    Returns:
        ``logp`` or ``(logp, entropy)`` (fp32; fp64 for fp64 inputs; shape of ``labels``), the
        same on every rank. Gradients: ``weight_shard``/``bias_shard`` get their own slice
        (local), ``hidden`` gets the full gradient (all-reduced SUM over the group in fp32:
        ``N_valid x H`` numbers per backward -- the only O(N·H) communication), or with
        ``grad_hidden="partial"`` this rank's term of it.
    """
    _group_size(process_group)

    def validate():
        tr, wide = validate_head(hidden, weight_shard, labels, bias_shard, temperature, logit_scale, softcap,
                                 weight_name="weight_shard")  # fmt: skip
        _check_vocab_args(vocab_start, vocab_size, weight_shard.shape[0])
        cs = check_positive_int("chunk_size", chunk_size)
        vb = check_positive_int("vocab_block_size", vocab_block_size)
        if labels_checking_enabled(check_labels):
            check_label_range(wide, vocab_size, ignore_index)
        adapter = validate_lora(lora, hidden, weight_shard, weight_name="weight_shard")
        head_precision_row(head_precision)
        check_batch_invariant(batch_invariant)
        kept = _global_support(support, top_k, wide, vocab_size, hidden.device, check_labels, ignore_index)
        if kept is not None and kept.top_k is not None and adapter is not None:
            raise ValueError("top_k= is not supported with lora= (pass the kept tokens as support=)")
        impl = VOCAB_PARALLEL_LINEAR_LOGPROBS.resolve(backend, hidden.device, hidden.dtype)
        return tr, impl, cs, vb, wide, adapter, kept, _reduce_grad_hidden(grad_hidden)

    shard = weight_shard.shape[0] if isinstance(weight_shard, torch.Tensor) and weight_shard.dim() else 0
    requires_grad = isinstance(hidden, torch.Tensor) and hidden.requires_grad
    lora_a = lora[0] if isinstance(lora, (tuple, list)) and lora else None
    if isinstance(lora_a, torch.Tensor):  # the grad_lora_A all-reduce needs every rank: agree on it too
        requires_grad = int(requires_grad) + 2 + 4 * int(lora_a.requires_grad)
    requires_grad = int(requires_grad) + 8 * int(isinstance(grad_hidden, str) and grad_hidden == "partial")
    tr, impl, cs, vb, wide_labels, adapter, kept, reduce_grad_hidden = _run_checked(
        validate, process_group, check_shards, (hidden, weight_shard, labels), vocab_start, shard, vocab_size, labels,
        requires_grad,
    )  # fmt: skip
    compact = compact_rows(hidden, wide_labels, ignore_index)  # host sync; same rows on every rank
    local_labels, owned = _local_labels(compact.labels, vocab_start, shard, int(ignore_index))
    fold = FOLDS[impl]
    rows = compact.hidden
    n = compact.labels.shape[0]
    if batch_invariant:  # one tile shape on every shard: the rows padded to whole tiles (owned nowhere, dropped)
        plan = batch_invariant_plan(fold, hidden.device, shard, head_precision)
        rows, local_labels, owned = (pad_rows(x, plan.chunk_rows, fill) for x, fill in
                                     ((rows, 0), (local_labels, 0), (owned, False)))  # fmt: skip
    else:
        plan = make_plan(fold, hidden.device, compact.labels.numel(), shard, cs, vb, head_precision)
    if kept is not None and kept.top_k is not None:  # the kept set of the compact rows, formed here
        local = head_top_k_candidates(rows, weight_shard, bias_shard, tr, plan, kept.top_k, vocab_start)
        kept = _top_k_support(TopK(local.values[:n], local.ids[:n]), kept, vocab_size, process_group)
        if kept.check:  # the same verdict on every rank (the same words everywhere)
            in_set = compact.expand(label_bits(kept.bits, compact.labels.clamp(0, vocab_size - 1)))
            check_labels_kept(in_set.reshape(-1), wide_labels.reshape(-1) != ignore_index, kept.shape)
        local_support = _shard_support(kept, vocab_start, shard)
    else:
        local_support = _shard_support(kept, vocab_start, shard, compact.rows)
    if batch_invariant and local_support is not None:  # padded rows keep every token
        local_support = local_support._replace(bits=pad_rows(local_support.bits, plan.chunk_rows, -1))
    logp, entropy = VocabParallelLinearLogprobsFunction.apply(
        rows, weight_shard, bias_shard.contiguous() if bias_shard is not None else None,
        local_labels.contiguous(), owned, tr, plan, fold, bool(return_entropy), process_group,
        *(adapter if adapter is not None else (None, None, None)), local_support.bits if local_support else None,
        reduce_grad_hidden,
    )  # fmt: skip
    logp, entropy = logp[:n], entropy[:n]
    return (compact.expand(logp), compact.expand(entropy)) if return_entropy else compact.expand(logp)


# --------------------------------------------------------------------------------------------
# FSDP2: a DTensor lm_head gathered once per call
# --------------------------------------------------------------------------------------------
def gather_lm_head(weight: torch.Tensor, bias: torch.Tensor | None = None, *, grad_reduce: str | None = "avg"):
    """Return ``(weight, bias)`` as plain tensors, all-gathering a DTensor (an FSDP2 ``Shard(0)``
    parameter, or any DTensor placement) once with ``full_tensor()``, so the chunked
    ``linear_logprobs`` slices a plain tensor instead of issuing DTensor ops (and gathers) per
    chunk. Plain tensors pass through untouched (inside an FSDP2 module's forward the parameters
    are already unsharded plain tensors and FSDP2 reduces their gradients itself).

    ``grad_reduce`` says how the gradient of the gathered tensor returns to the DTensor, i.e. what
    the ranks' gradients mean:
    - ``"avg"`` (default) / ``"sum"``: data parallel (every rank has its own batch): the gradient is
      reduce-scattered (``Partial(avg|sum)`` -> the DTensor's placements), averaged like FSDP2's
      and DDP's default or summed. One all-gather forward, one reduce-scatter backward.
    - ``None``: every rank computed the same loss on the same data; each rank keeps its own slice
      of its (identical) gradient, no communication (``full_tensor()``'s default).
    """
    if grad_reduce not in ("avg", "sum", None):
        raise ValueError(f"grad_reduce must be 'avg', 'sum' or None, got {grad_reduce!r}")
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # pragma: no cover - torch without DTensor
        return weight, bias

    def gather(t):
        if not isinstance(t, DTensor):
            return t
        placements = None if grad_reduce is None else [Partial(grad_reduce)] * t.device_mesh.ndim
        return t.full_tensor(grad_placements=placements)

    return gather(weight), gather(bias)
