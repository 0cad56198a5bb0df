"""Row kernels of the logits form (``token_logprobs`` and its vocab-parallel variant): one object per
backend with ``forward(logits, labels, temperature, ignore_index) -> (logp, RowStats)`` and
``backward(logits, labels, stats, grad_logp, grad_entropy, temperature, ignore_index) -> grad_logits``.

- ``triton``: ``alignkernels.kernels.token_logprobs`` -- one read of the logits forward, one read plus
  one gradient write backward.
- ``cuda``: the hand-written kernels in ``csrc/`` through ``alignkernels._cuda_backend`` (same contract).
- ``torch``: the same algorithm in PyTorch over chunks of rows, so peak extra memory is
  O(chunk x V), not O(N x V); the math is ``_softmax_torch``'s.

``batch_invariant=True`` uses :data:`BATCH_INVARIANT_TOKEN_KERNELS` (the torch chunks padded to one
shape; the Triton kernels as they are: one program per row). ``support=`` / ``top_k=``
(``ops/_support.py``) mask the torch path's chunks and the Triton kernels' tiles (the packed bits read
per tile): logits outside the kept set are −inf.

Every backend saves the centred row state ``RowStats(row_max, log_sum, entropy)`` and forms ``p``
and ``z - Σp·z`` relative to ``row_max`` (see ``kernels/_softmax.py`` for the derivation). The
backward of the state it is handed -- a shard's own or the merged global one (vocab parallel) --
is the gradient of that state's outputs.
"""
from __future__ import annotations

import torch

from .. import _cuda_backend
from .._utils import as_rows, output_dtype
from ..kernels._softmax import ROW_STATS
from ..kernels.token_logprobs import pick_config, token_logprobs_bwd_kernel, token_logprobs_fwd_kernel
from ._softmax_torch import RowStats, centred, fold_block, grad_from_centred_, log_prob
from ._support import Support, check_labels_kept, label_bits

# Rows per chunk in the torch backend: ~4M elements of fp32 temporaries per chunk.
TORCH_CHUNK_ELEMENTS = 1 << 22


class PackedSupportKernels:
    """What the kernel launchers (Triton, CUDA) share for ``support`` (``ops/_support.py``): they hand the
    kernels each row's packed kept-token words (``Support.row_bits``: the caller's, or the ``top_k`` set
    packed once), checked against the labels first, and the kernels mask the logits outside them to −inf."""

    def __init__(self, support: Support | None = None):
        self.support = support

    def with_support(self, support: Support | None):
        return self if support is None else type(self)(support)

    def _bits(self, logits, labels, ignore_index):
        """``(bits [N, W] int32, has_support)``: the kept set's words (checked against the labels), or a
        never-read placeholder."""
        if self.support is None:
            return torch.zeros(1, 1, dtype=torch.int32, device=logits.device), 0
        bits = self.support.row_bits(logits)
        if self.support.check:
            in_range = (labels >= 0) & (labels < logits.shape[-1])
            kept = label_bits(bits, torch.where(in_range, labels, 0))
            check_labels_kept(kept, (labels != ignore_index) & in_range, self.support.shape)
        return bits, 1


class TritonTokenKernels(PackedSupportKernels):
    """``alignkernels.kernels.token_logprobs`` launchers."""

    def forward(self, logits, labels, temperature, ignore_index):
        rows, n_rows, rows_per_outer, stride_outer, stride_inner = as_rows(logits)
        logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        stats = torch.empty(len(ROW_STATS), n_rows, dtype=torch.float32, device=logits.device)
        if n_rows:
            bits, has_support = self._bits(logits, labels, ignore_index)
            block_v, num_warps = pick_config(logits.shape[-1])
            token_logprobs_fwd_kernel[(n_rows,)](
                rows, labels, logp, stats, bits, bits.stride(0), logits.shape[-1], rows_per_outer, stride_outer,
                stride_inner, 1.0 / temperature, ignore_index, HAS_SUPPORT=bool(has_support), BLOCK_V=block_v,
                num_warps=num_warps,
            )  # fmt: skip
        return logp, RowStats(*stats.unbind(0))

    def backward(self, logits, labels, stats: RowStats, grad_logp, grad_entropy, temperature, ignore_index):
        rows, n_rows, rows_per_outer, stride_outer, stride_inner = as_rows(logits)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if n_rows:
            saved = torch.stack(stats)  # ROW_STATS order (RowStats has the same fields)
            present = [g for g in (grad_logp, grad_entropy) if g is not None]
            grads = torch.stack([g.float() if g is not None else present[0].float() for g in (grad_logp, grad_entropy)])
            bits = self.support.row_bits(logits) if self.support is not None else saved.new_zeros(1, 1, dtype=torch.int32)
            block_v, num_warps = pick_config(logits.shape[-1])
            token_logprobs_bwd_kernel[(n_rows,)](
                rows, labels, saved, grads, grad_logits, bits, bits.stride(0), logits.shape[-1], rows_per_outer,
                stride_outer, stride_inner, 1.0 / temperature, ignore_index, HAS_SUPPORT=self.support is not None,
                HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
                BLOCK_V=block_v, num_warps=num_warps,
            )  # fmt: skip
        return grad_logits


def _row_chunks(logits, chunk_rows):
    """Yield ``(row_start, row_end, view[rows, V])`` covering the flattened rows without copying
    the (possibly strided, e.g. ``logits[:, :-1]``) input."""
    V = logits.shape[-1]
    lead = logits.reshape(-1, V) if logits.dim() <= 2 or logits.is_contiguous() else None
    if lead is not None:
        for r0 in range(0, lead.shape[0], chunk_rows):
            yield r0, min(r0 + chunk_rows, lead.shape[0]), lead[r0 : r0 + chunk_rows]
        return
    outer = logits.reshape(-1, logits.shape[-2], V) if logits.dim() > 3 else logits
    inner = outer.shape[1]
    for o in range(outer.shape[0]):
        for i0 in range(0, inner, chunk_rows):
            i1 = min(i0 + chunk_rows, inner)
            yield o * inner + i0, o * inner + i1, outer[o, i0:i1]


def _padded(x: torch.Tensor, rows: int | None, fill=0):
    """``x`` (rows first) padded with ``fill`` to ``rows`` rows (``rows`` None: ``x`` itself)."""
    if rows is None or x.shape[0] == rows:
        return x
    return torch.cat([x, torch.full((rows - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=x.device)])


class TorchTokenKernels:
    """The same algorithm in PyTorch over chunks of rows (``_softmax_torch`` holds the math).

    Chunks of ``TORCH_CHUNK_ELEMENTS // V`` rows, the last one shorter: results are deterministic run
    to run, but a row's bits may depend on the chunk shape it lands in (ATen may split a reduction
    differently for another number of rows). :class:`BatchInvariantTorchTokenKernels` pads every
    chunk (``PAD_CHUNKS``), so every ATen op sees one shape whatever the batch. With ``support``
    (``ops/_support.py``) each chunk's logits outside the kept set are ``−inf`` before the statistics
    and in the backward's recompute: the distribution renormalised over the kept tokens."""

    PAD_CHUNKS = False  # pad the last (shorter) chunk to the chunk's rows

    def __init__(self, support: Support | None = None):
        self.support = support

    def with_support(self, support: Support | None):
        return self if support is None else type(self)(support)

    def _chunk_rows(self, V):
        return max(1, TORCH_CHUNK_ELEMENTS // V)

    def _mask(self, y, n, r0, r1):
        """Logits of rows ``r0:r1`` (the first ``n`` of ``y``) outside the kept set -> −inf; returns
        the kept mask (None without ``support``)."""
        if self.support is None:
            return None
        kept = self.support.kept(y[:n], r0, r1)
        y[:n].masked_fill_(~kept, float("-inf"))
        return kept

    def forward(self, logits, labels, temperature, ignore_index):
        cd = output_dtype(logits.dtype)
        V = logits.shape[-1]
        n_rows = labels.numel()
        out = torch.zeros(4, n_rows, dtype=cd, device=logits.device)
        valid = labels != ignore_index
        # Out-of-range labels (possible only with check_labels=False) give NaN, like the kernels.
        in_range = (labels >= 0) & (labels < V)
        safe_labels = torch.where(in_range, labels, 0)
        label_kept = torch.ones(n_rows, dtype=torch.bool, device=logits.device)
        work = None
        rows = self._chunk_rows(V)
        fixed = rows if self.PAD_CHUNKS else None
        for r0, r1, x in _row_chunks(logits, rows):
            n = r1 - r0
            y = _padded(x.to(cd, copy=True), fixed)
            kept = self._mask(y, n, r0, r1)
            if kept is not None:
                label_kept[r0:r1] = kept.gather(1, safe_labels[r0:r1, None]).squeeze(1)
            if work is None or work.shape != y.shape:
                work = torch.empty_like(y)
            y_label = y.gather(1, _padded(safe_labels[r0:r1, None], fixed))
            fold = fold_block(y, temperature, work)
            # logp = (z_label - row_max) - log_sum, centred (-inf for a -inf label logit)
            logp = log_prob(centred(y_label, fold.stats.row_max, temperature).squeeze(1), fold.stats.log_sum)
            out[0, r0:r1] = torch.where(in_range[r0:r1], logp[:n], float("nan"))
            out[1, r0:r1], out[2, r0:r1], out[3, r0:r1] = (t[:n] for t in fold.stats)
        if self.support is not None and self.support.check:
            check_labels_kept(label_kept, valid & in_range, self.support.shape)
        # Ignored rows keep their (finite) state: the backward then gives them exactly 0, never exp(z - 0)
        logp = torch.where(valid, out[0], 0.0)
        return logp, RowStats(out[1], out[2], torch.where(valid, out[3], 0.0))

    def backward(self, logits, labels, stats: RowStats, grad_logp, grad_entropy, temperature, ignore_index):
        cd = output_dtype(logits.dtype)
        V = logits.shape[-1]
        valid = labels != ignore_index
        g_logp = torch.where(valid, grad_logp.to(cd), 0.0) if grad_logp is not None else None
        g_entropy = torch.where(valid, grad_entropy.to(cd), 0.0) if grad_entropy is not None else None
        if g_logp is None and g_entropy is None:
            g_logp = torch.zeros_like(stats.row_max)
        grad_rows = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device).view(-1, V)
        work = None
        rows = self._chunk_rows(V)
        pad = lambda t: _padded(t, rows if self.PAD_CHUNKS else None)  # noqa: E731 (padded rows: zero state, zero gradient)
        for r0, r1, x in _row_chunks(logits, rows):
            r = slice(r0, r1)
            y = pad(x.to(cd, copy=True))
            self._mask(y, r1 - r0, r0, r1)
            zc = centred(y, pad(stats.row_max[r]), temperature)
            if work is None or work.shape != zc.shape:
                work = torch.empty_like(zc)
            dz = grad_from_centred_(zc, pad(stats.log_sum[r]), pad(stats.entropy[r]),
                                    pad(g_logp[r]) if g_logp is not None else None,
                                    pad(g_entropy[r]) if g_entropy is not None else None, pad(labels[r]),
                                    work)[: r1 - r0]  # fmt: skip
            if temperature != 1.0:
                dz.div_(temperature)  # d logits = dz / T
            dz.masked_fill_(~valid[r, None], 0.0)  # ignored rows: exactly 0, whatever their logits hold
            grad_rows[r0:r1] = dz
        return grad_rows.view(logits.shape)


class BatchInvariantTorchTokenKernels(TorchTokenKernels):
    """``batch_invariant=True`` on the torch backend: the default chunks (``TORCH_CHUNK_ELEMENTS // V``
    rows, at most ``MAX_FIXED_ROWS``), every one -- the last included -- padded to that many rows, so
    ATen sees one shape per ``V`` and a row's logp, entropy and gradient row are bitwise independent
    of the batch around it. Costs at most one chunk of padded rows per call."""

    PAD_CHUNKS = True
    MAX_FIXED_ROWS = 1024

    def _chunk_rows(self, V):
        return min(max(1, TORCH_CHUNK_ELEMENTS // V), self.MAX_FIXED_ROWS)


class CudaTokenKernels(PackedSupportKernels):
    """The hand-written kernels in ``csrc/`` through ``alignkernels._cuda_backend``; ``support`` as the
    Triton launchers (the packed words handed to the kernels, labels checked first)."""

    def forward(self, logits, labels, temperature, ignore_index):
        bits = self._bits(logits, labels, ignore_index)[0] if self.support is not None and labels.numel() else None
        logp, row_max, log_sum, entropy = _cuda_backend.token_logprobs_forward(logits, labels, temperature,
                                                                               ignore_index, support=bits)  # fmt: skip
        return logp, RowStats(row_max, log_sum, entropy)

    def backward(self, logits, labels, stats: RowStats, grad_logp, grad_entropy, temperature, ignore_index):
        bits = self.support.row_bits(logits) if self.support is not None and labels.numel() else None
        return _cuda_backend.token_logprobs_backward(
            logits, labels, stats.row_max, stats.log_sum, stats.entropy, grad_logp, grad_entropy, temperature,
            ignore_index, support=bits,
        )  # fmt: skip


assert ROW_STATS == RowStats._fields  # the kernels' saved-state layout is RowStats, field for field

TOKEN_KERNELS = {"triton": TritonTokenKernels(), "torch": TorchTokenKernels(), "cuda": CudaTokenKernels()}
# batch_invariant=True: the Triton kernels are already one program per row with a block size fixed by
# V (a row's bits never see another row); the torch chunks get one fixed shape. The CUDA kernels and
# the eager reference are not proven batch invariant (refused by name in ``token_logprobs``).
BATCH_INVARIANT_TOKEN_KERNELS = {"triton": TritonTokenKernels(), "torch": BatchInvariantTorchTokenKernels()}
