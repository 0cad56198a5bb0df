"""``token_logprobs``: per-token log-prob of the label and entropy, from logits.

Backends (all return the same numbers; tests prove it):
- ``triton``: ``alignkernels.kernels.token_logprobs`` — one read of the logits forward, one read
  plus one gradient write backward.
- ``cuda``: the hand-written kernels in ``csrc/`` (``alignkernels._C``), same contract.
- ``torch``: the same algorithm in PyTorch over chunks of rows (CPU, fp64, anywhere), so peak
  extra memory is O(chunk x V), not O(N x V).
- ``reference``: eager ``log_softmax`` + gather (``alignkernels.reference``), autograd through it.
"""
from __future__ import annotations

import torch

from .._utils import (
    OpBackends,
    check_batch_invariant,
    check_label_range,
    check_same_device,
    check_temperature,
    check_tensor,
    labels_checking_enabled,
    refuse_double_backward,
    widen_labels,
)
from ..reference import token_logprobs_reference
from ._logits_engine import BATCH_INVARIANT_TOKEN_KERNELS, TOKEN_KERNELS
from ._softmax_torch import RowStats
from ._support import check_labels_kept, validate_support
from .vocab_parallel import vocab_parallel_token_logprobs

TOKEN_LOGPROBS = OpBackends("token_logprobs", ("triton", "cuda", "torch", "reference"))


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper shared by the triton, cuda and torch backends.

    Saves the logits (already alive for the caller), the labels and the row state
    ``(row_max, log_sum, entropy)``; backward recomputes p from it in one pass."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, backend, kernels):
        # fp32 sums whatever autocast is active (as LinearLogprobsFunction): the torch backend's
        # torch.linalg.vecdot would run in bf16 under CPU autocast (entropy ~1e-2 off)
        with torch.autocast(logits.device.type, enabled=False):
            logp, stats = kernels.forward(logits, labels, temperature, ignore_index)
        ctx.save_for_backward(logits, labels, *stats)
        ctx.temperature, ctx.ignore_index, ctx.backend, ctx.kernels = temperature, ignore_index, backend, kernels
        ctx.set_materialize_grads(False)
        return logp, torch.where(labels != ignore_index, stats.entropy, 0.0)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("token_logprobs", ctx.backend)
        if grad_logp is None and grad_entropy is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        logits, labels, *stats = ctx.saved_tensors
        grad_logp = grad_logp.contiguous() if grad_logp is not None else None
        grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
        with torch.autocast(logits.device.type, enabled=False):
            grad_logits = ctx.kernels.backward(
                logits, labels, RowStats(*stats), grad_logp, grad_entropy, ctx.temperature, ctx.ignore_index
            )
        return grad_logits, None, None, None, None, None


def _validate(logits, labels, temperature, check_labels, ignore_index):
    check_tensor("logits", logits, floating=True, ndim_min=1)
    labels = widen_labels("labels", labels)
    check_same_device(logits=logits, labels=labels)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    temperature = check_temperature(temperature)
    if labels_checking_enabled(check_labels):
        check_label_range(labels, logits.shape[-1], ignore_index)
    return temperature, labels


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    check_labels: bool | None = None,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    batch_invariant: bool = False,
    support: torch.Tensor | None = None,
    top_k: int | None = None,
):
    """Log-probability of each label under ``softmax(logits / temperature)``, and optionally the
    entropy of that distribution, without materialising the softmax.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 (float64 on the torch and reference
            backends). The last dimension must be contiguous; leading dimensions may be strided
            (``logits[:, :-1]`` is read in place by the kernels).
        labels: ``[...]`` = ``logits.shape[:-1]``, int32 or int64, each in ``[0, V)`` or equal to
            ``ignore_index``.
        temperature: divides the logits before the softmax (fused; > 0).
        ignore_index: label value marking positions to skip: their outputs are 0 and they receive
            zero gradient (the Triton kernel does not even read their logits in the forward).
        return_entropy: also return the entropy ``-Σ p log p`` per position.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere; overridden by the
            ``ALIGNKERNELS_BACKEND`` environment variable), ``"triton"``, ``"cuda"``, ``"torch"``
            or ``"reference"``.
        check_labels: verify every label is in range. Costs one fused comparison over ``labels``
            and one host-device sync per call. ``None`` (default) follows the environment variable
            ``ALIGNKERNELS_CHECK_LABELS`` (on unless set to ``0``). With the check off, an
            out-of-range label gives ``NaN`` for that position, never an out-of-bounds read.
        process_group, vocab_start, vocab_size: vocab-parallel logits (tensor parallel): this
            rank holds ``logits[..., vocab_start:vocab_start + logits.shape[-1]]`` of a global
            vocabulary of ``vocab_size``; labels are global ids. Two O(N) all-reduces give every
            rank the full log-prob and entropy; backward is local. See
            ``alignkernels.ops.vocab_parallel`` and ``docs/DISTRIBUTED.md``.
        batch_invariant: each row's logp, entropy and gradient row are bitwise independent of the
            other rows, the batch size and layout (padded or packed) and whether gradients are on
            (``torch``: every chunk padded to the row count fixed by ``V``; ``triton``: one program per row, block
            size fixed by ``V`` -- already invariant). ``reference`` and ``cuda`` refuse it
            (``ValueError``); with ``process_group=`` the shards' sums are added in rank order.
            Without it every backend is deterministic run to run (same inputs and shapes, same bits),
            but on ``torch`` a row may differ in the last bits when the batch around it changes.
        support: the sampler's kept tokens per row, a packed int32 bitmask of shape
            ``labels.shape + (ceil(V/32),)``: token ``v`` kept when bit ``v % 32`` (least significant
            first) of word ``v // 32`` is set (``alignkernels.ops._support.pack_bits`` packs a bool
            mask). logp and entropy are then those of the distribution renormalised over the kept
            set, differentiable (zero gradient outside it), streamed chunk by chunk (no ``[N, V]``
            mask). A valid label outside its row's set is a ``ValueError`` (``check_labels=False``:
            logp ``-inf``; a row with no kept token at all: logp ``-inf``, entropy 0, gradient 0).
            Every backend (``triton`` and ``cuda`` read the packed words tile by tile).
        top_k: form the kept set in the trainer: each row's ``top_k`` largest logits, ties at the
            ``k``-th value to the lowest token ids, then as ``support``. With ``process_group=`` the same
            global set: each shard's candidates, one all-gather (``ops/vocab_parallel.py``).

    Returns:
        ``logp`` (fp32, fp64 for fp64 logits; shape of ``labels``), or ``(logp, entropy)``.
        Differentiable w.r.t. ``logits`` through both outputs.
    """
    check_batch_invariant(batch_invariant)
    if process_group is not None:
        if vocab_start is None or vocab_size is None:
            raise ValueError("process_group= (vocab-parallel logits) needs vocab_start= and vocab_size= (global V)")
        return vocab_parallel_token_logprobs(
            logits, labels, vocab_start=vocab_start, vocab_size=vocab_size, process_group=process_group,
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy, backend=backend,
            check_labels=check_labels, batch_invariant=batch_invariant, support=support, top_k=top_k,
        )  # fmt: skip
    temperature, wide_labels = _validate(logits, labels, temperature, check_labels, ignore_index)
    kept = validate_support(support, top_k, wide_labels.shape, logits.shape[-1], logits.device,
                            labels_checking_enabled(check_labels))  # fmt: skip
    backend = TOKEN_LOGPROBS.resolve(backend, logits.device, logits.dtype)
    kernels = TOKEN_KERNELS
    if batch_invariant:
        kernels = BATCH_INVARIANT_TOKEN_KERNELS
        if backend not in kernels:
            raise ValueError(f"batch_invariant=True is implemented on the backends {tuple(kernels)}, "
                             f"got backend={backend!r}")  # fmt: skip
    if backend == "reference":
        if kept is not None:  # the eager baseline: the whole [N, V] mask, logits outside it -inf
            mask = kept.kept(logits.reshape(-1, logits.shape[-1]), 0, wide_labels.numel()).view(logits.shape)
            if kept.check:
                valid = (wide_labels != ignore_index).reshape(-1)
                at_label = mask.reshape(-1, logits.shape[-1]).gather(1, wide_labels.reshape(-1, 1).clamp(min=0))
                check_labels_kept(at_label.squeeze(1), valid, kept.shape)
            logits = logits.masked_fill(~mask, float("-inf"))
        return token_logprobs_reference(
            logits, wide_labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    flat_labels = wide_labels.reshape(-1).contiguous()
    row_kernels = kernels[backend].with_support(kept) if kept is not None else kernels[backend]
    logp, entropy = TokenLogprobsFunction.apply(logits, flat_labels, temperature, int(ignore_index), backend,
                                                row_kernels)  # fmt: skip
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
