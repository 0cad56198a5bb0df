"""``linear_logprobs``: per-token log-prob of the label (and entropy, and TRL's extra statistics)
straight from hidden states and the lm_head weight, without ever materialising ``[N, V]`` logits.

Algorithm (every backend but ``reference``):
1. Rows whose label is ``ignore_index`` are compacted away first (``index_select`` of the valid
   rows): prompt and padding tokens cost no FLOPs at all.
2. The valid rows are processed in ``[chunk, block]`` tiles: ``chunk`` tokens x ``block`` vocab
   entries. Each tile of raw logits ``h[chunk] @ W[block].T`` is produced by a matmul into one
   reusable fp32 buffer, then folded into per-token online statistics (max, Σe, Σz·e, and for the
   optional outputs Σe², Σz, max before the label, z at the label). Forward saves only the
   compact rows, per-token lse and entropy.
3. Backward walks the same tiles (vocab block outer, token chunk inner), recomputes each logits
   tile, turns it in place into ``dx = d loss / d raw logits`` and feeds it to three GEMM-shaped
   reductions: ``grad_hidden[chunk] += dx @ W[block]``, ``grad_weight[block] += dx.T @ h[chunk]``
   (fp32 accumulator for the block, cast to the weight's dtype once the block is done),
   ``grad_bias[block] += dx.sum(0)``. Vocab-outer order means grad_weight needs only a
   ``[block, H]`` fp32 accumulator, never ``[V, H]``; grad_hidden's fp32 accumulator is
   ``[valid rows, H]``.

Why cuBLAS tiles + Triton folds on the GPU (and not an all-Triton ``tl.dot`` kernel): the op is
~4 large GEMMs (forward, recompute, two gradient GEMMs); everything else is a few bandwidth-bound
passes over a tile that stays in L2-sized chunks. cuBLAS already runs those GEMMs at the
tensor-core roofline on every architecture (mma on sm_80, wgmma + TMA on sm_90, whatever comes
next) with bf16 inputs and fp32 output (``out_dtype``), while a hand-written fused ``tl.dot``
kernel has to be re-tuned per GPU and usually trails cuBLAS by 10-30 % on sm_90. The price of the
split is one extra write+read of the fp32 tile per GEMM (4 bytes/logit, ~10 % of a GEMM's time at
H = 4096) -- and the Triton folds stay simple, exact and testable under the interpreter.

On the CPU (``torch`` backend) the same tiles are folded with fused, row-cached ATen kernels:
``log_softmax`` over each vocab block gives the block's log-sum-exp (and ``softmax`` over it, with
that saved per-block lse, gives ``p`` in backward), so the op is GEMM-bound: 4 GEMMs (forward,
recompute, two gradients) against eager's 3, and a few MB of tile instead of ``[N, V]`` tensors.

Backends: ``triton`` (matmul tiles + the kernels in ``alignkernels.kernels.linear_logprobs``;
CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``), ``torch`` (the same tiles folded with
PyTorch ops; CPU, fp64, anywhere), ``reference`` (materialised logits, autograd through
``log_softmax``). ``cuda`` has no hand-written kernel for this op: the heavy part is GEMMs, so it
runs the ``triton`` path (cuBLAS tiles).

Memory (besides inputs and their gradients): one fp32 tile (``chunk x block``; two on CPU, plus a
weight-dtype ``dx`` tile for half inputs in backward), a ``[block, H]`` fp32 grad_weight
accumulator for half weights, a ``[valid rows, H]`` fp32 grad_hidden accumulator, and O(rows)
statistics. Nothing scales with ``N x V``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._utils import (
    check_label_range,
    check_same_device,
    check_temperature,
    check_tensor,
    labels_checking_enabled,
    output_dtype,
    resolve_backend,
)

# Default token rows per chunk and fp32 elements per logits tile.
_GPU_CHUNK_ROWS = 4096
_GPU_TILE_ELEMENTS = 1 << 26  # 64M fp32 = 256 MB (+ 128 MB bf16 dx buffer in backward)
_CPU_CHUNK_ROWS = 256
_CPU_TILE_ELEMENTS = 1 << 22  # 4M fp32 = 16 MB: stays cache-friendly, memory flat
# ATen's fused CPU (log_)softmax sums a row in fp32 vector lanes: over 256k columns that drifts by
# ~3e-5 relative; blocks of <= 16k columns keep it ~1e-6 (blocks then merge as online sums).
_CPU_MAX_BLOCK = 1 << 14
_BLOCK_ALIGN = 128  # vocab blocks are multiples of this (GEMM- and vector-friendly widths)


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


class _Transform(NamedTuple):
    logit_scale: float
    softcap: float | None
    temperature: float


class _Plan(NamedTuple):
    backend: str  # "torch" or "triton"
    chunk_rows: int
    block_cols: int


# --------------------------------------------------------------------------------------------
# Matmul helpers: fp32 (fp64) results from half inputs without rounding the product first
# --------------------------------------------------------------------------------------------
_MIXED_MM_OK: dict = {}


def _cuda_mixed_mm_supported(device) -> bool:
    """``torch.mm(..., out_dtype=torch.float32)`` on half inputs (torch >= 2.8, CUDA only)."""
    key = str(device)
    if key not in _MIXED_MM_OK:
        try:
            a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _MIXED_MM_OK[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED_MM_OK[key] = False
    return _MIXED_MM_OK[key]


def _mm_into(out, a, b, bias=None):
    """``out = a @ b (+ bias)`` where ``out`` may be wider (fp32) than ``a`` and ``b``. With
    same-dtype operands the GEMM adds the bias itself (``addmm``), for free."""
    if a.dtype == out.dtype:
        if bias is not None:
            torch.addmm(bias, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return
    if a.is_cuda and _cuda_mixed_mm_supported(a.device):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # older torch: the product is rounded to the input dtype before widening
        out.copy_(torch.mm(a, b))
    if bias is not None:
        out.add_(bias)


def _addmm_into(acc, a, b):
    """``acc += a @ b`` accumulated in ``acc``'s (fp32) dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mixed_mm_supported(a.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


# --------------------------------------------------------------------------------------------
# Tile folds. Forward: fold a raw logits tile into the per-token statistics. Backward: turn a raw
# logits tile into dx = d loss / d raw logits. One torch version, one Triton version (same math).
# --------------------------------------------------------------------------------------------
class _ForwardState(NamedTuple):
    """Per-token online statistics of the compact rows (see ``kernels/linear_logprobs.py``). Sums
    are kept relative to a running shift ``m``: the running max of z in the Triton kernel, the
    running max of the per-block log-sum-exps in the torch fold (any shift >= a few below the true
    max keeps the sums in range; both give lse = m + log s)."""

    shift: torch.Tensor  # m
    sum_exp: torch.Tensor  # s = Σ e^(z-m)
    sum_z_exp: torch.Tensor  # t = Σ z e^(z-m)
    sum_sq_exp: torch.Tensor  # q = Σ e^(2(z-m))
    sum_z: torch.Tensor  # Σ z
    max_before_label: torch.Tensor  # max of z over v < label
    label_z: torch.Tensor  # z at the label
    max_z: torch.Tensor  # max of z (torch fold, statistics only; the Triton kernel's shift is it)

    @classmethod
    def empty(cls, n, dtype, device):
        inf = float("-inf")
        # label_z starts as NaN: a label outside [0, V) (possible only with check_labels=False) is
        # never found in a tile and gives NaN in its row, never a plausible number
        fills = (inf, 0, 0, 0, 0, inf, float("nan"), inf)
        return cls(*(torch.full((n,), fill, dtype=dtype, device=device) for fill in fills))

    def rows(self, r0, r1):
        return _ForwardState(*(x[r0:r1] for x in self))


def _torch_transform_(x, tr: _Transform, keep_tanh=False):
    """In place: x -> z = T⁻¹ · softcap·tanh(logit_scale·x / softcap) (``x`` already includes the
    bias: the GEMM adds it). With ``keep_tanh`` returns ``(z, tanh)`` (backward needs 1 - tanh²;
    ``tanh`` is a new tensor), else ``z``."""
    tanh = None
    if tr.softcap is not None:
        x.mul_(tr.logit_scale / tr.softcap).tanh_()
        if keep_tanh:
            tanh = x.clone()
        x.mul_(tr.softcap / tr.temperature)
    elif tr.logit_scale != 1.0 or tr.temperature != 1.0:
        x.mul_(tr.logit_scale / tr.temperature)
    return (x, tanh) if keep_tanh else x


def _row_dots(a, b):
    """Σ_v a[r, v] b[r, v] per row in one pass and no temporary (batched BLAS dot)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _torch_fold_forward(tile, work, labels, state: _ForwardState, vocab_start, tr, want_entropy, want_stats,
                        masked_cols=None):  # fmt: skip
    """Fold the raw logits ``tile`` (bias included; overwritten) into ``state``; ``work`` is a
    scratch buffer of the tile's shape. Returns the per-row log-sum-exp of this block.

    CPU-friendly form of the Triton kernel's math: ``log_softmax`` over the block is one fused,
    row-cached ATen kernel (3-4x faster than separate max / sub / exp / sum passes over a tile
    that does not fit in cache). With the block max ``m_b`` at column ``j`` it gives the block's
    ``lse_b = m_b - log_softmax(z)_j`` and, after one ``exp``, the in-block probabilities ``p_b``
    for Σ p_b·z and Σ p_b². Blocks merge as online sums with shift ``m``: block b contributes
    ``e^(lse_b - m)`` to s, ``e^(lse_b - m) Σ p_b z`` to t and ``e^(2(lse_b - m)) Σ p_b²`` to q.
    ``masked_cols`` (bool ``[cols]`` or None) marks columns whose bias is -inf (z = -inf, p = 0).
    """
    z = _torch_transform_(tile, tr)
    n_cols = z.shape[1]
    local = labels - vocab_start
    in_block = (local >= 0) & (local < n_cols)
    z_at_label = z.gather(1, local.clamp(0, n_cols - 1)[:, None]).squeeze(1)
    torch.where(in_block, z_at_label, state.label_z, out=state.label_z)

    block_max, block_argmax = z.max(1)
    log_p_block = torch._log_softmax(z, 1, False, out=work)
    block_lse = block_max - log_p_block.gather(1, block_argmax[:, None]).squeeze(1)
    block_lse = torch.where(block_max == float("-inf"), float("-inf"), block_lse)  # fully masked block
    new_shift = torch.maximum(state.shift, block_lse)
    safe_shift = torch.where(new_shift == float("-inf"), 0.0, new_shift)  # no (-inf) - (-inf)
    alpha = (state.shift - safe_shift).exp_()  # rescales the old sums (0 on the first block)
    beta = (block_lse - safe_shift).exp_()  # this block's Σ e^(z - m)
    state.sum_exp.mul_(alpha).add_(beta)
    if want_stats:
        state.sum_z.add_(z.sum(1))
        torch.maximum(state.max_z, block_max, out=state.max_z)
        before_label = torch.arange(n_cols, device=z.device)[None, :] < local[:, None]
        block_max_before = z.masked_fill(~before_label, float("-inf")).amax(1)
        torch.maximum(state.max_before_label, block_max_before, out=state.max_before_label)
    if want_entropy or want_stats:
        p_block = log_p_block.exp_()
        if want_stats:  # Σ p_b² (pairwise-summed)
            sq = torch.linalg.vecdot(p_block, p_block).mul_(beta * beta)
            state.sum_sq_exp.mul_(alpha * alpha).add_(torch.where(beta > 0, sq, 0.0))
        if masked_cols is not None:
            z.masked_fill_(masked_cols[None, :], 0.0)  # p = 0 there: keep 0·(-inf) out of Σ p·z
        # Σ p_b·z with torch's pairwise summation (a BLAS dot loses ~1e-4 over 256k terms)
        t_block = p_block.mul_(z).sum(1).mul_(beta)
        state.sum_z_exp.mul_(alpha).add_(torch.where(beta > 0, t_block, 0.0))
    state.shift.copy_(new_shift)
    return block_lse


def _torch_tile_to_dx(tile, work, labels, block_lse, lse, mean_z, g_logp, g_entropy, vocab_start, tr,
                      masked_cols=None):  # fmt: skip
    """Raw logits ``tile`` (bias included; overwritten) -> dx, returned in the scratch buffer
    ``work``. ``block_lse`` is this block's per-row log-sum-exp from the forward, so
    ``p = softmax_block(z) · e^(lse_b - lse)`` comes from one fused softmax.
    ``g_logp``/``g_entropy`` are per-row upstream gradients or None (not both)."""
    z, tanh = _torch_transform_(tile, tr, keep_tanh=True)
    p_block = torch._softmax(z, 1, False, out=work)
    # dz_v = g_logp (onehot_v - p_v) - g_H p_v (z_v - Σ p·z); the chain rule to the raw logit x
    # (z = T⁻¹ softcap(logit_scale (x + b))) multiplies by k = logit_scale / T (and 1 - tanh²).
    # p_v = p_block_v · c with the per-row c = e^(lse_b - lse), folded into the row factors.
    # (z - Σ p·z) is formed first: expanding it as a + b·z cancels badly when |z| is large.
    k = tr.logit_scale / tr.temperature
    ck = torch.where(block_lse == float("-inf"), 0.0, (block_lse - lse).exp()).mul_(k)
    if g_entropy is not None:
        centred = z.sub_(mean_z[:, None])
        g_l = g_logp if g_logp is not None else torch.zeros_like(g_entropy)
        dz = p_block.mul_(torch.addcmul((g_l * -ck)[:, None], centred, (g_entropy * -ck)[:, None], out=z))
    else:
        dz = p_block.mul_((g_logp * -ck)[:, None])
    if masked_cols is not None:  # -inf bias: p = 0 and 0·(-inf) = NaN there; the gradient is 0
        dz.masked_fill_(masked_cols[None, :], 0.0)
    if g_logp is not None:
        local = labels - vocab_start
        in_block = (local >= 0) & (local < dz.shape[1])
        dz.scatter_add_(1, local.clamp(0, dz.shape[1] - 1)[:, None], torch.where(in_block, g_logp * k, 0.0)[:, None])
    if tanh is not None:  # softcap' = 1 - tanh²
        dz.mul_(torch.addcmul(torch.ones((), dtype=tanh.dtype), tanh, tanh, value=-1.0, out=tanh))
    return dz


def _triton_fold_forward(tile, bias, weight, labels, state: _ForwardState, vocab_start, tr, want_stats):
    """Launch ``linear_logprobs_fwd_kernel`` (one program per tile row; the kernel adds the bias
    and always accumulates the entropy sum: one FMA per logit)."""
    from ..kernels.linear_logprobs import linear_logprobs_fwd_kernel, pick_config

    n_rows, n_cols = tile.shape
    block_v, num_warps = pick_config(n_cols)
    linear_logprobs_fwd_kernel[(n_rows,)](
        tile, tile.stride(0), bias if bias is not None else weight, labels,
        state.shift, state.sum_exp, state.sum_z_exp, state.sum_sq_exp, state.sum_z, state.max_before_label,
        state.label_z,
        vocab_start, n_cols,
        float(tr.logit_scale), float(tr.softcap or 0.0), 1.0 / tr.temperature,
        int(bias is not None), int(want_stats),
        BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip


def _triton_tile_to_dx(tile, dx, bias, weight, labels, lse, mean_z, g_logp, g_entropy, vocab_start, tr):
    """Launch ``linear_logprobs_bwd_kernel``: raw logits ``tile`` -> ``dx`` (may alias ``tile``)."""
    from ..kernels.linear_logprobs import linear_logprobs_bwd_kernel, pick_config

    n_rows, n_cols = tile.shape
    block_v, num_warps = pick_config(n_cols)
    linear_logprobs_bwd_kernel[(n_rows, -(-n_cols // block_v))](
        tile, tile.stride(0), dx, dx.stride(0), bias if bias is not None else weight, labels,
        lse, mean_z, g_logp, g_entropy,
        vocab_start, n_cols,
        float(tr.logit_scale), float(tr.softcap or 0.0), 1.0 / tr.temperature, int(bias is not None),
        BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return dx


# --------------------------------------------------------------------------------------------
# The chunked algorithm, shared by the torch and triton backends
# --------------------------------------------------------------------------------------------
def _tiles(n_rows, vocab, plan: _Plan):
    """(vocab block outer, token chunk inner) tile coordinates."""
    for v0 in range(0, vocab, plan.block_cols):
        v1 = min(v0 + plan.block_cols, vocab)
        yield v0, v1, [(r0, min(r0 + plan.chunk_rows, n_rows)) for r0 in range(0, n_rows, plan.chunk_rows)]


def _has_neg_inf(bias):
    """A -inf bias entry removes a token from the vocabulary (one host sync per call)."""
    return bias is not None and bool(torch.isneginf(bias).any())


def _masked_cols(bias, v0, v1, tr, neg_inf_bias):
    """Columns of block [v0, v1) where z = -inf because the bias is -inf (softcap keeps z finite)."""
    if not neg_inf_bias or tr.softcap is not None:
        return None
    return torch.isneginf(bias[v0:v1])


def _gemm_operands(hidden, weight, cd):
    """On CUDA, GEMMs take the inputs' dtype (tensor cores) and write fp32; elsewhere everything is
    widened to the compute dtype once (CPU has no mixed-precision GEMM)."""
    return hidden if hidden.is_cuda else hidden.to(cd)


def _weight_block(weight, v0, v1, cd):
    blk = weight[v0:v1]
    return blk if blk.is_cuda else blk.to(cd)


def _chunked_forward(hidden, weight, bias, labels, tr: _Transform, plan: _Plan, want_entropy, want_stats):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cd = output_dtype(hidden.dtype)
    state = _ForwardState.empty(n_rows, cd, hidden.device)
    # torch fold only: per-block log-sum-exp of every row, [n_blocks, n_rows] (saved for backward)
    block_lse = None
    if plan.backend == "torch":
        block_lse = torch.empty(-(-vocab // plan.block_cols), n_rows, dtype=cd, device=hidden.device)
    if n_rows:
        h = _gemm_operands(hidden, weight, cd)
        bias_cd = bias.to(cd) if bias is not None else None
        neg_inf_bias = _has_neg_inf(bias_cd) if plan.backend == "torch" else False
        buf_elems = min(plan.chunk_rows, n_rows) * min(plan.block_cols, vocab)
        tile_buf = torch.empty(buf_elems, dtype=cd, device=hidden.device)
        work_buf = torch.empty(buf_elems, dtype=cd, device=hidden.device) if plan.backend == "torch" else None
        for v0, v1, chunks in _tiles(n_rows, vocab, plan):
            w_blk = _weight_block(weight, v0, v1, cd)
            for r0, r1 in chunks:
                shape = (r1 - r0, v1 - v0)
                tile = tile_buf[: shape[0] * shape[1]].view(shape)
                if plan.backend == "torch":
                    _mm_into(tile, h[r0:r1], w_blk.t(), bias=bias_cd[v0:v1] if bias is not None else None)
                    work = work_buf[: shape[0] * shape[1]].view(shape)
                    block_lse[v0 // plan.block_cols, r0:r1] = _torch_fold_forward(
                        tile, work, labels[r0:r1], state.rows(r0, r1), v0, tr, want_entropy, want_stats,
                        masked_cols=_masked_cols(bias_cd, v0, v1, tr, neg_inf_bias),
                    )
                else:
                    _mm_into(tile, h[r0:r1], w_blk.t())
                    _triton_fold_forward(tile, bias, weight, labels[r0:r1], state.rows(r0, r1), v0, tr,
                                         want_stats)  # fmt: skip
    lse = state.shift + state.sum_exp.log()
    logp = state.label_z - lse
    entropy = lse - state.sum_z_exp / state.sum_exp if want_entropy else None
    stats = None
    if want_stats:
        top = state.max_z if plan.backend == "torch" else state.shift
        stats = (
            state.sum_sq_exp.log() - 2.0 * state.sum_exp.log(),  # log Σp² = log q - 2 log s
            state.sum_z / vocab,
            (state.label_z >= top) & (state.label_z > state.max_before_label),
        )
    return logp, entropy, lse, stats, block_lse


def _chunked_backward(hidden, weight, bias, labels, lse, entropy, block_lse, g_logp, g_entropy, tr, plan, needs):
    n_rows, H = hidden.shape
    vocab = weight.shape[0]
    cd = output_dtype(hidden.dtype)
    device = hidden.device
    need_h, need_w, need_b = needs
    grad_hidden = torch.zeros(n_rows, H, dtype=cd, device=device) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=cd, device=device) if need_b else None
    if n_rows == 0:
        return grad_hidden, grad_weight, grad_bias

    mean_z = lse - entropy if g_entropy is not None else lse  # Σ p·z; unused without g_entropy
    if plan.backend == "triton":
        # the kernel reads both per-row gradients; a missing one is zero
        g_logp = g_logp if g_logp is not None else torch.zeros_like(lse)
        g_entropy = g_entropy if g_entropy is not None else torch.zeros_like(lse)
    h = _gemm_operands(hidden, weight, cd)
    bias_cd = bias.to(cd) if bias is not None else None
    neg_inf_bias = _has_neg_inf(bias_cd) if plan.backend == "torch" else False
    buf_elems = min(plan.chunk_rows, n_rows) * min(plan.block_cols, vocab)
    tile_buf = torch.empty(buf_elems, dtype=cd, device=device)
    work_buf = torch.empty(buf_elems, dtype=cd, device=device) if plan.backend == "torch" else None
    # Triton writes dx in the weight's dtype (GEMM operand dtype on the GPU); in place if that is cd
    dx_dtype = weight.dtype if plan.backend == "triton" else cd
    dx_buf = tile_buf if dx_dtype == cd else torch.empty(buf_elems, dtype=dx_dtype, device=device)
    gemm_dtype = h.dtype
    w_acc_buf = None
    if need_w and weight.dtype != cd:
        w_acc_buf = torch.empty(min(plan.block_cols, vocab) * H, dtype=cd, device=device)

    for v0, v1, chunks in _tiles(n_rows, vocab, plan):
        w_blk = _weight_block(weight, v0, v1, cd)
        if need_w:
            w_acc = grad_weight[v0:v1] if w_acc_buf is None else w_acc_buf[: (v1 - v0) * H].view(v1 - v0, H).zero_()
        for r0, r1 in chunks:
            shape = (r1 - r0, v1 - v0)
            tile = tile_buf[: shape[0] * shape[1]].view(shape)
            dx = dx_buf[: shape[0] * shape[1]].view(shape)
            bias_blk = bias_cd[v0:v1] if bias is not None and plan.backend == "torch" else None
            _mm_into(tile, h[r0:r1], w_blk.t(), bias=bias_blk)  # Triton adds the bias in its kernel
            rows = slice(r0, r1)
            gl = g_logp[rows] if g_logp is not None else None
            ge = g_entropy[rows] if g_entropy is not None else None
            if plan.backend == "torch":
                work = work_buf[: shape[0] * shape[1]].view(shape)
                dx = _torch_tile_to_dx(tile, work, labels[rows], block_lse[v0 // plan.block_cols, rows], lse[rows],
                                       mean_z[rows], gl, ge, v0, tr,
                                       masked_cols=_masked_cols(bias_cd, v0, v1, tr, neg_inf_bias))  # fmt: skip
            else:
                _triton_tile_to_dx(tile, dx, bias, weight, labels[rows], lse[rows], mean_z[rows], gl, ge, v0, tr)
            dx_gemm = dx if dx.dtype == gemm_dtype else dx.to(gemm_dtype)
            if need_h:
                _addmm_into(grad_hidden[rows], dx_gemm, w_blk)  # grad_h[chunk] += dx @ W[block]
            if need_w:
                _addmm_into(w_acc, dx_gemm.t(), h[rows])  # grad_W[block] += dx.T @ h[chunk]
            if need_b:
                grad_bias[v0:v1] += dx.sum(0, dtype=cd)  # grad_b[block] += Σ_rows dx
        if need_w and w_acc_buf is not None:
            grad_weight[v0:v1].copy_(w_acc)
    return grad_hidden, grad_weight, grad_bias


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd over the compact (valid-only) rows. Inputs: ``hidden [n, H]``, ``weight [V, H]``,
    ``bias [V] | None``, ``labels [n]`` int64 in ``[0, V)``. Outputs ``(logp, entropy | None,
    log_sum_sq_probs | None, mean_logit | None, is_top1 | None, lse)``; saves the inputs plus lse
    and entropy (two numbers per row; the torch fold also one lse per row and vocab block)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tr, plan, want_entropy, want_stats):
        ctx.set_materialize_grads(False)
        with torch.autocast(hidden.device.type, enabled=False):
            logp, entropy, lse, stats, block_lse = _chunked_forward(hidden, weight, bias, labels, tr, plan,
                                                                    want_entropy, want_stats)  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if entropy is not None else lse, block_lse)
        ctx.tr, ctx.plan, ctx.has_entropy = tr, plan, entropy is not None
        stats = stats if stats is not None else (None, None, None)
        ctx.mark_non_differentiable(lse, *(x for x in stats if x is not None))
        return logp, entropy, *stats, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, labels, lse, entropy, block_lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if not ctx.has_entropy:
            grad_entropy = None
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None, None
        cd = lse.dtype
        g_logp = grad_logp.to(cd).contiguous() if grad_logp is not None else None
        g_entropy = grad_entropy.to(cd).contiguous() if grad_entropy is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight, grad_bias = _chunked_backward(
                hidden, weight, bias, labels, lse, entropy, block_lse, g_logp, g_entropy, ctx.tr, ctx.plan, needs
            )
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None, None, None, None, None,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def _check_positive_int(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _validate(hidden, weight, labels, bias, temperature, logit_scale, softcap):
    check_tensor("hidden", hidden, floating=True, ndim_min=1)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if bias is not None:
        check_tensor("bias", bias, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the lm_head weight), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have a non-empty vocabulary dimension (shape[0])")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]})"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = check_temperature(temperature)
    logit_scale = float(logit_scale)
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale}")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0.0 or not math.isfinite(softcap):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return _Transform(logit_scale, softcap, temperature)


def _make_plan(backend, device, n_rows, vocab, chunk_size, vocab_block_size) -> _Plan:
    on_gpu = device.type == "cuda"
    chunk = chunk_size or (_GPU_CHUNK_ROWS if on_gpu else _CPU_CHUNK_ROWS)
    chunk = max(1, min(chunk, n_rows))
    if vocab_block_size is None:
        budget = _GPU_TILE_ELEMENTS if on_gpu else _CPU_TILE_ELEMENTS
        vocab_block_size = max(_BLOCK_ALIGN, budget // chunk // _BLOCK_ALIGN * _BLOCK_ALIGN)
        if backend == "torch":
            vocab_block_size = min(vocab_block_size, _CPU_MAX_BLOCK)
    return _Plan(backend, chunk, min(vocab_block_size, vocab))


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
            ``ALIGNKERNELS_BACKEND`` overrides), ``"triton"``, ``"cuda"`` (same as triton for this
            op), ``"torch"`` or ``"reference"`` (materialised logits).
        check_labels: verify every label is in range (one reduction + one host sync). ``None``
            follows ``ALIGNKERNELS_CHECK_LABELS`` (on unless ``0``).
        process_group, vocab_start, vocab_size: vocab-parallel lm_head (tensor parallel): this
            rank holds rows ``[vocab_start, vocab_start + weight.shape[0])`` of a ``[vocab_size, H]``
            head (``bias`` its slice); labels are global ids. Two O(N) all-reduces forward, local
            backward plus one ``grad_hidden`` all-reduce. See ``alignkernels.ops.vocab_parallel``.

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
    if process_group is not None:
        from .vocab_parallel import vocab_parallel_linear_logprobs

        if vocab_start is None or vocab_size is None:
            raise ValueError("process_group= (vocab-parallel lm_head) needs vocab_start= and vocab_size= (global V)")
        if return_stats:
            raise ValueError("return_stats=True is not supported with process_group=")
        return vocab_parallel_linear_logprobs(
            hidden, weight, labels, vocab_start=vocab_start, vocab_size=vocab_size, process_group=process_group,
            bias_shard=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size,
            vocab_block_size=vocab_block_size, backend=backend, check_labels=check_labels,
        )  # fmt: skip
    tr = _validate(hidden, weight, labels, bias, temperature, logit_scale, softcap)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    vocab_block_size = _check_positive_int("vocab_block_size", vocab_block_size)
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    vocab, H = weight.shape
    if labels_checking_enabled(check_labels):
        check_label_range(labels, vocab, ignore_index)

    if backend == "reference":
        from ..reference import linear_logprobs_reference, linear_logprobs_stats_reference

        kwargs = dict(bias=bias, temperature=tr.temperature, logit_scale=tr.logit_scale, softcap=tr.softcap,
                      ignore_index=ignore_index)  # fmt: skip
        if return_stats:
            return LinearLogprobsOutput(*linear_logprobs_stats_reference(hidden, weight, labels, **kwargs))
        return linear_logprobs_reference(hidden, weight, labels, return_entropy=return_entropy, **kwargs)
    if backend == "cuda":
        backend = "triton"  # GEMM-bound op: the cuBLAS-tile path is the CUDA path

    flat_hidden = hidden.reshape(-1, H)
    flat_labels = labels.reshape(-1)
    n_total = flat_labels.numel()
    valid = flat_labels != ignore_index
    rows = valid.nonzero().squeeze(1)  # host sync: sizes the compact problem
    if rows.numel() == n_total:
        rows = None  # nothing ignored: no copy
        compact_hidden = flat_hidden.contiguous()
        compact_labels = flat_labels.long()
    else:
        compact_hidden = flat_hidden.index_select(0, rows)
        compact_labels = flat_labels.index_select(0, rows).long()
    compact_labels = compact_labels.contiguous()
    plan = _make_plan(backend, hidden.device, compact_labels.numel(), vocab, chunk_size, vocab_block_size)
    want_entropy = return_entropy or return_stats
    outs = LinearLogprobsFunction.apply(
        compact_hidden, weight, bias.contiguous() if bias is not None else None, compact_labels, tr, plan,
        want_entropy, return_stats,
    )  # fmt: skip

    def expand(x):
        if rows is not None:
            x = torch.zeros(n_total, dtype=x.dtype, device=x.device).index_copy(0, rows, x)
        return x.view(labels.shape)

    logp, entropy, log_sum_sq_probs, mean_logit, is_top1, lse = outs
    if return_stats:
        return LinearLogprobsOutput(*(expand(x) for x in (logp, entropy, log_sum_sq_probs, mean_logit, is_top1, lse)))
    if return_entropy:
        return expand(logp), expand(entropy)
    return expand(logp)
