"""Triton kernels of the three-GEMM loss head (``alignkernels/ops/three_gemm.py``): the pass from a
chunk's raw fp32 logits buffer ``[rows, V]`` (written by cuBLAS) to the softmax state per row, and
then, once the loss has given its per-token gradient, to ``dz`` in place.

``fused_head_stats_kernel`` (one program per row, a loop over the vocabulary in ``BLOCK_V`` steps)
keeps the centred online state of contract 2:

    m = running max of z,   s = Σ e^(z−m),   u = Σ (z−m)·e^(z−m)

and on a new max ``m'`` rescales with ``α = e^(m−m')``: ``s ← α·s``, ``u ← α·(u + (m−m')·s)`` (every
sum stays centred on the running max; never Σz·e^(z−m)). It writes ``row_max = m``,
``log_sum = log s``, ``entropy = log s − u/s``, ``logp = (z_label − m) − log s`` and ``is_top1``
(``z_label ≥ m`` and no earlier column reaches it: first-argmax semantics).

``fused_head_dz_kernel`` (grid ``[rows, ⌈V / BLOCK_V⌉]``) recomputes ``z`` from the raw logits and
writes, in the weight's dtype (in place when that is fp32),

    dx = k · [g_logp·(onehot − p) − g_H·p·((z−m) − (log_sum − H))],   p = e^((z−m) − log_sum)

with ``k = logit_scale/T`` (times ``1 − tanh²`` with softcap): ``p`` is relative to the row max,
never formed from one fp32 lse.

Memory model: both kernels stream the fp32 buffer (stats: one read; dz: one read and one write of
4 or 2 bytes per logit); per-row state is six scalars. ``z = softcap·tanh(logit_scale·(x+b)/softcap)/T``;
tanh is ``2·sigmoid(2y) − 1`` (``libdevice.tanh`` returns nothing under the interpreter). Scalar
switches (bias, softcap) are runtime arguments; without a bias the launcher passes the weight
as a never-read placeholder. Row offsets are int64. No ``tl.dot``.
"""
import torch
import triton
import triton.language as tl

# (BLOCK_V, num_warps): every config the launchers can choose; the cubin test compiles each.
FUSED_HEAD_CONFIGS = ((256, 2), (1024, 4), (2048, 8))


def pick_config(n_cols: int):
    """Smallest block that covers the row, else the largest."""
    for block_v, num_warps in FUSED_HEAD_CONFIGS:
        if n_cols <= block_v:
            return block_v, num_warps
    return FUSED_HEAD_CONFIGS[-1]


@triton.jit
def _softcap_tanh(y, softcap):
    return 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0  # tanh(y / softcap), interpreter-safe


@triton.jit
def _transformed(x, bias_ptr, cols, in_row, logit_scale, softcap, inv_temperature, has_bias):
    """z for raw logits ``x`` (fp32) at columns ``cols``."""
    if has_bias:
        x += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = x * logit_scale
    if softcap > 0:
        y = softcap * _softcap_tanh(y, softcap)
    return y * inv_temperature


@triton.jit
def fused_head_stats_kernel(
    logits_ptr,  # [rows, n_cols] fp32 raw logits (no bias), row stride logits_stride
    logits_stride,
    bias_ptr,  # [n_cols] bias, read only if has_bias
    labels_ptr,  # [rows] int64, each in [0, n_cols)
    logp_ptr,  # [rows] fp32 out
    entropy_ptr,  # [rows] fp32 out
    row_max_ptr,  # [rows] fp32 out
    log_sum_ptr,  # [rows] fp32 out
    is_top1_ptr,  # [rows] int8 out
    n_cols,
    logit_scale,
    softcap,  # > 0 enables soft-capping
    inv_temperature,
    has_bias,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row)
    m = float("-inf")
    s = 0.0
    u = 0.0
    max_before_label = float("-inf")
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        z = _transformed(x, bias_ptr, cols, in_row, logit_scale, softcap, inv_temperature, has_bias)
        z = tl.where(in_row, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # all z so far -inf (a -inf bias removes tokens): centre on 0, never exp(-inf - -inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(s == 0.0, 0.0, m - m_safe)  # (m - m') is -inf only while s = 0
        c = z - m_safe
        e = tl.exp(c)
        u = alpha * (u + shift * s) + tl.sum(tl.where(e == 0.0, 0.0, c) * e, axis=0)  # no 0·(-inf)
        s = alpha * s + tl.sum(e, axis=0)
        max_before_label = tl.maximum(max_before_label, tl.max(tl.where(cols < label, z, float("-inf")), axis=0))
        m = m_new
    x_label = tl.load(row_ptr + label).to(tl.float32)
    z_label = _transformed(x_label, bias_ptr, label, label < n_cols, logit_scale, softcap, inv_temperature,
                              has_bias)  # fmt: skip
    log_sum = tl.log(s)
    tl.store(logp_ptr + row, (z_label - m) - log_sum)
    tl.store(entropy_ptr + row, log_sum - u / s)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    tl.store(is_top1_ptr + row, ((z_label >= m) & (z_label > max_before_label)).to(tl.int8))


@triton.jit
def fused_head_dz_kernel(
    logits_ptr,  # [rows, n_cols] fp32 raw logits (no bias)
    logits_stride,
    dz_ptr,  # [rows, n_cols] out, weight dtype (may alias logits_ptr when fp32)
    dz_stride,
    bias_ptr,
    labels_ptr,  # [rows] int64
    row_max_ptr,  # [rows] fp32 from the stats kernel
    log_sum_ptr,
    entropy_ptr,
    grad_logp_ptr,  # [rows] fp32: ∂L/∂logp
    grad_entropy_ptr,  # [rows] fp32: ∂L/∂H (zeros if the loss ignores H)
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    has_bias,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < n_cols
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    if has_bias:
        x += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = x * logit_scale
    dz_dx = tl.full((BLOCK_V,), 1.0, tl.float32) * (logit_scale * inv_temperature)  # chain rule z <- x
    if softcap > 0:
        tanh = _softcap_tanh(y, softcap)
        y = softcap * tanh
        dz_dx = dz_dx * (1.0 - tanh * tanh)  # d/dy of s·tanh(y/s)
    z = y * inv_temperature
    m = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    c = z - tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(c - log_sum)  # relative to the row max
    # d logp/dz = onehot − p;  dH/dz = −p·(z − Σp·z) = −p·(c − (log_sum − H))
    dz = tl.where(p == 0.0, 0.0, -p * (g_logp + g_entropy * (c - (log_sum - entropy))))  # no 0·inf at z = -inf
    dz += tl.where(cols == tl.load(labels_ptr + row), g_logp, 0.0)
    tl.store(dz_ptr + row * dz_stride + cols, (dz * dz_dx).to(dz_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------
# Launchers (called by alignkernels/ops/three_gemm.py)
# --------------------------------------------------------------------------------------------
def _scalars(tr, bias):
    return float(tr.logit_scale), float(tr.softcap or 0.0), 1.0 / float(tr.temperature), int(bias is not None)


def launch_stats(logits, bias, weight, labels, tr):
    """-> (logp, entropy, row_max, log_sum, is_top1) for the rows of ``logits`` (fp32 raw, no bias);
    ``weight`` is the never-read bias placeholder (so the bias pointer always has its dtype)."""
    rows, n_cols = logits.shape
    out = [torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    is_top1 = torch.empty(rows, dtype=torch.int8, device=logits.device)
    block_v, num_warps = pick_config(n_cols)
    if rows:
        fused_head_stats_kernel[(rows,)](
            logits, logits.stride(0), bias if bias is not None else weight, labels, *out, is_top1,
            n_cols, *_scalars(tr, bias), BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    logp, entropy, row_max, log_sum = out
    return logp, entropy, row_max, log_sum, is_top1.bool()


def launch_dz(logits, dz, bias, weight, labels, stats, grad_logp, grad_entropy, tr):
    """Write ``dz`` (``[rows, n_cols]``, may be ``logits`` itself) from the raw logits."""
    rows, n_cols = logits.shape
    block_v, num_warps = pick_config(n_cols)
    if rows:
        fused_head_dz_kernel[(rows, triton.cdiv(n_cols, block_v))](
            logits, logits.stride(0), dz, dz.stride(0), bias if bias is not None else weight, labels,
            stats.row_max, stats.log_sum, stats.entropy, grad_logp, grad_entropy,
            n_cols, *_scalars(tr, bias), BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    return dz


def _compile_cases():
    """Every (kernel, signature, constexprs, num_warps) the launchers produce: the logits buffer is
    fp32; bias (or its placeholder, the weight) and dz have the weight's dtype."""
    scalars = dict(n_cols="i32", logit_scale="fp32", softcap="fp32", inv_temperature="fp32", has_bias="i32")
    cases = []
    for dtype in ("fp32", "bf16", "fp16"):
        for block_v, num_warps in FUSED_HEAD_CONFIGS:
            stats_sig = dict(logits_ptr="*fp32", logits_stride="i32", bias_ptr=f"*{dtype}", labels_ptr="*i64",
                             logp_ptr="*fp32", entropy_ptr="*fp32", row_max_ptr="*fp32", log_sum_ptr="*fp32",
                             is_top1_ptr="*i8", **scalars, BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=fused_head_stats_kernel, signature=stats_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
            dz_sig = dict(logits_ptr="*fp32", logits_stride="i32", dz_ptr=f"*{dtype}", dz_stride="i32",
                          bias_ptr=f"*{dtype}", labels_ptr="*i64", row_max_ptr="*fp32", log_sum_ptr="*fp32",
                          entropy_ptr="*fp32", grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", **scalars,
                          BLOCK_V="constexpr")  # fmt: skip
            cases.append(dict(kernel=fused_head_dz_kernel, signature=dz_sig,
                              constexprs=dict(BLOCK_V=block_v), num_warps=num_warps))  # fmt: skip
    return cases


COMPILE_CASES = _compile_cases()
