"""``linear_logprobs``: per-token log-prob of the label (and entropy, and TRL's extra statistics)
straight from hidden states and the lm_head weight, without ever materialising ``[N, V]`` logits.

The algorithm, its memory model and numerics live in the lm-head engine
(``alignkernels/ops/_lmhead_engine.py``): ignored rows compacted away, ``[chunk, block]`` tiles of
cuBLAS GEMMs folded into centred softmax statistics by a Triton or a PyTorch fold, backward walking
the same tiles into three gradient GEMMs. This module is the public op: validation, dispatch
(``LINEAR_LOGPROBS``) and a thin autograd Function.

Backends: ``triton`` (matmul tiles + the kernels in ``alignkernels.kernels.linear_logprobs``; CUDA
tensors, or CPU tensors with ``TRITON_INTERPRET=1``), ``torch`` (the same tiles folded with PyTorch
ops; CPU, fp64, anywhere), ``reference`` (materialised logits, autograd through ``log_softmax``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._utils import (
    OpBackends,
    check_batch_invariant,
    check_label_range,
    labels_checking_enabled,
    refuse_double_backward,
)
from ..reference import linear_logprobs_reference, linear_logprobs_stats_reference
from ._lmhead_engine import (
    FOLDS,
    batch_invariant_plan,
    check_positive_int,
    compact_rows,
    head_backward,
    head_forward,
    head_precision as check_head_precision,
    head_top_k,
    make_plan,
    pad_rows,
    validate_head,
)
from ._lora import LoraHead, effective_weight, validate_lora
from ._softmax_torch import RowStats
from ._support import check_labels_kept, label_bits, validate_support
from .vocab_parallel import vocab_parallel_linear_logprobs

LINEAR_LOGPROBS = OpBackends("linear_logprobs", ("triton", "torch", "reference"))


class LinearLogprobsOutput(NamedTuple):
    """Per-token outputs of ``linear_logprobs(..., return_stats=True)``, all of ``labels.shape``.

    ``logp`` and ``entropy`` are differentiable; the rest are not. Ignored positions hold 0
    (``False`` for ``is_top1``). Definitions match ``trl.kernels.ChunkedLogProbFunction``."""

    logp: torch.Tensor  # log p(label)
    entropy: torch.Tensor  # -Σ p log p
    log_sum_sq_probs: torch.Tensor  # log Σ p²
    mean_logit: torch.Tensor  # Σ_v z_v / V (transformed logits, temperature included)
    is_top1: torch.Tensor  # bool: the label is the (first) argmax
    lse: torch.Tensor  # log Σ e^z


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd over the compact (valid-only) rows. Inputs: ``hidden [n, H]``, ``weight [V, H]``,
    ``bias [V] | None``, ``labels [n]`` int64 in ``[0, V)``. Outputs ``(logp, entropy,
    log_sum_sq_probs | None, mean_logit | None, is_top1 | None, lse)``; saves the inputs plus the
    row state ``(row_max, log_sum, entropy)``. Optional trailing inputs ``lora_A [r, H], lora_B [V, r],
    lora_scaling``: the LoRA adapter of the head (``ops/_lora.py``), differentiable too."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tr, plan, fold, want_stats, lora_A=None, lora_B=None,
                lora_scaling=None, support=None):  # fmt: skip
        ctx.set_materialize_grads(False)
        lora = LoraHead(lora_A, lora_B, lora_scaling) if lora_A is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            out = head_forward(hidden, weight, bias, labels, tr, plan, fold, want_stats, lora=lora, support=support)
        ctx.save_for_backward(hidden, weight, bias, labels, lora_A, lora_B, support, *out.stats)
        ctx.tr, ctx.plan, ctx.fold, ctx.lora_scaling = tr, plan, fold, lora_scaling
        extra = out.extra if out.extra is not None else (None, None, None)
        lse = out.stats.row_max + out.stats.log_sum
        ctx.mark_non_differentiable(lse, *(x for x in extra if x is not None))
        return out.logp, out.stats.entropy.clone(), *extra, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        refuse_double_backward("linear_logprobs", ctx.fold.NAME)
        hidden, weight, bias, labels, lora_A, lora_B, support, *stats = ctx.saved_tensors
        lora = LoraHead(lora_A, lora_B, ctx.lora_scaling) if lora_A is not None else None
        needs = tuple(ctx.needs_input_grad[:3]) + (tuple(ctx.needs_input_grad[8:10]) if lora is not None else ())
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return (None,) * 12
        cd = stats[0].dtype
        g_logp = grad_logp.to(cd).contiguous() if grad_logp is not None else None
        g_entropy = grad_entropy.to(cd).contiguous() if grad_entropy is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight, grad_bias, *grad_lora = head_backward(
                hidden, weight, bias, labels, RowStats(*stats), g_logp, g_entropy, ctx.tr, ctx.plan, ctx.fold, needs,
                lora=lora, support=support,
            )  # fmt: skip
        grad_lora_A, grad_lora_B = grad_lora if grad_lora else (None, None)
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None, None, None, None, None, grad_lora_A, grad_lora_B, None, None,
        )  # fmt: skip


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_stats: bool = False,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    backend: str = "auto",
    check_labels: bool | None = None,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    lora=None,
    head_precision: str = "input",
    batch_invariant: bool = False,
    support: torch.Tensor | None = None,
    top_k: int | None = None,
):
    """Log-probability of each label under ``softmax(z)``, ``z = transform(hidden @ weight.T + bias)``,
    computed tile by tile: the ``[N, V]`` logits never exist.

    The logit transform is, in this order (``alignkernels.reference.transform_logits``, TRL's
    ``ChunkedLogProbFunction`` order): ``z = logit_scale * (hidden @ weight.T + bias)``; if
    ``softcap``: ``z = softcap * tanh(z / softcap)`` (Gemma); ``z = z / temperature``.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 hidden states (float64 on the torch and
            reference backends), e.g. a model's last hidden state shifted to align with labels.
        weight: ``[V, H]`` lm_head weight, same dtype and device as ``hidden``.
        labels: ``[...]`` = ``hidden.shape[:-1]``, int32 or int64, each in ``[0, V)`` or equal to
            ``ignore_index``.
        bias: optional ``[V]`` lm_head bias (weight's dtype).
        temperature: divides the (scaled, soft-capped) logits; > 0.
        logit_scale: multiplies the logits first (Cohere-style ``logit_scale``).
        softcap: Gemma's final logit soft-capping ``s·tanh(z/s)``; ``None`` disables it.
        ignore_index: label value marking positions to skip. Those rows are dropped before any
            matmul (no FLOPs), get 0 in every output and receive zero gradient.
        return_entropy: also return the entropy ``-Σ p log p`` per position.
        return_stats: return a :class:`LinearLogprobsOutput` with ``logp``, ``entropy``,
            ``log_sum_sq_probs`` (log Σp²), ``mean_logit`` (Σz/V), ``is_top1`` (label is the first
            argmax) and ``lse``, all computed in the same pass (TRL's definitions).
        chunk_size: token rows per tile (default 4096 on GPU, 256 on CPU).
        vocab_block_size: vocabulary entries per tile (default: fills a ~256 MB fp32 tile on GPU,
            ~16 MB on CPU, multiple of 128).
        backend: ``"auto"`` (Triton kernels + cuBLAS tiles on CUDA, chunked PyTorch elsewhere;
            ``ALIGNKERNELS_BACKEND`` overrides), ``"triton"``, ``"torch"`` or ``"reference"``
            (materialised logits). There is no ``"cuda"`` backend for this GEMM-bound op (asking
            for it is a ``ValueError``; ``"triton"`` is the cuBLAS-tile path).
        check_labels: verify every label is in range (one reduction + one host sync). ``None``
            follows ``ALIGNKERNELS_CHECK_LABELS`` (on unless ``0``).
        process_group, vocab_start, vocab_size: vocab-parallel lm_head (tensor parallel): this
            rank holds rows ``[vocab_start, vocab_start + weight.shape[0])`` of a ``[vocab_size, H]``
            head (``bias`` its slice); labels are global ids. Two O(N) all-reduces forward, local
            backward plus one ``grad_hidden`` all-reduce. See ``alignkernels.ops.vocab_parallel``.
        lora: ``(lora_A [r, H], lora_B [V, r], scaling)``, a LoRA adapter on the head (PEFT's
            ``lora_A.weight``, ``lora_B.weight``, ``scaling``): the raw logits become
            ``hidden @ weight.T + scaling * (hidden @ lora_A.T) @ lora_B.T (+ bias)`` before the
            transform, fused in the same tiles (one thin extra GEMM per tile; ``ops/_lora.py``).
            Adapter tensors have the weight's dtype and device; ``scaling`` is a finite number.
            ``lora_A`` and ``lora_B`` get gradients; a frozen ``weight`` (``requires_grad=False``)
            costs no weight-gradient GEMM. With ``process_group=``, ``lora_B`` is this rank's
            ``[V_k, r]`` shard (rows matching ``weight``'s) and ``lora_A`` is replicated.
        head_precision: the GEMMs' operands (``_lmhead_engine.HeadPrecision``): ``"input"``
            (their dtype on CUDA, fp32 accumulation and output), ``"fp32"`` (half operands widened
            to fp32 block by block -- never a full fp32 copy of the weight -- and IEEE fp32 GEMMs:
            the numbers of an fp32 lm-head, vLLM's ``head_dtype=float32``), ``"tf32"`` (fp32
            operands on TF32 tensor cores on CUDA; on the CPU, which has no TF32, exactly
            ``"fp32"``). On the CPU ``"input"`` widens too (no mixed-precision GEMM there), so all
            three give the same numbers. ``reference`` always widens (materialised fp32 logits).
        batch_invariant: each row's logp, entropy (and statistics) and its ``grad_hidden`` row are
            bitwise independent of the other rows, the batch size and layout (padded or packed),
            ``chunk_size`` / ``vocab_block_size`` and whether gradients are on: a fixed plan
            (``_lmhead_engine.batch_invariant_plan``: 256 rows x 16384 vocab tiles on CPU, 1024 rows
            on CUDA; ``chunk_size`` / ``vocab_block_size`` are then not used), the valid rows padded
            to a multiple of the tile rows, so every GEMM (cuBLAS on CUDA) and every fold runs at one
            shape and merges the vocab blocks in one order. Costs at most one tile of padded rows per
            call (FLOPs ``2·ceil(n/256)·256·H·V`` forward on CPU). ``torch`` and ``triton`` only, ``reference``
            refuses it (``ValueError``); with ``lora=`` the adapter's thin GEMMs run per tile of the
            padded rows too (``ops/_lora.py``); with ``process_group=`` the shards' sums are
            added in rank order (``ops/vocab_parallel.py``). Without it results are
            deterministic run to run (same inputs and shapes, same bits) but a row's last bits may
            change with the batch around it.
        support: the sampler's kept tokens, as ``token_logprobs(support=)`` (packed int32 bitmask
            ``labels.shape + (ceil(V/32),)``): logp and entropy renormalised over the kept set, each
            tile's logits outside it set to −inf (``ops/_support.py``; no ``[N, V]`` mask). A valid
            label outside the set is a ``ValueError`` (``check_labels=False``: −inf; a row with no kept
            token: logp −inf, entropy 0, gradient 0). ``torch`` and
            ``triton`` backends (the Triton fold reads the packed words per tile), without
            ``return_stats`` (``ValueError``); with ``process_group=`` the global words, each rank
            cutting its slice (``ops/vocab_parallel.py``).
        top_k: form the kept set in the trainer: each row's ``top_k`` largest logits, ties at the
            ``k``-th value to the lowest token ids (as ``token_logprobs(top_k=)``), streamed with a
            running top-k per row over the vocabulary blocks (one extra forward GEMM pass; the words,
            ``V/32`` per row, are kept for the backward). Not with ``lora=``. With ``process_group=``
            the same global set: each shard's candidates, one all-gather (``ops/vocab_parallel.py``).

    Returns:
        ``logp`` (fp32, fp64 for fp64 inputs; shape of ``labels``), or ``(logp, entropy)`` with
        ``return_entropy``, or a :class:`LinearLogprobsOutput` with ``return_stats``.
        ``logp`` and ``entropy`` are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``
        for any upstream gradients; ``grad_weight`` is accumulated in fp32 and returned in the
        weight's dtype.

    Memory: besides the inputs and their gradients, ``O(chunk x block)`` for one logits tile and
    ``O(valid rows x H)`` fp32 for the hidden-gradient accumulator, whatever ``V``. One host sync
    to find the valid rows (and one for the label check).
    """
    check_batch_invariant(batch_invariant)
    if process_group is not None:
        if vocab_start is None or vocab_size is None:
            raise ValueError("process_group= (vocab-parallel lm_head) needs vocab_start= and vocab_size= (global V)")
        if return_stats:
            raise ValueError("return_stats=True is not supported with process_group=")
        return vocab_parallel_linear_logprobs(
            hidden, weight, labels, vocab_start=vocab_start, vocab_size=vocab_size, process_group=process_group,
            bias_shard=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size,
            vocab_block_size=vocab_block_size, backend=backend, check_labels=check_labels, lora=lora,
            head_precision=head_precision, batch_invariant=batch_invariant, support=support, top_k=top_k,
        )  # fmt: skip
    precision = check_head_precision(head_precision)
    tr, wide_labels = validate_head(hidden, weight, labels, bias, temperature, logit_scale, softcap)
    adapter = validate_lora(lora, hidden, weight)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    vocab_block_size = check_positive_int("vocab_block_size", vocab_block_size)
    backend = LINEAR_LOGPROBS.resolve(backend, hidden.device, hidden.dtype)
    vocab = weight.shape[0]
    if labels_checking_enabled(check_labels):
        check_label_range(wide_labels, vocab, ignore_index)
    kept = validate_support(support, top_k, wide_labels.shape, vocab, hidden.device,
                            labels_checking_enabled(check_labels))  # fmt: skip
    if kept is not None and (backend not in FOLDS or return_stats):
        raise ValueError(f"support= / top_k= are implemented on the backends {tuple(FOLDS)} without return_stats, "
                         f"got backend={backend!r}" + (" with return_stats=True" if return_stats else ""))  # fmt: skip
    if kept is not None and kept.top_k is not None and adapter is not None:
        raise ValueError("top_k= is not supported with lora= (pass the kept tokens as support=)")
    if kept is not None and kept.check and kept.bits is not None:
        flat = wide_labels.reshape(-1)
        check_labels_kept(label_bits(kept.bits, flat.clamp(0, vocab - 1)), flat != ignore_index, kept.shape)
    if batch_invariant and backend not in FOLDS:
        raise ValueError(f"batch_invariant=True is implemented on the backends ('torch', 'triton'), "
                         f"got backend={backend!r}")  # fmt: skip

    if backend == "reference":
        kwargs = dict(bias=bias, temperature=tr.temperature, logit_scale=tr.logit_scale, softcap=tr.softcap,
                      ignore_index=ignore_index)  # fmt: skip
        full_weight = effective_weight(weight, adapter)  # W + s·B·A: the materialised adapted head
        with precision.gemms(hidden.device):  # the reference widens its operands: only the TF32 switch applies
            if return_stats:
                return LinearLogprobsOutput(*linear_logprobs_stats_reference(hidden, full_weight, wide_labels, **kwargs))
            return linear_logprobs_reference(hidden, full_weight, wide_labels, return_entropy=return_entropy, **kwargs)

    fold = FOLDS[backend]
    compact = compact_rows(hidden, wide_labels, ignore_index)
    rows, row_labels = compact.hidden, compact.labels
    bits = None
    if kept is not None and kept.bits is not None:
        bits = kept.bits if compact.rows is None else kept.bits.index_select(0, compact.rows)
    if batch_invariant:  # one tile shape: the rows padded to whole tiles (label 0, results dropped)
        plan = batch_invariant_plan(fold, hidden.device, vocab, precision.name)
        rows, row_labels = pad_rows(rows, plan.chunk_rows), pad_rows(row_labels, plan.chunk_rows)
        bits = pad_rows(bits, plan.chunk_rows, -1) if bits is not None else None  # padded rows keep all
    else:
        plan = make_plan(fold, hidden.device, compact.labels.numel(), vocab, chunk_size, vocab_block_size,
                         precision.name)  # fmt: skip
    if kept is not None and kept.top_k is not None:  # the kept set formed here: one extra GEMM pass
        bits = head_top_k(rows, weight, bias, tr, plan, kept.top_k)
        if kept.check:
            in_set = compact.expand(label_bits(bits[: compact.labels.shape[0]], compact.labels))
            check_labels_kept(in_set.reshape(-1), wide_labels.reshape(-1) != ignore_index, kept.shape)
    outs = LinearLogprobsFunction.apply(
        rows, weight, bias.contiguous() if bias is not None else None, row_labels, tr, plan, fold,
        return_stats, *(adapter if adapter is not None else (None, None, None)), bits,
    )  # fmt: skip
    if rows is not compact.hidden:
        n = compact.labels.shape[0]
        outs = tuple(x[:n] if x is not None else None for x in outs)
    if return_stats:
        return LinearLogprobsOutput(*(compact.expand(x) for x in outs))
    if return_entropy:
        return compact.expand(outs[0]), compact.expand(outs[1])
    return compact.expand(outs[0])
