"""Triton kernels for ``token_logprobs``: per-row log-prob of the label and entropy of
softmax(logits / T), without ever writing a softmax.

Memory model (what bounds these kernels): they are bandwidth-bound. Forward reads each logit
once (N·V·b bytes, b = 2 for bf16) and writes 16 bytes per row (logp + ``ROW_STATS``); backward reads each logit once
and writes its gradient once (2·N·V·b bytes). Nothing of size N·V is allocated besides the
gradient itself. Compute per element is one exp (+ a few FMAs), far below the SFU/FMA roof.

One program handles one row (N rows -> N programs; N is thousands in training) and walks the
vocabulary in BLOCK_V tiles, merging each tile's centred statistics into the row's running ones
(``kernels/_softmax.py`` holds the math and its derivation). Forward writes logp and the row's
``ROW_STATS = (row_max, log_sum, entropy)`` (one ``[3, N]`` fp32 tensor, field offsets below); backward
reads them back and forms ``p`` and ``z - Σp·z`` relative to the row max.

Row addressing supports a leading [outer, inner] layout with independent strides, so
``logits[:, :-1, :]`` (the usual shifted slice) is read in place, without a copy. All row
offsets are int64: N·V passes 2^31 at 16k tokens x 152k vocab.

The sampler's kept set (``support=``, ``alignkernels/ops/_support.py``): with ``HAS_SUPPORT`` each
program also reads its row's packed int32 bits (``[N, ceil(V/32)]``, bit ``v % 32`` LSB first of
word ``v // 32``; ``V/8`` bytes per row, ~1/16 of bf16 logits) tile by tile (``_softmax.kept_logits``),
and every logit outside the set is ``-inf`` before the online statistics and in the backward's
recompute: ``p = 0`` there, so logp, entropy and gradient are those of the distribution
renormalised over the kept set with no other formula. A label outside it gets ``-inf`` (the torch
backend's value; the op checks labels first unless told not to). ``HAS_SUPPORT`` is a constexpr: the
default path compiles as without it, the kept-set path is its own variant (a runtime flag made every
backward carry the words' registers: 104 on sm_80, against 45 / 64 for the two variants now).
"""
import itertools

import triton
import triton.language as tl

from ._softmax import (
    ENTROPY,
    GRAD_ENTROPY,
    GRAD_LOGP,
    LOG_SUM,
    ROW_MAX,
    ROW_STATS,
    centred,
    centred_stats,
    finalise,
    grad_centred,
    kept_logits,
    log_prob,
    merge_stats,
)

# (BLOCK_V, num_warps): every config the launcher can choose; tests compile each one to cubin.
TOKEN_LOGPROBS_CONFIGS = ((256, 2), (1024, 4), (4096, 8))

def pick_config(vocab_size: int):
    """Smallest tile that covers the row, else the largest (many iterations over a big vocab)."""
    for block_v, num_warps in TOKEN_LOGPROBS_CONFIGS:
        if vocab_size <= block_v:
            return block_v, num_warps
    return TOKEN_LOGPROBS_CONFIGS[-1]


@triton.jit
def _row_start(logits_ptr, row, rows_per_outer, stride_outer, stride_inner):
    """Pointer to row ``row`` (int64) of the logits: the [outer, inner] decomposition of the
    flattened leading dims."""
    return logits_ptr + (row // rows_per_outer) * stride_outer + (row % rows_per_outer) * stride_inner


@triton.jit
def token_logprobs_fwd_kernel(
    logits_ptr,  # [*, V] logits, last dim contiguous, any float dtype
    labels_ptr,  # [N] int32 / int64
    logp_ptr,  # [N] fp32 out: log p(label) (0 where ignored)
    stats_ptr,  # [len(ROW_STATS), N] fp32 out (0 where ignored)
    support_ptr,  # [N, ceil(V/32)] int32 kept-token bits, row stride support_stride (read if HAS_SUPPORT)
    support_stride,
    V,
    rows_per_outer,
    stride_outer,
    stride_inner,
    inv_temperature,
    ignore_index,
    HAS_SUPPORT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.num_programs(0)
    row_ptr = _row_start(logits_ptr, row, rows_per_outer, stride_outer, stride_inner)
    support_row_ptr = support_ptr + row * support_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    is_ignored = label == ignore_index
    # Ignored rows (prompt, padding) skip the vocabulary walk entirely: zero bytes read.
    n_cols = tl.where(is_ignored, 0, V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        y = kept_logits(y, support_row_ptr, cols, cols < V, HAS_SUPPORT)
        m_b, s_b, t_b, _ = centred_stats(y, inv_temperature)
        m, s, t, _, _ = merge_stats(m, s, t, m_b, s_b, t_b)

    log_sum, entropy = finalise(s, t)
    # A label outside [0, V) (only possible with the range check disabled) yields NaN, never
    # an out-of-bounds read.
    label_in_range = (label >= 0) & (label < V)
    y_label = tl.load(row_ptr + label, mask=label_in_range & ~is_ignored, other=float("nan")).to(tl.float32)
    y_label = kept_logits(y_label, support_row_ptr, label, label_in_range & ~is_ignored, HAS_SUPPORT)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    logp = log_prob(centred(y_label, inv_temperature, m_safe), log_sum)

    tl.store(logp_ptr + row, tl.where(is_ignored, 0.0, logp))
    tl.store(stats_ptr + ROW_MAX * n + row, tl.where(is_ignored, 0.0, m))
    tl.store(stats_ptr + LOG_SUM * n + row, tl.where(is_ignored, 0.0, log_sum))
    tl.store(stats_ptr + ENTROPY * n + row, tl.where(is_ignored, 0.0, entropy))


@triton.jit
def token_logprobs_bwd_kernel(
    logits_ptr,  # [*, V] logits (same layout as forward)
    labels_ptr,  # [N]
    stats_ptr,  # [len(ROW_STATS), N] fp32 from forward
    grads_ptr,  # [len(GRADS), N] fp32 upstream gradients (rows read only where HAS_GRAD_*)
    grad_logits_ptr,  # [N, V] out, contiguous, dtype of logits
    support_ptr,  # as forward
    support_stride,
    V,
    rows_per_outer,
    stride_outer,
    stride_inner,
    inv_temperature,
    ignore_index,
    HAS_SUPPORT: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.num_programs(0)
    row_ptr = _row_start(logits_ptr, row, rows_per_outer, stride_outer, stride_inner)
    grad_row_ptr = grad_logits_ptr + row * V
    support_row_ptr = support_ptr + row * support_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    is_ignored = label == ignore_index

    m = tl.load(stats_ptr + ROW_MAX * n + row)
    log_sum = tl.load(stats_ptr + LOG_SUM * n + row)
    entropy = tl.load(stats_ptr + ENTROPY * n + row)
    g_logp = tl.zeros((), tl.float32)
    g_entropy = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grads_ptr + GRAD_LOGP * n + row)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grads_ptr + GRAD_ENTROPY * n + row)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        y = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        y = kept_logits(y, support_row_ptr, cols, in_row, HAS_SUPPORT)  # p = 0, dz = 0 outside the kept set
        dz = grad_centred(centred(y, inv_temperature, m), cols == label, log_sum, entropy, g_logp, g_entropy)
        dlogits = tl.where(is_ignored, 0.0, dz * inv_temperature)  # d logits = dz / T
        tl.store(grad_row_ptr + cols, dlogits.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _compile_cases():
    """Every (kernel, signature, constexprs, num_warps) the launcher can produce, for the cubin test."""
    cases = []
    scalars = dict(support_ptr="*i32", support_stride="i64", V="i32", rows_per_outer="i64", stride_outer="i64",
                   stride_inner="i64", inv_temperature="fp32", ignore_index="i32", HAS_SUPPORT="constexpr")  # fmt: skip
    for dtype, (block_v, num_warps), support in itertools.product(("fp32", "bf16", "fp16"), TOKEN_LOGPROBS_CONFIGS,
                                                                  (False, True)):  # fmt: skip
        fwd_sig = dict(logits_ptr=f"*{dtype}", labels_ptr="*i64", logp_ptr="*fp32", stats_ptr="*fp32",
                       **scalars, BLOCK_V="constexpr")  # fmt: skip
        cases.append(dict(kernel=token_logprobs_fwd_kernel, signature=fwd_sig,
                          constexprs=dict(HAS_SUPPORT=support, BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
        for has_logp, has_entropy in ((True, False), (True, True), (False, True)):
            bwd_sig = dict(logits_ptr=f"*{dtype}", labels_ptr="*i64", stats_ptr="*fp32",
                           grads_ptr="*fp32", grad_logits_ptr=f"*{dtype}", **scalars,
                           HAS_GRAD_LOGP="constexpr", HAS_GRAD_ENTROPY="constexpr",
                           BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=token_logprobs_bwd_kernel, signature=bwd_sig,
                              constexprs=dict(HAS_SUPPORT=support, HAS_GRAD_LOGP=has_logp,
                                              HAS_GRAD_ENTROPY=has_entropy, BLOCK_V=block_v),
                              num_warps=num_warps))  # fmt: skip
    return cases


COMPILE_CASES = _compile_cases()
