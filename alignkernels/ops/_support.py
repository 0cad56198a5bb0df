"""The sampler's kept tokens: ``support=`` / ``top_k=`` on ``token_logprobs`` (every backend: the torch
chunks' mask, the Triton and CUDA kernels reading the packed words per tile) and on ``linear_logprobs``
(torch and Triton: the lm-head engine hands each tile's words to the fold, :class:`TileBits`; ``top_k``
streamed, :func:`merge_top_k`); ``support=`` / ``top_k=`` on the vocab-parallel forms (:func:`shard_words`;
``top_k``: each shard's candidates, :func:`shard_top_k`, the global pick, :func:`pick_top_k`).

With top-k / top-p sampling the sampler draws from the distribution renormalised over the tokens it
kept; the trainer's log-prob must be taken over the same set, ``logp = z_y − log Σ_{v kept} e^{z_v}``
(and the entropy of that renormalised distribution), or the importance ratio is biased.

Algorithm: per chunk of rows, a ``[rows, V]`` bool mask of the kept tokens -- unpacked from the
packed bitmask (token ``v`` kept when bit ``v % 32``, least significant first, of int32 word
``v // 32`` is set; :func:`unpack_bits`), or the row's ``top_k`` largest logits (:func:`first_k_largest`:
exactly ``k``, ties at the ``k``-th value to the lowest token ids, on every backend and in the lm-head's
streaming top-k, :func:`merge_top_k`) -- and the logits outside it set to ``−inf`` before the softmax
statistics. The engines' ``−inf`` handling then gives exactly ``p = 0`` there, ``0·log 0 := 0`` in the entropy and a
zero gradient: the renormalisation costs no extra formula. The backward recomputes the same mask
(``linear_logprobs(top_k=)``: reuses the words formed in the forward).

Memory: one ``[chunk, V]`` bool mask per chunk of the torch path (one ``[chunk, block]`` mask per
lm-head tile); the Triton and CUDA kernels read the packed words in place (``top_k``: packed once,
``V/32`` words per row, :func:`top_k_bits`); the lm-head's ``top_k`` keeps ``[chunk, k]`` (values,
ids) per chunk across the vocabulary blocks; nothing of ``[N, V]``.
Numerics: those of the engine on the masked logits (fp32 within ~1e-6 of fp64).
A valid label outside its row's kept set is a ``ValueError`` naming the position (one host sync;
``check_labels=False`` skips it and that row's logp is ``−inf``).
A row with no kept token at all (so its label is outside; ``check_labels=False``): the renormalised
distribution does not exist; every backend gives its limit, the value of any label outside the set --
logp ``−inf``, entropy 0, every gradient exactly 0 (the label's column included), no NaN. The softmax
cores own it (a row with no mass, ``log_sum = −inf``: ``ops/_softmax_torch.py`` ``log_prob`` /
``grad_from_centred_``, ``kernels/_softmax.py`` ``finalise`` / ``log_prob`` / ``grad_centred``,
``csrc/softmax.cuh``, ``alignkernels/reference.py`` ``token_logprobs_reference``), so a row of all
``−inf`` logits gets the same; vocab-parallel: only a row empty on every shard (one empty shard contributes
no mass).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Support(NamedTuple):
    """A validated kept set: ``bits`` ``[N, ceil(V/32)]`` int32 over the flattened rows, or ``top_k``."""

    bits: torch.Tensor | None
    top_k: int | None
    check: bool  # raise on a valid label outside the kept set
    shape: tuple  # the labels' shape (to name a position)

    def kept(self, rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The ``[r1 - r0, V]`` bool mask of rows ``r0:r1`` whose logits are ``rows``."""
        if self.bits is not None:
            return unpack_bits(self.bits[r0:r1], rows.shape[-1])
        return first_k_largest(rows, self.top_k)

    def row_bits(self, logits: torch.Tensor) -> torch.Tensor:
        """The ``[N, ceil(V/32)]`` int32 words (last dim contiguous) of every row of ``logits [..., V]``:
        the given bits, or the ``top_k`` set packed (:func:`top_k_bits`) -- what the Triton kernels read."""
        if self.bits is None:
            return top_k_bits(logits, self.top_k)
        return self.bits if self.bits.stride(-1) == 1 else self.bits.contiguous()


_SHIFTS: dict = {}


def unpack_bits(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, W]`` int32 words -> ``[rows, vocab]`` bool, bit ``v % 32`` (LSB first) of word ``v // 32``."""
    key = str(words.device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words[:, :, None] >> _SHIFTS[key]) & 1  # arithmetic shift: the sign bit is masked off by & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].bool()


class TileBits(NamedTuple):
    """The kept set of one lm-head tile, as the folds take it (``ops/_lmhead_engine.py``): ``words``
    ``[rows, ceil(V/32)]`` int32 of the tile's rows (the whole vocabulary's words), columns ``v0:v1``.
    The torch fold unpacks :meth:`mask`; the Triton fold hands ``words`` to its kernels, which read
    the words of the columns they touch (``kernels/_softmax.py`` ``kept_logits``)."""

    words: torch.Tensor
    v0: int
    v1: int

    def mask(self) -> torch.Tensor:
        """The ``[rows, v1 - v0]`` bool mask, unpacked from the words that cover the columns only."""
        w0, w1 = self.v0 // 32, -(-self.v1 // 32)
        cols = unpack_bits(self.words[:, w0:w1], (w1 - w0) * 32)
        return cols[:, self.v0 - 32 * w0 : self.v1 - 32 * w0]


def label_bits(bits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each row's label (``[n]`` int64, clamped into range by the caller) is kept."""
    words = bits.gather(1, (labels // 32)[:, None]).squeeze(1)
    return ((words >> (labels % 32).to(torch.int32)) & 1).bool()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack_bits`: ``[..., V]`` bool -> ``[..., ceil(V/32)]`` int32 (e.g. a
    sampler's kept mask into ``support=``)."""
    V = mask.shape[-1]
    W = math.ceil(V / 32)
    padded = torch.zeros(*mask.shape[:-1], W * 32, dtype=torch.int64, device=mask.device)
    padded[..., :V] = mask.long()
    words = (padded.view(*mask.shape[:-1], W, 32) << torch.arange(32, device=mask.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def first_k_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, cols]`` bool: each row's ``k`` largest values, ties at the ``k``-th value going to the
    first columns (the lowest token ids) -- exactly ``k`` per row, whatever ``torch.topk`` does with ties."""
    kth = values.topk(k, dim=1).values[:, -1:]
    ties = values == kth
    room = k - (values > kth).sum(1, keepdim=True)
    return (values > kth) | (ties & (ties.cumsum(1) <= room))


def top_k_bits(logits: torch.Tensor, k: int, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """Each row's ``k`` largest logits (:func:`first_k_largest`) packed as ``[rows, ceil(V/32)]`` int32
    words, ``chunk_elements // V`` rows at a time: nothing of ``[N, V]`` besides the ``V/32`` words per row."""
    V = logits.shape[-1]
    step = max(1, chunk_elements // V)
    words = [pack_bits(first_k_largest(rows[r : r + step], k))
             for rows in _row_views(logits) for r in range(0, rows.shape[0], step)]  # fmt: skip
    return torch.cat(words) if words else torch.zeros(0, math.ceil(V / 32), dtype=torch.int32, device=logits.device)


def shard_top_k(logits: torch.Tensor, k: int, v0: int, chunk_elements: int = 1 << 22) -> "TopK":
    """Each row's ``min(k, V)`` largest logits of ``logits [..., V]`` (token ids ``v0 …``: a vocabulary
    shard) in the compute dtype, as (values, ids) ``[rows, min(k, V)]`` (:func:`merge_top_k`: ties to the
    lowest ids), ``chunk_elements // V`` rows at a time: the vocab-parallel ``top_k``'s local candidates."""
    V = logits.shape[-1]
    step = max(1, chunk_elements // V)
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    runs = [merge_top_k(None, rows[r : r + step].to(cd), v0, k)
            for rows in _row_views(logits) for r in range(0, rows.shape[0], step)]  # fmt: skip
    if not runs:
        empty = torch.zeros(0, min(k, V), device=logits.device)
        return TopK(empty.to(cd), empty.long())
    return TopK(torch.cat([t.values for t in runs]), torch.cat([t.ids for t in runs]))


def pick_top_k(values: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[rows, k]`` ids of each row's ``k`` best candidates ``values``/``ids`` ``[rows, m]`` (distinct
    ids in any order, ``m >= k``), ties at the ``k``-th value to the lowest ids: :func:`first_k_largest`
    on the candidates put in id order. Over the union of every shard's :func:`shard_top_k` this is the
    global :func:`first_k_largest` (a token among the row's ``k`` best is among its shard's ``k`` best)."""
    order = ids.argsort(dim=1, stable=True)
    ids = ids.gather(1, order)
    keep = first_k_largest(values.gather(1, order), k)
    return ids[keep].view(-1, k)


def _row_views(x: torch.Tensor):
    """``[rows, V]`` views covering ``x [..., V]`` in row order, without copying a strided input
    (``logits[:, :-1]``)."""
    if x.dim() <= 2 or x.is_contiguous():
        yield x.reshape(-1, x.shape[-1])
        return
    for sub in x.unbind(0):
        yield from _row_views(sub)


class TopK(NamedTuple):
    """The running ``k`` largest values of each row and their token ids (ascending among equal values),
    over the vocabulary blocks seen so far: the lm-head's streaming ``top_k`` (``[rows, <= k]``)."""

    values: torch.Tensor
    ids: torch.Tensor


def merge_top_k(run: TopK | None, values: torch.Tensor, v0: int, k: int) -> TopK:
    """Merge the block ``values [rows, cols]`` (token ids ``v0 …``, after every id in ``run``) into ``run``:
    the same set as :func:`first_k_largest` over the whole row (ties to the lowest ids), since the
    running entries come first and stay in id order."""
    ids = torch.arange(v0, v0 + values.shape[1], device=values.device).expand(values.shape[0], -1)
    if run is not None:
        values, ids = torch.cat((run.values, values), 1), torch.cat((run.ids, ids), 1)
    if values.shape[1] <= k:
        return TopK(values.clone(), ids.clone())
    keep = first_k_largest(values, k)
    return TopK(values[keep].view(-1, k), ids[keep].view(-1, k))


def ids_to_words(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, k]`` distinct token ids per row -> their ``[rows, ceil(V/32)]`` int32 words."""
    words = torch.zeros(ids.shape[0], math.ceil(vocab / 32), dtype=torch.int64, device=ids.device)
    words.scatter_add_(1, ids // 32, torch.ones_like(ids) << (ids % 32))  # distinct tokens, distinct bits: sum = OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def shard_words(bits: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """The words of the vocabulary slice ``[start, start + size)`` (a vocab-parallel shard) of the global
    words ``bits`` ``[rows, ceil(V/32)]``: bit ``j`` of the result is bit ``start + j`` of the input (a
    funnel shift of two consecutive words; ``[rows, ceil(size/32)]`` int32, bits past ``size`` clear)."""
    w0, r = divmod(start, 32)
    n = -(-size // 32)
    u = torch.cat((bits.long() & 0xFFFFFFFF, bits.new_zeros(bits.shape[0], 1, dtype=torch.int64)), 1)  # + a guard word
    words = (u[:, w0 : w0 + n] >> r) | ((u[:, w0 + 1 : w0 + n + 1] << (32 - r)) & 0xFFFFFFFF)
    words[:, -1] &= (1 << (size - 32 * (n - 1))) - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def validate_support(support, top_k, labels_shape, vocab: int, device, check: bool) -> Support | None:
    """``support=`` / ``top_k=`` checked by name (TE / VE); None when neither is given."""
    if support is None and top_k is None:
        return None
    if support is not None and top_k is not None:
        raise ValueError("give support= (the sampler's kept tokens) or top_k=, not both")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int, got {top_k!r}")
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be in [1, V={vocab}], got {top_k}")
        return Support(None, top_k, check, tuple(labels_shape))
    if not isinstance(support, torch.Tensor) or support.dtype != torch.int32:
        what = support.dtype if isinstance(support, torch.Tensor) else type(support).__name__
        raise TypeError(f"support must be an int32 tensor (packed bitmask [..., ceil(V/32)]), got {what}")
    want = (*labels_shape, math.ceil(vocab / 32))
    if tuple(support.shape) != want:
        raise ValueError(f"support must have shape labels.shape + (ceil(V/32),) = {want}, got {tuple(support.shape)}")
    if support.device != torch.device(device):
        raise ValueError(f"all tensors must be on the same device: support is on {support.device}, logits on {device}")
    return Support(support.reshape(-1, want[-1]), None, check, tuple(labels_shape))


def check_labels_kept(label_kept: torch.Tensor, relevant: torch.Tensor, shape) -> None:
    """``ValueError`` naming the first position whose (valid, in-range) label is not kept."""
    bad = relevant & ~label_kept
    if bool(bad.any().item()):
        flat = int(bad.nonzero()[0, 0])
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape))) if shape else ()
        raise ValueError(f"labels: the label at position {position} is outside its row's support (the sampler's "
                         "kept tokens: support= / top_k=); its log-prob under the renormalised distribution "
                         "is -inf (check_labels=False returns that)")  # fmt: skip
