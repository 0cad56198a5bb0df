"""Triton kernels for the GRPO per-token loss: every elementwise step plus the per-row masked
reductions in one pass over ``[B, T]`` (forward) and one gradient write (backward).

Eager GRPO runs ~30 separate elementwise kernels over ``[B, T]`` (ratio, clamp, min, KL, masks,
products, reductions) and keeps their temporaries for autograd. Here one program per row walks
T in BLOCK_T tiles and emits per-row sums; the loss-type aggregation (a few ops on ``[B]``)
stays in PyTorch, so autograd hands the backward kernel one scalar per row,
``g_b = dLoss / d(row_loss_sum_b)``.

Per valid token (``m_t = mask_t != 0``; invalid tokens read as 0 and contribute nothing),
with ``lr = logp - old_logp``, ``coef = exp(lr)`` (token level) or the row's
``exp(sum(m*lr) / max(n, 1))`` (sequence level, computed by a first pass over the row):

    clipped (kind 0): c2 = clamp(coef, 1-eps_low, 1+eps_high); c1 = min(coef, delta)
                      pol = -min(c1*A, c2*A)
    cispo   (kind 1): pol = -min(coef, eps_high) * A * logp        (min(...) is detached)
    sapo    (kind 2): tau = A > 0 ? tau_pos : tau_neg; pol = -sigmoid(tau*(coef-1)) * 4/tau * A
    kl  = exp(ref - logp) - (ref - logp) - 1,  klc = kl * (bias_correction ? coef : 1)
    ptl = pol * w * isr + beta * klc       (w: off-policy / entropy token weights, isr: vLLM IS)

Gradient (matching PyTorch's autograd conventions: ``min`` splits ties 1/2-1/2, ``clamp`` passes
the gradient on its closed interval):
    d pol / d coef = clipped: -(da*A*[coef <= delta] + db*A*[1-eps_low <= coef <= 1+eps_high])
                     (da, db: 1 for the strictly smaller of c1*A, c2*A, 1/2 each on a tie)
                     sapo: -4*A*s*(1-s), s = sigmoid(tau*(coef-1));   cispo: 0
    d_coef   = w*isr * d pol/d coef + beta * bias * kl                (through coef)
    d_direct = w*isr * (cispo ? -min(coef, eps_high)*A : 0) + beta * (1 - exp(ref - logp)) * (bias ? coef : 1)
    token level:    d logp_t = g_b * m_t * (d_coef_t * coef_t + d_direct_t)
    sequence level: d logp_t = g_b * m_t * (d_direct_t + coef_b / max(n_b, 1) * sum_s m_s * d_coef_s)

Memory model: bandwidth/launch bound. Forward reads up to 7 fp32 values per token (logp, old,
ref, A, mask, w, isr; absent ones are not loaded) and writes 8 floats per row; backward reads the
same and writes one fp32 gradient per token. No [B, T] temporaries. Row offsets are int64.
"""
import triton
import triton.language as tl

# (BLOCK_T, num_warps): every config the launcher can choose; tests compile each one to cubin.
GRPO_CONFIGS = ((256, 2), (1024, 4), (4096, 8))
# Columns of the per-row statistics written by the forward kernel.
ROW_STATS = ("loss_sum", "count", "kl_sum", "low_sum", "high_sum", "region_sum", "cispo_sum", "coef")
N_ROW_STATS = 8
LOSS_KINDS = {"clipped": 0, "cispo": 1, "sapo": 2}


def pick_config(seq_len: int):
    for block_t, num_warps in GRPO_CONFIGS:
        if seq_len <= block_t:
            return block_t, num_warps
    return GRPO_CONFIGS[-1]


@triton.jit
def _load_tile(
    row, offs, T,
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
    s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
    has_old, has_ref, has_w, has_is,
):  # fmt: skip
    in_row = offs < T
    m = (tl.load(mask_ptr + row * s_mask + offs, mask=in_row, other=0.0) != 0) & in_row
    lp = tl.load(logp_ptr + row * s_logp + offs, mask=m, other=0.0).to(tl.float32)
    # absent inputs point at logp (valid memory, stride of logp) and are replaced after the load
    old = tl.load(old_ptr + row * s_old + offs, mask=m, other=0.0).to(tl.float32)
    old = tl.where(has_old != 0, old, lp)  # on-policy: old = logp.detach()
    ref = tl.load(ref_ptr + row * s_ref + offs, mask=m, other=0.0).to(tl.float32)
    ref = tl.where(has_ref != 0, ref, lp)  # no reference: kl = 0
    adv = tl.load(adv_ptr + row * s_adv_row + offs * s_adv_t, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * s_w + offs, mask=m, other=1.0).to(tl.float32)
    w = tl.where(has_w != 0, w, 1.0)
    isr = tl.load(is_ptr + row * s_is_row + offs * s_is_t, mask=m, other=1.0).to(tl.float32)
    isr = tl.where(has_is != 0, isr, 1.0)
    return m, lp, old, ref, adv, w * isr


@triton.jit
def _token_terms(
    lp, ref, adv, coef, scale,
    loss_kind, beta, bias, eps_low, eps_high, delta, tau_pos, tau_neg,
):  # fmt: skip
    """Per-token loss, its parts and derivatives (see the module docstring)."""
    # clipped
    c2 = tl.minimum(tl.maximum(coef, 1.0 - eps_low), 1.0 + eps_high)
    c1 = tl.minimum(coef, delta)
    a = c1 * adv
    b = c2 * adv
    pol_clip = -tl.minimum(a, b)
    da = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
    db = tl.where(b < a, 1.0, tl.where(a == b, 0.5, 0.0))
    dc1 = tl.where(coef <= delta, 1.0, 0.0)
    dc2 = tl.where((coef >= 1.0 - eps_low) & (coef <= 1.0 + eps_high), 1.0, 0.0)
    dpol_clip = -(da * adv * dc1 + db * adv * dc2)
    # cispo
    cl = tl.minimum(coef, eps_high)
    pol_cispo = -cl * adv * lp
    # sapo
    tau = tl.where(adv > 0, tau_pos, tau_neg)
    s = tl.sigmoid(tau * (coef - 1.0))
    pol_sapo = -s * 4.0 / tau * adv
    dpol_sapo = -4.0 * adv * s * (1.0 - s)

    pol = tl.where(loss_kind == 0, pol_clip, tl.where(loss_kind == 1, pol_cispo, pol_sapo))
    dpol_dcoef = tl.where(loss_kind == 0, dpol_clip, tl.where(loss_kind == 1, 0.0, dpol_sapo))
    dpol_direct = tl.where(loss_kind == 1, -cl * adv, 0.0)

    diff = ref - lp
    e = tl.exp(diff)
    kl = e - diff - 1.0
    kl_scale = tl.where(bias != 0, coef, 1.0)
    klc = kl * kl_scale
    ptl = pol * scale + beta * klc
    d_coef = scale * dpol_dcoef + beta * tl.where(bias != 0, kl, 0.0)
    d_direct = scale * dpol_direct + beta * (1.0 - e) * kl_scale
    return ptl, klc, c1, d_coef, d_direct


@triton.jit
def _row_seq_coef(
    row, T,
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
    s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
    has_old, has_ref, has_w, has_is,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Sequence-level ratio exp(sum(m * lr) / max(n, 1)) and the valid-token count n."""
    lr_sum = 0.0
    n = 0.0
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, lp, old, ref, adv, scale = _load_tile(
            row, offs, T, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
            s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
            has_old, has_ref, has_w, has_is,
        )  # fmt: skip
        lr_sum += tl.sum(tl.where(m, lp - old, 0.0), axis=0)
        n += tl.sum(m.to(tl.float32), axis=0)
    return tl.exp(lr_sum / tl.maximum(n, 1.0)), n


@triton.jit
def grpo_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
    stats_ptr,  # [B, 8] fp32 out (ROW_STATS)
    T,
    s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
    has_old, has_ref, has_w, has_is, loss_kind, sequence, bias,
    beta, eps_low, eps_high, delta, tau_pos, tau_neg,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    seq_coef = 1.0
    if sequence != 0:
        seq_coef, _n = _row_seq_coef(
            row, T, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
            s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
            has_old, has_ref, has_w, has_is, BLOCK_T,
        )  # fmt: skip
    loss_sum = 0.0
    count = 0.0
    kl_sum = 0.0
    low_sum = 0.0
    high_sum = 0.0
    region_sum = 0.0
    cispo_sum = 0.0
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, lp, old, ref, adv, scale = _load_tile(
            row, offs, T, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
            s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
            has_old, has_ref, has_w, has_is,
        )  # fmt: skip
        coef = tl.where(sequence != 0, seq_coef, tl.exp(lp - old))
        ptl, klc, c1, d_coef, d_direct = _token_terms(
            lp, ref, adv, coef, scale, loss_kind, beta, bias, eps_low, eps_high, delta, tau_pos, tau_neg
        )
        mf = m.to(tl.float32)
        loss_sum += tl.sum(mf * ptl, axis=0)
        count += tl.sum(mf, axis=0)
        kl_sum += tl.sum(mf * klc, axis=0)
        # TRL's clip metrics read coef_1 after the delta cap
        low = (c1 < 1.0 - eps_low) & (adv < 0)
        high = (c1 > 1.0 + eps_high) & (adv > 0)
        low_sum += tl.sum(tl.where(m & low, 1.0, 0.0), axis=0)
        high_sum += tl.sum(tl.where(m & high, 1.0, 0.0), axis=0)
        region_sum += tl.sum(tl.where(m & (low | high), 1.0, 0.0), axis=0)
        cispo_sum += tl.sum(tl.where(m & (coef > eps_high) & (adv > 0), 1.0, 0.0), axis=0)
    out = stats_ptr + row * 8
    tl.store(out + 0, loss_sum)
    tl.store(out + 1, count)
    tl.store(out + 2, kl_sum)
    tl.store(out + 3, low_sum)
    tl.store(out + 4, high_sum)
    tl.store(out + 5, region_sum)
    tl.store(out + 6, cispo_sum)
    tl.store(out + 7, seq_coef)


@triton.jit
def grpo_bwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
    grad_row_ptr,  # [B] fp32: dLoss / d row_loss_sum
    grad_logp_ptr,  # [B, T] fp32 out, contiguous
    T,
    s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
    has_old, has_ref, has_w, has_is, loss_kind, sequence, bias,
    beta, eps_low, eps_high, delta, tau_pos, tau_neg,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_row_ptr + row).to(tl.float32)
    seq_coef = 1.0
    coef_sum = 0.0  # sequence level: sum_s m_s * d_coef_s, times coef / max(n, 1)
    if sequence != 0:
        seq_coef, n = _row_seq_coef(
            row, T, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
            s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
            has_old, has_ref, has_w, has_is, BLOCK_T,
        )  # fmt: skip
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            m, lp, old, ref, adv, scale = _load_tile(
                row, offs, T, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
                s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
                has_old, has_ref, has_w, has_is,
            )  # fmt: skip
            ptl, klc, c1, d_coef, d_direct = _token_terms(
                lp, ref, adv, seq_coef + 0.0 * lp, scale, loss_kind, beta, bias,
                eps_low, eps_high, delta, tau_pos, tau_neg,
            )  # fmt: skip
            coef_sum += tl.sum(tl.where(m, d_coef, 0.0), axis=0)
        coef_sum = coef_sum * seq_coef / tl.maximum(n, 1.0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, lp, old, ref, adv, scale = _load_tile(
            row, offs, T, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr,
            s_logp, s_old, s_ref, s_adv_row, s_adv_t, s_mask, s_w, s_is_row, s_is_t,
            has_old, has_ref, has_w, has_is,
        )  # fmt: skip
        coef = tl.where(sequence != 0, seq_coef, tl.exp(lp - old))
        ptl, klc, c1, d_coef, d_direct = _token_terms(
            lp, ref, adv, coef, scale, loss_kind, beta, bias, eps_low, eps_high, delta, tau_pos, tau_neg
        )
        # token level: d logp = d_coef * coef + d_direct; sequence level: d_direct + coef_sum
        d = tl.where(sequence != 0, d_direct + coef_sum, d_coef * coef + d_direct)
        tl.store(grad_logp_ptr + row * T + offs, tl.where(m, g * d, 0.0), mask=offs < T)


_PTRS = ("logp_ptr", "old_ptr", "ref_ptr", "adv_ptr", "mask_ptr", "w_ptr", "is_ptr")
_STRIDES = ("s_logp", "s_old", "s_ref", "s_adv_row", "s_adv_t", "s_mask", "s_w", "s_is_row", "s_is_t")
_FLAGS = ("has_old", "has_ref", "has_w", "has_is", "loss_kind", "sequence", "bias")
_SCALARS = ("beta", "eps_low", "eps_high", "delta", "tau_pos", "tau_neg")


def _signature(kernel_name: str):
    sig = {p: "*fp32" for p in _PTRS}
    if kernel_name == "fwd":
        sig["stats_ptr"] = "*fp32"
    else:
        sig["grad_row_ptr"] = "*fp32"
        sig["grad_logp_ptr"] = "*fp32"
    sig["T"] = "i32"
    sig.update({s: "i64" for s in _STRIDES})
    sig.update({f: "i32" for f in _FLAGS})
    sig.update({s: "fp32" for s in _SCALARS})
    sig["BLOCK_T"] = "constexpr"
    return sig


COMPILE_CASES = [
    dict(kernel=kernel, signature=_signature(name), constexprs={"BLOCK_T": block_t}, num_warps=num_warps)
    for name, kernel in (("fwd", grpo_fwd_kernel), ("bwd", grpo_bwd_kernel))
    for block_t, num_warps in GRPO_CONFIGS
]
