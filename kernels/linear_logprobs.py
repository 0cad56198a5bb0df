"""Triton kernels for ``linear_logprobs``: fold one fp32 logits tile ``[rows, cols]`` (produced by
cuBLAS, see ``alignkernels/ops/linear_logprobs.py``) into per-token online softmax statistics
(forward), or turn it in place into the gradient w.r.t. the raw logits (backward).

Memory model. The launcher keeps one reusable fp32 tile of ``chunk x block`` logits (about
256 MB on a GPU); everything else is per token. Both kernels are bandwidth-bound on that tile:
forward reads it once (4 bytes/logit), backward reads it once and writes ``dz`` once in the
weight's dtype (4 + 2 bytes/logit for bf16). Per token the forward carries, across vocab blocks,

    m   = running max of z
    s   = Σ e^(z-m)                -> lse = m + log s
    t   = Σ z·e^(z-m)              -> Σp·z = t / s,   entropy H = lse - Σp·z
    and, for the optional statistics (``compute_stats``):
    q   = Σ e^(2(z-m))             -> log Σp² = log q - 2 log s
    zs  = Σ z                      -> mean logit = zs / V
    mb  = max of z over v < label  -> label is the (first) argmax iff z_label >= m and z_label > mb
    zl  = z at the label           -> logp = zl - lse

where ``z = T⁻¹ · softcap·tanh(logit_scale·(x + b) / softcap)`` (softcap optional, ``x`` the raw
tile, ``b`` the bias). A rescale by ``α = e^(m_old - m_new)`` (``α²`` for ``q``) keeps every sum
relative to the running max. Row offsets are int64 (``rows x stride`` passes 2^31 at 4096 x 1M).

Switches that only change a scalar branch (bias present, softcap, optional statistics) are runtime
arguments, not constexprs: the branches are uniform per program, cost nothing next to the tile
traffic, and keep the number of compiled variants (``COMPILE_CASES``) small. Without a bias the
launcher passes the weight as a never-read placeholder pointer, so ``bias_ptr`` always has the
weight's dtype. Interpreter-safe: ``tanh`` is written as ``2·sigmoid(2x) - 1`` (``libdevice.tanh``
returns nothing under ``TRITON_INTERPRET=1``), no ``tl.dot``.
"""
import triton
import triton.language as tl

# (BLOCK_V, num_warps): every config the launcher can choose; tests compile each one to cubin.
LINEAR_LOGPROBS_CONFIGS = ((256, 2), (1024, 4), (2048, 8))


def pick_config(n_cols: int):
    """Smallest tile that covers the tile row, else the largest."""
    for block_v, num_warps in LINEAR_LOGPROBS_CONFIGS:
        if n_cols <= block_v:
            return block_v, num_warps
    return LINEAR_LOGPROBS_CONFIGS[-1]


@triton.jit
def _softcap_tanh(y, softcap):
    # tanh(y / softcap) as 2·sigmoid(2u) - 1: exact to ~1e-7, and works under the interpreter.
    return 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0


@triton.jit
def _load_transformed(row_ptr, bias_ptr, cols, in_tile, vocab_start, logit_scale, softcap, inv_temperature,
                      has_bias):  # fmt: skip
    """z = T⁻¹ · softcap·tanh(logit_scale·(x + b) / softcap) for the tile columns ``cols``."""
    x = tl.load(row_ptr + cols, mask=in_tile, other=0.0).to(tl.float32)
    if has_bias:
        x += tl.load(bias_ptr + vocab_start + cols, mask=in_tile, other=0.0).to(tl.float32)
    y = x * logit_scale
    if softcap > 0:
        y = softcap * _softcap_tanh(y, softcap)
    return y * inv_temperature


@triton.jit
def linear_logprobs_fwd_kernel(
    tile_ptr,  # [rows, n_cols] fp32 raw logits h @ W[v0:v1].T (row stride tile_stride)
    tile_stride,
    bias_ptr,  # [V] bias (weight dtype), read only if has_bias
    labels_ptr,  # [rows] int64 labels of the chunk (never ignore_index: rows were compacted)
    max_ptr,  # [rows] fp32 in/out: m
    sum_exp_ptr,  # [rows] fp32 in/out: s
    sum_z_exp_ptr,  # [rows] fp32 in/out: t
    sum_sq_exp_ptr,  # [rows] fp32 in/out: q          (only if compute_stats)
    sum_z_ptr,  # [rows] fp32 in/out: zs               (only if compute_stats)
    max_before_label_ptr,  # [rows] fp32 in/out: mb   (only if compute_stats)
    label_z_ptr,  # [rows] fp32 out: z at the label, written by the block that holds it
    vocab_start,
    n_cols,
    logit_scale,
    softcap,  # > 0 enables soft-capping; 0 disables it
    inv_temperature,
    has_bias,
    compute_stats,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * tile_stride
    local_label = tl.load(labels_ptr + row) - vocab_start  # label's column in this tile

    m = tl.load(max_ptr + row)
    s = tl.load(sum_exp_ptr + row)
    t = tl.load(sum_z_exp_ptr + row)
    q = tl.load(sum_sq_exp_ptr + row)
    zs = tl.load(sum_z_ptr + row)
    mb = tl.load(max_before_label_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_tile = cols < n_cols
        z = _load_transformed(row_ptr, bias_ptr, cols, in_tile, vocab_start, logit_scale, softcap,
                              inv_temperature, has_bias)  # fmt: skip
        z = tl.where(in_tile, z, 0.0)  # finite everywhere: products below never see 0·inf
        z_or_ninf = tl.where(in_tile, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_or_ninf, axis=0))
        # m stays -inf while every z so far is -inf (a -inf bias masks tokens): shift by 0 then,
        # never by -inf (exp(-inf - -inf) = NaN)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)  # rescales sums kept relative to the old max (0 on the first block)
        e = tl.exp(z_or_ninf - m_shift)  # 0 on masked lanes and at z = -inf
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(tl.where(e == 0, 0.0, e * z), axis=0)  # no 0·(-inf) at z = -inf (NaN stays)
        if compute_stats:
            q = q * alpha * alpha + tl.sum(e * e, axis=0)
            zs += tl.sum(z, axis=0)
            # first-argmax semantics: a tie with an earlier token means the label is not top-1
            mb = tl.maximum(mb, tl.max(tl.where(cols < local_label, z_or_ninf, float("-inf")), axis=0))
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(sum_exp_ptr + row, s)
    tl.store(sum_z_exp_ptr + row, t)
    if compute_stats:
        tl.store(sum_sq_exp_ptr + row, q)
        tl.store(sum_z_ptr + row, zs)
        tl.store(max_before_label_ptr + row, mb)

    if (local_label >= 0) & (local_label < n_cols):
        label_z = _load_transformed(row_ptr, bias_ptr, local_label, local_label < n_cols, vocab_start,
                                    logit_scale, softcap, inv_temperature, has_bias)  # fmt: skip
        tl.store(label_z_ptr + row, label_z)


@triton.jit
def linear_logprobs_bwd_kernel(
    tile_ptr,  # [rows, n_cols] fp32 raw logits (recomputed), row stride tile_stride
    tile_stride,
    dx_ptr,  # [rows, n_cols] out: d loss / d raw logits, weight dtype (may alias tile_ptr if fp32)
    dx_stride,
    bias_ptr,  # [V] bias (weight dtype), read only if has_bias
    labels_ptr,  # [rows] int64
    lse_ptr,  # [rows] fp32 from forward
    mean_z_ptr,  # [rows] fp32: Σ p·z = lse - entropy (any value where grad_entropy is 0)
    grad_logp_ptr,  # [rows] fp32 upstream gradient of logp (zeros if none)
    grad_entropy_ptr,  # [rows] fp32 upstream gradient of entropy (zeros if none)
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    has_bias,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_tile = cols < n_cols
    row_ptr = tile_ptr + row * tile_stride

    x = tl.load(row_ptr + cols, mask=in_tile, other=0.0).to(tl.float32)
    if has_bias:
        x += tl.load(bias_ptr + vocab_start + cols, mask=in_tile, other=0.0).to(tl.float32)
    y = x * logit_scale
    # dz/dy: 1, or 1 - tanh² with softcap (d/dy of s·tanh(y/s))
    dz_dy = tl.full((BLOCK_V,), 1.0, tl.float32)
    if softcap > 0:
        c = _softcap_tanh(y, softcap)
        y = softcap * c
        dz_dy = 1.0 - c * c
    z = y * inv_temperature

    lse = tl.load(lse_ptr + row)
    mean_z = tl.load(mean_z_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    p = tl.exp(z - lse)
    # d logp / dz_v = onehot_v - p_v;  d H / dz_v = -p_v (z_v - Σ p·z)
    # dz_v = g_logp (onehot_v - p_v) - g_H p_v (z_v - Σ p·z)
    dz = tl.where(p == 0, 0.0, -p * (g_logp + g_entropy * (z - mean_z)))  # p = 0 at z = -inf: no 0·inf
    dz += tl.where(cols == tl.load(labels_ptr + row) - vocab_start, g_logp, 0.0)
    # chain rule back to the raw logit x: z = T⁻¹ · softcap(logit_scale · (x + b))
    dx = dz * (inv_temperature * logit_scale) * dz_dy
    tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_tile)


def _compile_cases():
    """Every (kernel, signature, constexprs, num_warps) the launcher can produce, for the cubin test.

    The tile is always fp32; the bias pointer (or its placeholder, the weight) and ``dx`` have the
    weight's dtype."""
    cases = []
    scalars = dict(vocab_start="i32", n_cols="i32", logit_scale="fp32", softcap="fp32",
                   inv_temperature="fp32", has_bias="i32")  # fmt: skip
    for dtype in ("fp32", "bf16", "fp16"):
        for block_v, num_warps in LINEAR_LOGPROBS_CONFIGS:
            fwd_sig = dict(tile_ptr="*fp32", tile_stride="i32", bias_ptr=f"*{dtype}", labels_ptr="*i64",
                           max_ptr="*fp32", sum_exp_ptr="*fp32", sum_z_exp_ptr="*fp32", sum_sq_exp_ptr="*fp32",
                           sum_z_ptr="*fp32", max_before_label_ptr="*fp32", label_z_ptr="*fp32",
                           **scalars, compute_stats="i32", BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=linear_logprobs_fwd_kernel, signature=fwd_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
            bwd_sig = dict(tile_ptr="*fp32", tile_stride="i32", dx_ptr=f"*{dtype}", dx_stride="i32",
                           bias_ptr=f"*{dtype}", labels_ptr="*i64", lse_ptr="*fp32", mean_z_ptr="*fp32",
                           grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", **scalars,
                           BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=linear_logprobs_bwd_kernel, signature=bwd_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
    return cases


COMPILE_CASES = _compile_cases()
