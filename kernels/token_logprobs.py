"""Triton kernels for ``token_logprobs``: per-row log-prob of the label and entropy of
softmax(logits / T), without ever writing a softmax.

Memory model (what bounds these kernels): they are bandwidth-bound. Forward reads each logit
once (N·V·b bytes, b = 2 for bf16) and writes 12 bytes per row; backward reads each logit once
and writes its gradient once (2·N·V·b bytes). Nothing of size N·V is allocated besides the
gradient itself. Compute per element is one exp (+ a few FMAs), far below the SFU/FMA roof.

One program handles one row (N rows -> N programs; N is thousands in training) and walks the
vocabulary in BLOCK_V tiles with an online log-sum-exp that also carries Σ z·e^(z-m):

    m  = running max of z                   (z = logits / T)
    s  = Σ e^(z - m)                        -> lse = m + log s
    t  = Σ (z - m) · e^(z - m)              -> Σ p·(z - m) = t / s
    entropy H = -Σ p log p = lse - Σ p·z = log s - t / s     (no p·log p term, no second pass)

t is carried relative to the running max so that neither t nor H loses digits when all logits
sit far from 0 (e.g. +1e4): on a max update m -> m', t' = e^(m - m') · (t + s·(m - m')).

Row addressing supports a leading [outer, inner] layout with independent strides, so
``logits[:, :-1, :]`` (the usual shifted slice) is read in place, without a copy. All row
offsets are int64: N·V passes 2^31 at 16k tokens x 152k vocab.
"""
import triton
import triton.language as tl

# (BLOCK_V, num_warps): every config the launcher can choose; tests compile each one to cubin.
TOKEN_LOGPROBS_CONFIGS = ((256, 2), (1024, 4), (4096, 8))


def pick_config(vocab_size: int):
    """Smallest tile that covers the row, else the largest (many iterations over a big vocab)."""
    for block_v, num_warps in TOKEN_LOGPROBS_CONFIGS:
        if vocab_size <= block_v:
            return block_v, num_warps
    return TOKEN_LOGPROBS_CONFIGS[-1]


@triton.jit
def _row_offset(row, rows_per_outer, stride_outer, stride_inner):
    # row is int64; [outer, inner] decomposition of the flattened leading dims.
    return (row // rows_per_outer) * stride_outer + (row % rows_per_outer) * stride_inner


@triton.jit
def token_logprobs_fwd_kernel(
    logits_ptr,  # [*, V] logits, last dim contiguous, any float dtype
    labels_ptr,  # [N] int32 / int64
    logp_ptr,  # [N] fp32 out: log p(label)          (0 where ignored)
    lse_ptr,  # [N] fp32 out: logsumexp(z)           (saved for backward)
    entropy_ptr,  # [N] fp32 out: entropy of softmax(z) (0 where ignored)
    V,
    rows_per_outer,
    stride_outer,
    stride_inner,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_per_outer, stride_outer, stride_inner)
    label = tl.load(labels_ptr + row).to(tl.int64)
    is_ignored = label == ignore_index
    # Ignored rows (prompt, padding) skip the vocabulary walk entirely: zero bytes read.
    n_cols = tl.where(is_ignored, 0, V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)  # rescales the running sums to the new max (0 on the first tile)
        e = tl.exp(z - m_new)  # 0 on masked lanes and at z = -inf
        # Re-centre t on m_new (guards: s = 0 and alpha = 0 on the first tile, where m = -inf).
        t = tl.where(alpha > 0, (t + tl.where(s > 0, s * (m - m_new), 0.0)) * alpha, 0.0)
        t += tl.sum(tl.where(e == 0.0, 0.0, e * (z - m_new)), axis=0)  # 0·(-inf) would be NaN
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s  # H = lse - Σ p·z = log s - Σ p·(z - m)
    # A label outside [0, V) (only possible with the range check disabled) yields NaN, never
    # an out-of-bounds read.
    label_in_range = (label >= 0) & (label < V)
    z_label = tl.load(row_ptr + label, mask=label_in_range & ~is_ignored, other=float("nan")).to(tl.float32)
    logp = (z_label * inv_temperature - m) - log_s

    tl.store(logp_ptr + row, tl.where(is_ignored, 0.0, logp))
    tl.store(lse_ptr + row, tl.where(is_ignored, 0.0, lse))
    tl.store(entropy_ptr + row, tl.where(is_ignored, 0.0, entropy))


@triton.jit
def token_logprobs_bwd_kernel(
    logits_ptr,  # [*, V] logits (same layout as forward)
    labels_ptr,  # [N]
    lse_ptr,  # [N] fp32 from forward
    entropy_ptr,  # [N] fp32 from forward
    grad_logp_ptr,  # [N] upstream gradient of logp     (unused if not HAS_GRAD_LOGP)
    grad_entropy_ptr,  # [N] upstream gradient of entropy (unused if not HAS_GRAD_ENTROPY)
    grad_logits_ptr,  # [N, V] out, contiguous, dtype of logits
    V,
    rows_per_outer,
    stride_outer,
    stride_inner,
    inv_temperature,
    ignore_index,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_per_outer, stride_outer, stride_inner)
    grad_row_ptr = grad_logits_ptr + row * V
    label = tl.load(labels_ptr + row).to(tl.int64)
    is_ignored = label == ignore_index

    lse = tl.load(lse_ptr + row)
    mean_z = lse - tl.load(entropy_ptr + row)  # Σ p·z = lse - H
    g_logp = tl.zeros((), tl.float32)
    g_entropy = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse)
        # d logp / dz_i = onehot_i - p_i
        # d H    / dz_i = -p_i (z_i - Σ p·z)
        # dz_i = g_logp (onehot_i - p_i) - g_H p_i (z_i - Σ p·z);   d logits = dz / T
        dz = tl.where(p == 0.0, 0.0, -p * (g_logp + g_entropy * (z - mean_z)))  # z = -inf: p = 0, no NaN
        dz += tl.where(cols == label, g_logp, 0.0)
        dlogits = tl.where(is_ignored, 0.0, dz * inv_temperature)
        tl.store(grad_row_ptr + cols, dlogits.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _compile_cases():
    """Every (kernel, signature, constexprs, num_warps) the launcher can produce, for the cubin test."""
    cases = []
    for dtype in ("fp32", "bf16", "fp16"):
        rows = dict(V="i32", rows_per_outer="i64", stride_outer="i64", stride_inner="i64",
                    inv_temperature="fp32", ignore_index="i32")  # fmt: skip
        for block_v, num_warps in TOKEN_LOGPROBS_CONFIGS:
            fwd_sig = dict(logits_ptr=f"*{dtype}", labels_ptr="*i64", logp_ptr="*fp32", lse_ptr="*fp32",
                           entropy_ptr="*fp32", **rows, BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=token_logprobs_fwd_kernel, signature=fwd_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
            for has_logp, has_entropy in ((True, False), (True, True), (False, True)):
                bwd_sig = dict(logits_ptr=f"*{dtype}", labels_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32",
                               grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", grad_logits_ptr=f"*{dtype}",
                               **rows, HAS_GRAD_LOGP="constexpr", HAS_GRAD_ENTROPY="constexpr",
                               BLOCK_V="constexpr")  # fmt: skip
                cases.append(dict(kernel=token_logprobs_bwd_kernel, signature=bwd_sig,
                                  constexprs=dict(HAS_GRAD_LOGP=has_logp, HAS_GRAD_ENTROPY=has_entropy,
                                                  BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
    return cases


COMPILE_CASES = _compile_cases()
