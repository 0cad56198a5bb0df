"""Triton kernels for ``linear_logprobs``: fold one fp32 logits tile ``[rows, cols]`` (produced by
cuBLAS, see ``alignkernels/ops/_lmhead_engine.py``) into per-token online softmax statistics
(forward), or turn it into the gradient w.r.t. the raw logits (backward).

Memory model. The launcher keeps one reusable fp32 tile of ``chunk x block`` logits (about
256 MB on a GPU); everything else is per token. Both kernels are bandwidth-bound on that tile:
forward reads it once (4 bytes/logit), backward reads it once and writes ``dx`` once in the
weight's dtype (4 + 2 bytes/logit for bf16). Per token the forward carries, across vocab blocks,
the ``FOLD_STATE`` fields (one ``[8, rows]`` fp32 tensor):

    m, s, t  centred online sums (``kernels/_softmax.py``)  -> row_max, log_sum = log s, H = log s - t/s
    q   = Σ e^(2(z-m))             -> log Σp² = log q - 2 log s          (optional statistics only)
    zs  = Σ z                      -> mean logit = zs / V
    my, mb = max of y, max of y over v < label  -> label is the (first) argmax iff y_label >= my > ... > mb
    y_label (pre-temperature)      -> is_top1
    zl  = z_label - m, re-centred on every merge (zl += m_old - m_new)  -> logp = zl - log_sum

where ``y = f(x + b)`` (logit_scale, optional softcap: ``_softmax.transform``), ``z = y / T``,
``x`` the raw tile, ``b`` the bias. The backward reads the saved ``ROW_STATS`` (``row_max, log_sum,
entropy``, as ``token_logprobs``) and forms ``p`` and ``z - Σp·z`` relative to ``row_max``. Row
offsets are int64 (``rows x stride`` passes 2^31 at 4096 x 1M).

Switches that only change a scalar branch (bias present, softcap, optional statistics) are runtime
arguments, not constexprs: the branches are uniform per program, cost nothing next to the tile
traffic, and keep the number of compiled variants (``COMPILE_CASES``) small. Without a bias the
launcher passes the weight as a never-read placeholder pointer, so ``bias_ptr`` always has the
weight's dtype. No ``tl.dot`` (interpreter-safe).

The sampler's kept set (``support=``): with ``has_support`` (runtime flag, like the others) each
program reads its row's packed int32 words (``[rows, ceil(V/32)]``, global vocabulary ids
``vocab_start + col``) for the columns it touches and sets the logits outside the set to ``-inf``
(``_softmax.kept_logits``) before the statistics and in the backward's recompute; the label's logit
too (a label outside the set: logp ``-inf``). ``V/8`` extra bytes read per row and tile pass.
"""
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
    grad_centred,
    kept_logits,
    merge_stats,
    transform,
)

# The forward's running per-row state: rows of one [len(FOLD_STATE), rows] fp32 tensor, in this order.
# (m, s, t) are the centred online sums of ``_softmax``; the rest feed the optional statistics.
FOLD_STATE = ("row_max", "sum_exp", "sum_centred", "sum_sq_exp", "sum_z", "max_y", "max_y_before_label", "label_y",
              "label_centred")  # fmt: skip
FOLD_ROW_MAX, SUM_EXP, SUM_CENTRED, SUM_SQ_EXP, SUM_Z, MAX_Y, MAX_Y_BEFORE_LABEL, LABEL_Y, LABEL_CENTRED = (
    tl.constexpr(i) for i in range(len(FOLD_STATE))
)

# (BLOCK_V, num_warps): every config the launcher can choose; tests compile each one to cubin.
LINEAR_LOGPROBS_CONFIGS = ((256, 2), (1024, 4), (2048, 8))


def pick_config(n_cols: int):
    """Smallest tile that covers the tile row, else the largest."""
    for block_v, num_warps in LINEAR_LOGPROBS_CONFIGS:
        if n_cols <= block_v:
            return block_v, num_warps
    return LINEAR_LOGPROBS_CONFIGS[-1]


@triton.jit
def _load_transformed(row_ptr, bias_ptr, cols, in_tile, vocab_start, logit_scale, softcap, has_bias):
    """``(y, dy/dx)`` at the tile columns ``cols``: ``y = f(x + b)`` (pre-temperature, see ``_softmax``)."""
    x = tl.load(row_ptr + cols, mask=in_tile, other=0.0).to(tl.float32)
    if has_bias:
        x += tl.load(bias_ptr + vocab_start + cols, mask=in_tile, other=0.0).to(tl.float32)
    return transform(x, logit_scale, softcap)


@triton.jit
def linear_logprobs_fwd_kernel(
    tile_ptr,  # [rows, n_cols] fp32 raw logits h @ W[v0:v1].T (row stride tile_stride)
    tile_stride,
    bias_ptr,  # [V] bias (weight dtype), read only if has_bias
    labels_ptr,  # [rows] int64 labels of the chunk (never ignore_index: rows were compacted)
    state_ptr,  # [len(FOLD_STATE), rows] fp32 in/out, field stride state_stride
    state_stride,
    support_ptr,  # [rows, ceil(V/32)] int32 kept-token words (row stride support_stride), read if has_support
    support_stride,
    vocab_start,
    n_cols,
    logit_scale,
    softcap,  # > 0 enables soft-capping; 0 disables it
    inv_temperature,
    has_bias,
    compute_stats,
    has_support,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * tile_stride
    support_row_ptr = support_ptr + row * support_stride
    state = state_ptr + row
    local_label = tl.load(labels_ptr + row) - vocab_start  # label's column in this tile

    m = tl.load(state + FOLD_ROW_MAX * state_stride)
    s = tl.load(state + SUM_EXP * state_stride)
    t = tl.load(state + SUM_CENTRED * state_stride)
    q = tl.load(state + SUM_SQ_EXP * state_stride)
    zs = tl.load(state + SUM_Z * state_stride)
    my = tl.load(state + MAX_Y * state_stride)
    mb = tl.load(state + MAX_Y_BEFORE_LABEL * state_stride)
    m_in = m  # the max before this tile: the label's centred value moves with it
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_tile = cols < n_cols
        y, _ = _load_transformed(row_ptr, bias_ptr, cols, in_tile, vocab_start, logit_scale, softcap, has_bias)
        y = tl.where(in_tile, y, float("-inf"))
        y = kept_logits(y, support_row_ptr, vocab_start + cols, in_tile, has_support)
        m_b, s_b, t_b, e = centred_stats(y, inv_temperature)
        m, s, t, a_old, a_block = merge_stats(m, s, t, m_b, s_b, t_b)
        if compute_stats:
            q = q * a_old * a_old + tl.sum(e * e, axis=0) * a_block * a_block  # Σ e^(2(z-m)) rescales by a²
            zs += tl.sum(tl.where(in_tile, y * inv_temperature, 0.0), axis=0)
            # (tl.max drops a NaN, compiled or interpreted: is_top1 of a NaN row is made False from
            # the row's NaN log-prob, in alignkernels/ops/_lmhead_engine.py label_is_top1)
            my = tl.maximum(my, tl.max(y, axis=0))
            # first-argmax semantics: a tie with an earlier token means the label is not top-1
            mb = tl.maximum(mb, tl.max(tl.where(cols < local_label, y, float("-inf")), axis=0))
    tl.store(state + FOLD_ROW_MAX * state_stride, m)
    tl.store(state + SUM_EXP * state_stride, s)
    tl.store(state + SUM_CENTRED * state_stride, t)
    if compute_stats:
        tl.store(state + SUM_SQ_EXP * state_stride, q)
        tl.store(state + SUM_Z * state_stride, zs)
        tl.store(state + MAX_Y * state_stride, my)
        tl.store(state + MAX_Y_BEFORE_LABEL * state_stride, mb)

    if (local_label >= 0) & (local_label < n_cols):
        y_label, _ = _load_transformed(row_ptr, bias_ptr, local_label, local_label < n_cols, vocab_start,
                                       logit_scale, softcap, has_bias)  # fmt: skip
        y_label = kept_logits(y_label, support_row_ptr, vocab_start + local_label, local_label < n_cols, has_support)
        tl.store(state + LABEL_Y * state_stride, y_label)
        tl.store(state + LABEL_CENTRED * state_stride,
                 centred(y_label, inv_temperature, tl.where(m == float("-inf"), 0.0, m)))
    else:  # seen in an earlier tile (or not yet: NaN stays NaN): re-centre on the new max
        m_in_safe = tl.where(m_in == float("-inf"), m, m_in)
        zl = tl.load(state + LABEL_CENTRED * state_stride)
        tl.store(state + LABEL_CENTRED * state_stride, zl + (m_in_safe - m))


@triton.jit
def linear_logprobs_bwd_kernel(
    tile_ptr,  # [rows, n_cols] fp32 raw logits (recomputed), row stride tile_stride
    tile_stride,
    dx_ptr,  # [rows, n_cols] out: d loss / d raw logits, weight dtype (may alias tile_ptr if fp32)
    dx_stride,
    bias_ptr,  # [V] bias (weight dtype), read only if has_bias
    labels_ptr,  # [rows] int64
    saved_ptr,  # [len(ROW_STATS), rows] fp32 row state from forward, field stride row_stride
    grads_ptr,  # [2, rows] (``GRADS``) fp32 upstream gradients (zeros where none), field stride row_stride
    row_stride,
    support_ptr,  # as forward
    support_stride,
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    has_bias,
    has_support,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_tile = cols < n_cols
    y, dy_dx = _load_transformed(tile_ptr + row * tile_stride, bias_ptr, cols, in_tile, vocab_start, logit_scale,
                                 softcap, has_bias)  # fmt: skip
    y = kept_logits(y, support_ptr + row * support_stride, vocab_start + cols, in_tile, has_support)  # p = 0 outside
    m = tl.load(saved_ptr + ROW_MAX * row_stride + row)
    log_sum = tl.load(saved_ptr + LOG_SUM * row_stride + row)
    entropy = tl.load(saved_ptr + ENTROPY * row_stride + row)
    g_logp = tl.load(grads_ptr + GRAD_LOGP * row_stride + row)
    g_entropy = tl.load(grads_ptr + GRAD_ENTROPY * row_stride + row)
    is_label = cols == tl.load(labels_ptr + row) - vocab_start
    dz = grad_centred(centred(y, inv_temperature, m), is_label, log_sum, entropy, g_logp, g_entropy)
    # chain rule back to the raw logit x: z = f(x + b) / T
    dx = dz * inv_temperature * dy_dx
    tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_tile)


def _compile_cases():
    """Every (kernel, signature, constexprs, num_warps) the launcher can produce, for the cubin test.

    The tile is always fp32; the bias pointer (or its placeholder, the weight) and ``dx`` have the
    weight's dtype."""
    cases = []
    scalars = dict(support_ptr="*i32", support_stride="i32", vocab_start="i32", n_cols="i32", logit_scale="fp32",
                   softcap="fp32", inv_temperature="fp32", has_bias="i32")  # fmt: skip
    for dtype in ("fp32", "bf16", "fp16"):
        for block_v, num_warps in LINEAR_LOGPROBS_CONFIGS:
            fwd_sig = dict(tile_ptr="*fp32", tile_stride="i32", bias_ptr=f"*{dtype}", labels_ptr="*i64",
                           state_ptr="*fp32", state_stride="i32", **scalars, compute_stats="i32",
                           has_support="i32", BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=linear_logprobs_fwd_kernel, signature=fwd_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
            bwd_sig = dict(tile_ptr="*fp32", tile_stride="i32", dx_ptr=f"*{dtype}", dx_stride="i32",
                           bias_ptr=f"*{dtype}", labels_ptr="*i64", saved_ptr="*fp32", grads_ptr="*fp32",
                           row_stride="i32", **scalars, has_support="i32", BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=linear_logprobs_bwd_kernel, signature=bwd_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
    return cases


COMPILE_CASES = _compile_cases()
