"""The lm-head engine: per-token softmax statistics of ``transform(hidden @ weight.T + bias)`` tile by
tile, and their gradients, without ever materialising ``[N, V]`` logits. Used by ``linear_logprobs``,
its vocab-parallel form and the fused losses.

Algorithm:
1. Rows whose label is ``ignore_index`` are compacted away first (:func:`compact_rows`): prompt and
   padding tokens cost no FLOPs at all.
2. The valid rows are processed in ``[chunk, block]`` tiles (:class:`Plan`): ``chunk`` tokens x
   ``block`` vocab entries, vocab block outer, token chunk inner. Each tile of raw logits
   ``h[chunk] @ W[block].T`` is produced by a matmul into one reusable fp32 buffer, then handed to a
   **fold** (:class:`TorchFold` or :class:`TritonFold`, same math, one per language) that merges it
   into per-token centred statistics (``_softmax_torch`` / ``kernels/_softmax.py``). Forward saves
   only the compact rows and the row state ``RowStats(row_max, log_sum, entropy)``.
3. Backward walks the same tiles, recomputes each logits tile, lets the fold turn it into
   ``dx = d loss / d raw logits`` (``p`` and ``z - Σp·z`` formed relative to ``row_max``), and feeds
   it to three GEMM-shaped reductions: ``grad_hidden[chunk] += dx @ W[block]``,
   ``grad_weight[block] += dx.T @ h[chunk]`` (fp32 accumulator for the block, cast to the weight's
   dtype once the block is done), ``grad_bias[block] += dx.sum(0)``. Vocab-outer order means
   grad_weight needs only a ``[block, H]`` fp32 accumulator, never ``[V, H]``.
4. With a LoRA adapter on the head (``lora=``, ``ops/_lora.py``) each raw tile also gets the
   thin GEMM ``u[chunk] @ lora_B[block].T`` (``u = s·h·lora_Aᵀ``) before the fold, and backward
   accumulates the adapter's gradients tile by tile; the weight GEMM runs only if it needs grad.

Why cuBLAS tiles + Triton folds on the GPU (and not an all-Triton ``tl.dot`` kernel): the op is ~4
large GEMMs (forward, recompute, two gradient GEMMs); everything else is a few bandwidth-bound passes
over a tile that stays in L2-sized chunks. cuBLAS runs those GEMMs at the tensor-core roofline on
every architecture with bf16 inputs and fp32 output (``out_dtype``); the price of the split is one
extra write+read of the fp32 tile per GEMM (4 bytes/logit, ~10 % of a GEMM's time at H = 4096).
On the CPU (torch fold) the folds are a few fused ATen passes over a cache-sized tile.

GEMM operands (``head_precision=``, :class:`HeadPrecision` in the plan): on CUDA the inputs' dtype
with fp32 output (``input``) or widened to fp32 slice by slice with TF32 off / on for these GEMMs only
(``fp32`` / ``tf32``); the CPU always widens (no mixed-precision GEMM), so there the three agree.

Batch invariance (``batch_invariant=True``, :func:`batch_invariant_plan`): one fixed plan whatever the
batch (256 x 16384 tiles on CPU, 1024 rows on CUDA) and the valid rows padded to whole tiles
(:func:`pad_rows`), so every GEMM and fold runs at one shape and the vocab blocks merge in one order:
a row's results are bitwise independent of the rows around it (with ``lora=`` too: the adapter's thin
GEMMs ``u = s·h·Aᵀ`` and ``grad_h += s·dU·A`` run per chunk, ``ops/_lora.py`` ``LoraTiles``). The
default plan adapts the chunk to the number of rows, which is run-to-run deterministic but not batch invariant.

Memory (besides inputs and their gradients): one fp32 tile (``chunk x block``; two for the torch
fold, plus a ``dx`` tile in the half GEMM operand dtype in backward), a ``[block, H]`` fp32 grad_weight
accumulator for half weights, a ``[valid rows, H]`` fp32 grad_hidden accumulator, and O(rows)
statistics. Nothing scales with ``N x V``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch

from .._utils import check_same_device, check_temperature, check_tensor, output_dtype, widen_labels
from ..kernels._softmax import ROW_STATS
from ..kernels.linear_logprobs import FOLD_STATE, linear_logprobs_bwd_kernel, linear_logprobs_fwd_kernel, pick_config
from ._lora import LoraHead, LoraTiles
from ._softmax_torch import (
    RowStats,
    centred,
    fold_block,
    grad_from_centred_,
    log_prob,
    log_sum_sq_probs,
    merge_pair,
    merged,
    raw_grad_,
    transform_,
)
from ._support import TileBits, TopK, ids_to_words, merge_top_k

# Default token rows per chunk and fp32 elements per logits tile.
GPU_CHUNK_ROWS = 4096
GPU_TILE_ELEMENTS = 1 << 26  # 64M fp32 = 256 MB (+ 128 MB bf16 dx buffer in backward)
CPU_CHUNK_ROWS = 256
CPU_TILE_ELEMENTS = 1 << 22  # 4M fp32 = 16 MB: stays cache-friendly, memory flat
BLOCK_ALIGN = 128  # vocab blocks are multiples of this (GEMM- and vector-friendly widths)


class Transform(NamedTuple):
    """``z = f(x + b) / temperature``, ``f`` = ``logit_scale``, then the optional ``softcap``."""

    logit_scale: float
    softcap: float | None
    temperature: float


class HeadPrecision(NamedTuple):
    """How the lm-head GEMMs take their operands (``head_precision=``; one row of
    :data:`HEAD_PRECISIONS`). Every GEMM operand of the engine, of the three-GEMM head and of the
    LoRA term is formed by :meth:`operand`, and every GEMM runs inside :meth:`gemms`.

    * ``input``: on CUDA the operands keep their dtype (bf16 / fp16 tensor cores, fp32 output via
      ``out_dtype``); fp32 GEMMs follow torch's global TF32 setting. On the CPU (no mixed-precision
      GEMM) operands are widened to fp32, so there ``input`` computes what ``fp32`` does.
    * ``fp32``: operands widened to fp32 (fp64 for fp64 inputs) slice by slice -- a weight *block*
      ``[block, H]`` at a time, never a full fp32 copy of the weight -- and IEEE fp32 GEMMs on CUDA
      (TF32 off for those GEMMs only): the numbers of an fp32 lm-head (vLLM ``head_dtype=float32``).
    * ``tf32``: as ``fp32`` with TF32 tensor cores on for those GEMMs only (CUDA). The CPU has no
      TF32: there it computes exactly ``fp32``."""

    name: str
    upcast: bool  # widen half operands to the compute dtype on CUDA too
    tf32: bool | None  # CUDA fp32 GEMMs: TF32 on / off for the head's GEMMs; None leaves torch's setting

    def operand(self, t: torch.Tensor, compute_dtype) -> torch.Tensor:
        """A GEMM operand: ``t`` itself on CUDA in ``input`` mode, else ``t`` in the compute dtype
        (``t`` itself when it already has it; a copy the size of ``t``, so callers pass slices)."""
        return t if (t.is_cuda and not self.upcast) else t.to(compute_dtype)

    @contextlib.contextmanager
    def gemms(self, device):
        """Scope in which the head's GEMMs run: sets ``torch.backends.cuda.matmul.allow_tf32`` for
        ``fp32`` / ``tf32`` on CUDA and restores it on exit (no effect on the CPU)."""
        if self.tf32 is None or torch.device(device).type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved


HEAD_PRECISIONS = {p.name: p for p in (HeadPrecision("input", False, None), HeadPrecision("fp32", True, False),
                                       HeadPrecision("tf32", True, True))}  # fmt: skip


def head_precision(value) -> HeadPrecision:
    """The :data:`HEAD_PRECISIONS` row named by ``head_precision=`` (TE / VE naming the argument)."""
    if not isinstance(value, str):
        raise TypeError(f"head_precision must be one of {tuple(HEAD_PRECISIONS)} (a str), got {value!r}")
    if value not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision must be one of {tuple(HEAD_PRECISIONS)}, got {value!r}")
    return HEAD_PRECISIONS[value]


class Plan(NamedTuple):
    chunk_rows: int
    block_cols: int
    precision: HeadPrecision = HEAD_PRECISIONS["input"]
    padded: bool = False  # batch_invariant=True: the rows are padded to whole chunks (every GEMM at one shape)


class HeadStats(NamedTuple):
    """The forward's per-row results (compact rows). ``extra`` only with ``want_stats``:
    ``(log_sum_sq_probs, mean_logit, is_top1)`` (TRL's definitions)."""

    logp: torch.Tensor
    stats: RowStats
    extra: tuple | None


# --------------------------------------------------------------------------------------------
# Matmul helpers: fp32 (fp64) results from half inputs without rounding the product first
# --------------------------------------------------------------------------------------------
_MIXED_MM_OK: dict = {}  # str(device) -> whether torch.mm(..., out_dtype=torch.float32) works there


def mixed_mm_supported(device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` works for bf16 ``a``, ``b`` on ``device``
    (torch >= 2.8; CUDA devices only), probed once per device with a 16 x 16 GEMM.

    Only an answer about the *API* is cached: ``TypeError`` (no ``out_dtype`` keyword),
    ``NotImplementedError`` and a plain ``RuntimeError`` (no kernel for the dtypes) mean "unsupported",
    with one ``RuntimeWarning`` per device, because the fallback rounds every GEMM product to the input
    dtype before widening it (bf16: ~3 significant digits in the logits and gradients). An
    out-of-memory or other accelerator error says nothing about support: it is raised and nothing is
    cached (the next call probes again)."""
    if torch.device(device).type != "cuda":
        return False  # ATen's mm.dtype has CUDA kernels only: CPU callers widen their operands instead
    key = str(device)
    if key not in _MIXED_MM_OK:
        a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            _MIXED_MM_OK[key] = True
        except (torch.OutOfMemoryError, torch.AcceleratorError):
            raise
        except (TypeError, NotImplementedError, RuntimeError) as exc:
            _MIXED_MM_OK[key] = False
            warnings.warn(
                f"alignkernels: torch.mm(..., out_dtype=torch.float32) is unavailable on {key} "
                f"({type(exc).__name__}: {exc}); half-precision lm-head GEMMs fall back to rounding their "
                "products to the input dtype before widening to fp32 (less accurate log-probs and gradients)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _MIXED_MM_OK[key]


def mm_into(out, a, b, bias=None):
    """``out = a @ b (+ bias)`` where ``out`` may be wider (fp32) than ``a`` and ``b``. With
    same-dtype operands the GEMM adds the bias itself (``addmm``), for free."""
    if a.dtype == out.dtype:
        if bias is not None:
            torch.addmm(bias, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return
    if mixed_mm_supported(a.device):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # older torch: the product is rounded to the input dtype before widening
        out.copy_(torch.mm(a, b))
    if bias is not None:
        out.add_(bias)


def addmm_into(acc, a, b):
    """``acc += a @ b`` accumulated in ``acc``'s (fp32) dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif mixed_mm_supported(a.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def label_is_top1(label_y, max_y, max_y_before_label, logp):
    """TRL's ``is_top1`` (the label is the *first* argmax) from a fold's running maxima, and False
    wherever ``logp`` is NaN (a NaN or +inf logit in the row). The maxima alone cannot say it: a max
    may keep or drop a NaN (``torch.amax`` keeps it, ``tl.max`` drops it, compiled or interpreted),
    while the row's sums always keep it."""
    return (label_y >= max_y) & (label_y > max_y_before_label) & ~torch.isnan(logp)


# --------------------------------------------------------------------------------------------
# Folds: one per language, same interface. ``state`` is the fold's own [fields, rows] tensor.
# --------------------------------------------------------------------------------------------
class TorchFold:
    """PyTorch fold (CPU, fp64, anywhere). State fields: ``RowStats`` + ``q`` (Σ e^(2(z-m))), Σz, max y,
    max y before the label, y at the label. The GEMM adds the bias; a second tile-sized buffer is the
    scratch of the ATen passes."""

    NAME = "torch"
    FIELDS = ("row_max", "log_sum", "entropy", "sum_sq_exp", "sum_z", "max_y", "max_y_before_label", "label_y")
    FILLS = (float("-inf"), float("-inf"), 0.0, 0.0, 0.0, float("-inf"), float("-inf"), float("nan"))
    needs_work = True
    max_block = 1 << 14  # ATen's fused CPU reductions sum in fp32 lanes: blocks <= 16k columns keep 1e-6

    @staticmethod
    def dx_dtype(operand_dtype, compute_dtype):
        return compute_dtype

    @staticmethod
    def tile(out, h, w_blk, bias_blk):
        mm_into(out, h, w_blk.t(), bias=bias_blk)

    @classmethod
    def new_state(cls, n, dtype, device):
        return torch.tensor(cls.FILLS, dtype=dtype, device=device)[:, None].repeat(1, n)

    @staticmethod
    def forward(tile, work, bias, weight, labels, state, vocab_start, tr: Transform, want_stats, kept=None):
        """Fold the raw tile (bias included; overwritten) into ``state`` (a [fields, rows] view).
        ``kept`` (:class:`TileBits` of the tile, ``ops/_support.py``): logits outside it become −inf."""
        y = transform_(tile, tr.logit_scale, tr.softcap)
        if kept is not None:
            y.masked_fill_(~kept.mask(), float("-inf"))
        n_cols = y.shape[1]
        local = labels - vocab_start
        in_block = (local >= 0) & (local < n_cols)
        y_label = y.gather(1, local.clamp(0, n_cols - 1)[:, None]).squeeze(1)
        torch.where(in_block, y_label, state[7], out=state[7])
        if want_stats:
            state[4] += y.sum(1) / tr.temperature
            torch.maximum(state[5], y.amax(1), out=state[5])
            before_label = torch.arange(n_cols, device=y.device)[None, :] < local[:, None]
            torch.maximum(state[6], y.masked_fill(~before_label, float("-inf")).amax(1), out=state[6])
        block = fold_block(y, tr.temperature, work)
        total, a_old, a_block = merge_pair(RowStats(*state[:3]), block.stats)
        if want_stats:  # Σ e^(2(z - m)) of the block relative to its row_max, rescaled by a²
            q_block = torch.linalg.vecdot(block.e, block.e) * torch.exp(2 * (block.stats.log_sum - block.sum_e.log()))
            state[3] = state[3] * a_old * a_old + torch.where(block.sum_e > 0, q_block, 0.0) * a_block * a_block
        state[0], state[1], state[2] = total

    @staticmethod
    def finalise(state, tr: Transform, vocab, want_stats) -> HeadStats:
        stats = RowStats(state[0].clone(), state[1].clone(), state[2].clone())
        logp = log_prob(centred(state[7][:, None], stats.row_max, tr.temperature).squeeze(1), stats.log_sum)
        extra = None
        if want_stats:  # log Σp² = log q - 2 log_sum
            extra = (log_sum_sq_probs(state[3], stats.log_sum), state[4] / vocab,
                     label_is_top1(state[7], state[5], state[6], logp))  # fmt: skip
        return HeadStats(logp, stats, extra)

    @staticmethod
    def backward(tile, dx, work, bias, weight, labels, stats: RowStats, g_logp, g_entropy, vocab_start, tr: Transform,
                 kept=None):  # fmt: skip
        """Raw tile (bias included; overwritten) -> ``dx = d loss / d raw logits`` (in ``work``); ``kept``
        as :meth:`forward` (p = 0, so dx = 0, outside it)."""
        y, dy_dx = transform_(tile, tr.logit_scale, tr.softcap, keep_derivative=True)
        if kept is not None:
            y.masked_fill_(~kept.mask(), float("-inf"))
        zc = centred(y, stats.row_max, tr.temperature)
        dz = grad_from_centred_(zc, stats.log_sum, stats.entropy, g_logp, g_entropy, labels - vocab_start, work)
        return raw_grad_(dz, dy_dx, tr.logit_scale, tr.temperature)  # chain rule: z = f(x + b) / T


class TritonFold:
    """Triton fold (``alignkernels.kernels.linear_logprobs``; CUDA tensors, or the interpreter). The
    kernel adds the bias; state fields are ``FOLD_STATE``; ``dx`` is written in the gradient GEMMs'
    operand dtype (:meth:`dx_dtype`)."""

    NAME = "triton"
    FILLS = {"row_max": float("-inf"), "max_y": float("-inf"), "max_y_before_label": float("-inf"),
             "label_y": float("nan"), "label_centred": float("nan")}  # fmt: skip
    needs_work = False
    max_block = None

    @staticmethod
    def dx_dtype(operand_dtype, compute_dtype):
        """``dx`` is a gradient GEMM's operand: written directly in the GEMM operand dtype
        (``HeadPrecision.operand``: the input dtype on CUDA in ``input`` mode, else fp32)."""
        return operand_dtype

    @staticmethod
    def tile(out, h, w_blk, bias_blk):
        mm_into(out, h, w_blk.t())

    @classmethod
    def new_state(cls, n, dtype, device):
        fills = [cls.FILLS.get(name, 0.0) for name in FOLD_STATE]
        return torch.tensor(fills, dtype=dtype, device=device)[:, None].repeat(1, n)

    @staticmethod
    def forward(tile, work, bias, weight, labels, state, vocab_start, tr: Transform, want_stats, kept=None):
        n_rows, n_cols = tile.shape
        block_v, num_warps = pick_config(n_cols)
        words = _words(kept, tile.device)
        linear_logprobs_fwd_kernel[(n_rows,)](
            tile, tile.stride(0), bias if bias is not None else weight, labels, state, state.stride(0),
            words, words.stride(0), vocab_start, n_cols, float(tr.logit_scale), float(tr.softcap or 0.0),
            1.0 / tr.temperature, int(bias is not None), int(want_stats), int(kept is not None),
            BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip

    @staticmethod
    def finalise(state, tr: Transform, vocab, want_stats) -> HeadStats:
        f = dict(zip(FOLD_STATE, state))
        stats = merged(f["row_max"].clone(), torch.stack((f["sum_exp"], f["sum_centred"])))
        log_sum = stats.log_sum
        logp = log_prob(f["label_centred"], log_sum)  # the kernel's own z - m (its 1/T, its fma)
        extra = None
        if want_stats:
            extra = (log_sum_sq_probs(f["sum_sq_exp"], log_sum), f["sum_z"] / vocab,
                     label_is_top1(f["label_y"], f["max_y"], f["max_y_before_label"], logp))  # fmt: skip
        return HeadStats(logp, stats, extra)

    @staticmethod
    def backward(tile, dx, work, bias, weight, labels, stats: RowStats, g_logp, g_entropy, vocab_start, tr: Transform,
                 kept=None):  # fmt: skip
        n_rows, n_cols = tile.shape
        block_v, num_warps = pick_config(n_cols)
        words = _words(kept, tile.device)
        saved = torch.stack(tuple(stats))  # ROW_STATS order
        zeros = torch.zeros_like(stats.row_max)
        grads = torch.stack((g_logp if g_logp is not None else zeros, g_entropy if g_entropy is not None else zeros))
        linear_logprobs_bwd_kernel[(n_rows, -(-n_cols // block_v))](
            tile, tile.stride(0), dx, dx.stride(0), bias if bias is not None else weight, labels, saved, grads, n_rows,
            words, words.stride(0), vocab_start, n_cols, float(tr.logit_scale), float(tr.softcap or 0.0),
            1.0 / tr.temperature, int(bias is not None), int(kept is not None), BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
        return dx


def _words(kept: TileBits | None, device) -> torch.Tensor:
    """The tile rows' kept-token words for the Triton kernels (last dim contiguous), or a never-read
    int32 placeholder (``has_support`` 0)."""
    if kept is None:
        return torch.zeros(1, 1, dtype=torch.int32, device=device)
    return kept.words if kept.words.stride(-1) == 1 else kept.words.contiguous()


assert ROW_STATS == RowStats._fields and TorchFold.FIELDS[:3] == RowStats._fields
FOLDS = {"torch": TorchFold, "triton": TritonFold}


# --------------------------------------------------------------------------------------------
# The tile loop, shared by both folds
# --------------------------------------------------------------------------------------------
def tiles(n_rows, vocab, plan: Plan):
    """(vocab block outer, token chunk inner) tile coordinates."""
    for v0 in range(0, vocab, plan.block_cols):
        v1 = min(v0 + plan.block_cols, vocab)
        yield v0, v1, [(r0, min(r0 + plan.chunk_rows, n_rows)) for r0 in range(0, n_rows, plan.chunk_rows)]


def _buffers(fold, plan, n_rows, vocab, dtype, device):
    elems = min(plan.chunk_rows, n_rows) * min(plan.block_cols, vocab)
    tile = torch.empty(elems, dtype=dtype, device=device)
    work = torch.empty(elems, dtype=dtype, device=device) if fold.needs_work else None
    return tile, work


def _view(buf, shape):
    return buf[: shape[0] * shape[1]].view(shape) if buf is not None else None


def head_forward(hidden, weight, bias, labels, tr: Transform, plan: Plan, fold, want_stats,
                 lora: LoraHead | None = None, support: torch.Tensor | None = None) -> HeadStats:  # fmt: skip
    """Per-row ``logp``, ``RowStats`` (and the optional statistics) of the compact rows. With
    ``lora`` each raw tile also gets the adapter's ``s·(h·Aᵀ)·B[block]ᵀ`` (``ops/_lora.py``).
    GEMM operands and mode: ``plan.precision`` (:class:`HeadPrecision`). ``support`` (``[rows, W]``
    int32 kept-token bits of the compact rows, ``ops/_support.py``): logits outside it are −inf."""
    with plan.precision.gemms(hidden.device):
        return _head_forward(hidden, weight, bias, labels, tr, plan, fold, want_stats, lora, support)


def _tile_kept(support, r0, r1, v0, v1):
    return TileBits(support[r0:r1], v0, v1) if support is not None else None


def _head_forward(hidden, weight, bias, labels, tr, plan, fold, want_stats, lora, support):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cd = output_dtype(hidden.dtype)
    state = fold.new_state(n_rows, cd, hidden.device)
    if n_rows:
        h = plan.precision.operand(hidden, cd)
        bias_cd = bias.to(cd) if bias is not None else None
        tile_buf, work_buf = _buffers(fold, plan, n_rows, vocab, cd, hidden.device)
        adapter = LoraTiles(lora, h, cd, lambda t: plan.precision.operand(t, cd), addmm_into,
                            plan.chunk_rows) if lora is not None else None  # fmt: skip
        for v0, v1, chunks in tiles(n_rows, vocab, plan):
            w_blk = plan.precision.operand(weight[v0:v1], cd)
            b_blk = adapter.block(v0, v1) if adapter is not None else None
            for r0, r1 in chunks:
                tile = _view(tile_buf, (r1 - r0, v1 - v0))
                fold.tile(tile, h[r0:r1], w_blk, bias_cd[v0:v1] if bias is not None else None)
                if adapter is not None:
                    adapter.add_to_tile(tile, slice(r0, r1), b_blk)
                fold.forward(tile, _view(work_buf, tile.shape), bias, weight, labels[r0:r1], state[:, r0:r1], v0,
                             tr, want_stats, kept=_tile_kept(support, r0, r1, v0, v1))  # fmt: skip
    return fold.finalise(state, tr, vocab, want_stats)


def head_top_k(hidden, weight, bias, tr: Transform, plan: Plan, k: int) -> torch.Tensor:
    """``top_k=`` formed in the trainer: the ``[rows, ceil(V/32)]`` int32 words of each row's ``k`` largest
    transformed logits ``y = f(h·Wᵀ + b)`` (the temperature keeps the order), ties to the lowest token ids
    (``ops/_support.py`` ``merge_top_k``). One extra GEMM pass over the plan's tiles, with the torch
    transform whatever the fold; memory: one tile and a running ``[rows, k]`` (values, ids) per chunk."""
    return ids_to_words(head_top_k_candidates(hidden, weight, bias, tr, plan, k, 0).ids, weight.shape[0])


def head_top_k_candidates(hidden, weight, bias, tr: Transform, plan: Plan, k: int, v0: int) -> TopK:
    """:func:`head_top_k`'s running top-k after the last vocabulary block: each row's ``min(k, V)`` largest
    transformed logits and their token ids (``v0 …`` for the weight's rows: a vocab-parallel shard's
    candidates, ``ops/vocab_parallel.py``), ``[rows, min(k, V)]``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cd = output_dtype(hidden.dtype)
    runs: dict[int, TopK | None] = {}
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False), plan.precision.gemms(hidden.device):
        h = plan.precision.operand(hidden, cd)
        bias_cd = bias.to(cd) if bias is not None else None
        tile_buf = _buffers(TorchFold, plan, n_rows, vocab, cd, hidden.device)[0] if n_rows else None
        for v0_blk, v1, chunks in tiles(n_rows, vocab, plan):
            w_blk = plan.precision.operand(weight[v0_blk:v1], cd)
            for r0, r1 in chunks:
                tile = _view(tile_buf, (r1 - r0, v1 - v0_blk))
                TorchFold.tile(tile, h[r0:r1], w_blk, bias_cd[v0_blk:v1] if bias is not None else None)
                runs[r0] = merge_top_k(runs.get(r0), transform_(tile, tr.logit_scale, tr.softcap), v0 + v0_blk, k)
    if not runs:
        empty = torch.zeros(0, min(k, vocab), dtype=torch.int64, device=hidden.device)
        return TopK(empty.to(cd), empty)
    return TopK(torch.cat([runs[r0].values for r0 in sorted(runs)]), torch.cat([runs[r0].ids for r0 in sorted(runs)]))


def head_backward(hidden, weight, bias, labels, stats: RowStats, g_logp, g_entropy, tr: Transform, plan: Plan, fold,
                  needs, lora: LoraHead | None = None, support: torch.Tensor | None = None):  # fmt: skip
    """``(grad_hidden fp32 | None, grad_weight | None, grad_bias fp32 | None)`` for per-row upstream
    gradients ``g_logp`` / ``g_entropy`` (compute dtype, or None) of the state ``stats``.

    With ``lora``, ``needs`` has five flags ``(hidden, weight, bias, lora_A, lora_B)`` and the
    result two more entries ``(grad_lora_A | None, grad_lora_B | None)`` in the adapter's dtype;
    ``grad_hidden`` then includes the adapter's term (``ops/_lora.py``). GEMM operands and mode:
    ``plan.precision``, and ``support``, as forward."""
    with plan.precision.gemms(hidden.device):
        return _head_backward(hidden, weight, bias, labels, stats, g_logp, g_entropy, tr, plan, fold, needs, lora,
                              support)  # fmt: skip


def _head_backward(hidden, weight, bias, labels, stats, g_logp, g_entropy, tr, plan, fold, needs, lora, support):
    n_rows, H = hidden.shape
    vocab = weight.shape[0]
    cd = output_dtype(hidden.dtype)
    device = hidden.device
    need_h, need_w, need_b = needs[:3]
    grad_hidden = torch.zeros(n_rows, H, dtype=cd, device=device) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=cd, device=device) if need_b else None
    h = plan.precision.operand(hidden, cd)
    adapter = None
    if lora is not None:
        adapter = LoraTiles(lora, h, cd, lambda t: plan.precision.operand(t, cd), addmm_into, plan.chunk_rows,
                            (need_h, *needs[3:]))  # fmt: skip
    if n_rows == 0 or (g_logp is None and g_entropy is None):
        return (grad_hidden, grad_weight, grad_bias, *(adapter.finish(grad_hidden) if adapter is not None else ()))
    bias_cd = bias.to(cd) if bias is not None else None
    tile_buf, work_buf = _buffers(fold, plan, n_rows, vocab, cd, device)
    dx_dtype = fold.dx_dtype(h.dtype, cd)
    dx_buf = tile_buf if dx_dtype == cd else torch.empty(tile_buf.numel(), dtype=dx_dtype, device=device)
    w_acc_buf = None
    if need_w and weight.dtype != cd:
        w_acc_buf = torch.empty(min(plan.block_cols, vocab) * H, dtype=cd, device=device)

    for v0, v1, chunks in tiles(n_rows, vocab, plan):
        w_blk = plan.precision.operand(weight[v0:v1], cd)
        b_blk = adapter.block(v0, v1) if adapter is not None else None
        if need_w:
            w_acc = grad_weight[v0:v1] if w_acc_buf is None else w_acc_buf[: (v1 - v0) * H].view(v1 - v0, H).zero_()
        for r0, r1 in chunks:
            rows = slice(r0, r1)
            tile = _view(tile_buf, (r1 - r0, v1 - v0))
            fold.tile(tile, h[rows], w_blk, bias_cd[v0:v1] if bias is not None else None)
            if adapter is not None:
                adapter.add_to_tile(tile, rows, b_blk)
            dx = fold.backward(tile, _view(dx_buf, tile.shape), _view(work_buf, tile.shape), bias, weight, labels[rows],
                               RowStats(*(x[rows] for x in stats)), g_logp[rows] if g_logp is not None else None,
                               g_entropy[rows] if g_entropy is not None else None, v0, tr,
                               kept=_tile_kept(support, r0, r1, v0, v1))  # fmt: skip
            dx_gemm = dx if dx.dtype == h.dtype else dx.to(h.dtype)
            if need_h:
                addmm_into(grad_hidden[rows], dx_gemm, w_blk)  # grad_h[chunk] += dx @ W[block]
            if need_w:
                addmm_into(w_acc, dx_gemm.t(), h[rows])  # grad_W[block] += dx.T @ h[chunk]
            if need_b:
                grad_bias[v0:v1] += dx.sum(0, dtype=cd)  # grad_b[block] += Σ_rows dx
            if adapter is not None:
                adapter.backward_tile(dx_gemm, rows, v0, v1, b_blk)  # dU += dx·B[block], dB[block] += dxᵀ·u
        if need_w and w_acc_buf is not None:
            grad_weight[v0:v1].copy_(w_acc)
    if adapter is not None:
        return (grad_hidden, grad_weight, grad_bias, *adapter.finish(grad_hidden))
    return grad_hidden, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------
# Validation, plan, row compaction
# --------------------------------------------------------------------------------------------
def check_positive_int(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _check_number(name, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def validate_head(hidden, weight, labels, bias, temperature, logit_scale, softcap, weight_name="weight"):
    """Check the lm-head inputs; returns ``(Transform, labels as int64)``."""
    check_tensor("hidden", hidden, floating=True, ndim_min=1)
    check_tensor(weight_name, weight, floating=True)
    labels = widen_labels("labels", labels)
    if bias is not None:
        check_tensor("bias", bias, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be 2-D [V, H] (the lm_head weight), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have a non-empty vocabulary dimension (shape[0])")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal {weight_name}.shape[1] ({weight.shape[1]})"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and {weight_name} must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the {weight_name}'s dtype {weight.dtype}, got {bias.dtype}")
    check_same_device(hidden=hidden, **{weight_name: weight}, labels=labels, bias=bias)
    temperature = check_temperature(temperature)
    logit_scale = _check_number("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _check_number("softcap", softcap)
        if not softcap > 0.0:
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return Transform(logit_scale, softcap, temperature), labels


# batch_invariant=True: one tile shape whatever the batch (rows are padded to a multiple of the chunk).
# The CPU tile is the default plan's for n >= 256 rows, so large batches pay only the padding.
BATCH_INVARIANT_ROWS = {"cpu": CPU_CHUNK_ROWS, "cuda": 1024}  # token rows per tile (other devices: the CPU's)
BATCH_INVARIANT_BLOCK = 1 << 14  # vocab entries per tile (the last block: V mod 16384, fixed by V)


def batch_invariant_rows(device) -> int:
    """Token rows per tile of ``batch_invariant=True`` on ``device`` (:data:`BATCH_INVARIANT_ROWS`)."""
    return BATCH_INVARIANT_ROWS.get(torch.device(device).type, BATCH_INVARIANT_ROWS["cpu"])


def batch_invariant_plan(fold, device, vocab, precision: str = "input") -> Plan:
    """The fixed plan of ``batch_invariant=True``: every tile GEMM is ``[rows, H] x [H, block]`` (the
    last vocab block ``V mod block`` wide), every fold sees that tile shape, the vocab blocks are
    merged in one order -- whatever ``n_rows``, ``chunk_size`` or ``vocab_block_size``. With the rows
    padded to a multiple of ``rows`` (:func:`pad_rows`) a row's results depend on its own inputs only."""
    block = min(BATCH_INVARIANT_BLOCK, fold.max_block or BATCH_INVARIANT_BLOCK)
    return Plan(batch_invariant_rows(device), min(block, vocab), head_precision(precision), padded=True)


def pad_rows(x: torch.Tensor, multiple: int, value=0) -> torch.Tensor:
    """``x`` (rows first) padded with ``value`` rows to a multiple of ``multiple`` (differentiable)."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return torch.cat([x, x.new_full((extra, *x.shape[1:]), value)])


def make_plan(fold, device, n_rows, vocab, chunk_size, vocab_block_size, precision: str = "input") -> Plan:
    on_gpu = device.type == "cuda"
    chunk = chunk_size or (GPU_CHUNK_ROWS if on_gpu else CPU_CHUNK_ROWS)
    chunk = max(1, min(chunk, n_rows))
    if vocab_block_size is None:
        budget = GPU_TILE_ELEMENTS if on_gpu else CPU_TILE_ELEMENTS
        vocab_block_size = max(BLOCK_ALIGN, budget // chunk // BLOCK_ALIGN * BLOCK_ALIGN)
        if fold.max_block is not None:
            vocab_block_size = min(vocab_block_size, fold.max_block)
    return Plan(chunk, min(vocab_block_size, vocab), head_precision(precision))


class CompactRows(NamedTuple):
    """The valid (not ignored) rows of flattened ``[N, H]`` hidden states: ``rows`` their indices
    (None: every row is valid, no copy), ``hidden [n, H]``, ``labels [n]`` int64. Under
    ``torch.compile`` (no data-dependent shapes) nothing is dropped: ignored rows get label 0 and
    ``valid`` marks the rows that count. Whatever consumes per-row results must then go through
    :meth:`mask` / :meth:`expand` / :meth:`count` (and ``three_gemm_head(valid=)``), so ignored rows
    give 0, are not counted and receive zero gradient -- eager and compiled alike."""

    rows: torch.Tensor | None
    hidden: torch.Tensor
    labels: torch.Tensor
    shape: tuple
    valid: torch.Tensor | None = None

    def mask(self, x):
        """A per-compact-row tensor with the rows that do not count set to 0 / False (no-op eagerly)."""
        if self.valid is None:
            return x
        return torch.where(self.valid, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def count(self) -> torch.Tensor:
        """The number of rows that count (not ignored), an int64 0-d tensor."""
        if self.valid is not None:
            return self.valid.sum()
        return torch.tensor(self.labels.shape[0], dtype=torch.int64, device=self.labels.device)

    def expand(self, x):
        """A per-compact-row tensor back to the labels' shape (0 / False at ignored positions)."""
        x = self.mask(x)
        if self.rows is not None:
            n_total = math.prod(self.shape)
            x = torch.zeros(n_total, dtype=x.dtype, device=x.device).index_copy(0, self.rows, x)
        return x.view(self.shape)


def compact_rows(hidden, labels, ignore_index) -> CompactRows:
    """Drop ignored rows (one host sync: sizes the compact problem)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if torch.compiler.is_compiling():
        valid = flat_labels != ignore_index
        return CompactRows(None, flat_hidden.contiguous(), torch.where(valid, flat_labels, 0), tuple(labels.shape), valid)
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    if rows.numel() == flat_labels.numel():
        return CompactRows(None, flat_hidden.contiguous(), flat_labels.contiguous(), tuple(labels.shape))
    return CompactRows(rows, flat_hidden.index_select(0, rows), flat_labels.index_select(0, rows).contiguous(),
                       tuple(labels.shape))  # fmt: skip
