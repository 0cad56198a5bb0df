"""Triton kernels of the clipped-policy per-token loss (GRPO family and PPO): every elementwise
step plus the per-row masked reductions in one pass over ``[B, T]`` (forward) and one gradient
write (backward).

Eager GRPO runs ~30 separate elementwise kernels over ``[B, T]`` (ratio, clamp, min, KL, masks,
products, reductions) and keeps their temporaries for autograd. Here one program per row walks
T in BLOCK_T tiles and emits per-row sums; the loss-type aggregation (a few ops on ``[B]``)
stays in PyTorch, so autograd hands the backward kernel one scalar per row,
``g_b = dLoss / d(row_loss_sum_b)``.

Arguments are packed: ``inputs`` is the tuple of the per-token pointers named by ``TOKEN_INPUTS``
(an absent optional input is any valid pointer; its ``HAS_*`` constexpr flag, one per name in
``OPTIONAL_INPUTS``, removes the load at compile time), ``row_strides`` / ``token_strides`` the
matching strides (token stride 0 broadcasts a ``[B, 1]`` column along T), ``params`` the fp32
scalars named by ``PARAMS``. The per-row statistics are the columns named by ``ROW_STATS``.

Per valid token (``m_t = mask_t != 0``; invalid tokens read as 0 and contribute nothing),
with ``lr = clamp(logp - old_logp, -L, L)`` (``L = log_ratio_clamp``, +inf when off; verl's ±20),
``coef = exp(lr)`` (token level) or the row's ``exp(sum(m*lr) / max(n, 1))`` (sequence level,
computed by a first pass over the row):

    clipped (kind 0): c2 = clamp(coef, 1-eps_low, 1+eps_high); c1 = min(coef, delta)
                      pol = -min(c1*A, c2*A)
                      DUAL_CLIP: for A < 0, pol = min(pol, -A*clip_c)   (verl's dual-clip PPO;
                        ``dual_sum`` counts the tokens where the cap binds, verl's pg_clipfrac_lower)
    cispo   (kind 1): pol = -cl * A * logp, cl = min(coef, eps_high) (detached)
                      CISPO_LOWER: cl = min(max(coef, ratio_min), eps_high)  (verl's two-sided CISPO)
                      TRUST_REGION 1 / 2: cl *= keep, keep (detached) = verl DPPO's region on
                        p - p_old (TV) / the binary KL of p_old, p (p = exp(logp)), bounds
                        region_low / region_high by the sign of A
                      QUADRATIC: pol += quad/2 * (logp - old)^2  (verl's DRO)
    sapo    (kind 2): tau = A > 0 ? tau_pos : tau_neg; pol = -sigmoid(tau*(coef-1)) * 4/tau * A
    kl  = exp(ref - logp) - (ref - logp) - 1,  klc = kl * (bias_correction ? coef : 1)
    ptl = pol * w * isr + beta * klc       (w: off-policy / entropy token weights, isr: vLLM IS)

Gradient (matching PyTorch's autograd conventions: ``min`` splits ties 1/2-1/2, ``clamp`` passes
the gradient on its closed interval):
    d pol / d coef = clipped: -(da*A*[coef <= delta] + db*A*[1-eps_low <= coef <= 1+eps_high])
                     (da, db: 1 for the strictly smaller of c1*A, c2*A, 1/2 each on a tie;
                     DUAL_CLIP with A < 0: times 1 / 1/2 / 0 as pol <, =, > -A*clip_c)
                     sapo: -4*A*s*(1-s), s = sigmoid(tau*(coef-1));   cispo: 0
    d pol / d logp (direct) = cispo: -cl*A (+ quad*(logp - old) with QUADRATIC)
    d_coef   = w*isr * d pol/d coef + beta * bias * kl                (through coef)
    d_direct = w*isr * (cispo ? -min(coef, eps_high)*A : 0) + beta * (1 - exp(ref - logp)) * (bias ? coef : 1)
    token level:    d logp_t = g_b * m_t * (d_coef_t * coef_t * k_t + d_direct_t)
    sequence level: d logp_t = g_b * m_t * (d_direct_t + k_t * coef_b / max(n_b, 1) * sum_s m_s * d_coef_s)
    (k_t = [-L <= logp_t - old_t <= L]: the clamp passes the gradient on its closed interval)

Memory model: bandwidth/launch bound. Forward reads up to 7 fp32 values per token (logp, old,
ref, A, mask, w, isr; absent ones are not loaded) and writes ``N_ROW_STATS`` floats per row;
backward reads the same and writes one fp32 gradient per token. No [B, T] temporaries. Row
offsets are int64.
"""
import triton
import triton.language as tl

# (BLOCK_T, num_warps): every config the launcher can choose; tests compile each one to cubin.
GRPO_CONFIGS = ((256, 2), (1024, 4), (4096, 8))

# Per-token inputs, in the order of the ``inputs`` / ``row_strides`` / ``token_strides`` tuples.
TOKEN_INPUTS = ("logp", "old", "ref", "adv", "mask", "weight", "is_ratio")
# The optional ones: each has a constexpr flag ``HAS_<NAME>`` (see ``input_flags``).
OPTIONAL_INPUTS = ("old", "ref", "weight", "is_ratio")
# fp32 scalars, in the order of the ``params`` tuple.
PARAMS = ("beta", "eps_low", "eps_high", "delta", "tau_pos", "tau_neg", "clip_c", "ratio_min", "region_low",
          "region_high", "quad", "log_ratio_clamp")
# Columns of the per-row statistics written by the forward kernel.
ROW_STATS = ("loss_sum", "count", "kl_sum", "low_sum", "high_sum", "region_sum", "cispo_sum", "coef", "dual_sum")
N_ROW_STATS = len(ROW_STATS)
LOSS_KINDS = {"clipped": 0, "cispo": 1, "sapo": 2}

# Tuple positions as compile-time constants (Triton indexes tuples with constexprs).
IN_LOGP, IN_OLD, IN_REF, IN_ADV, IN_MASK, IN_WEIGHT, IN_IS_RATIO = (tl.constexpr(i) for i in range(len(TOKEN_INPUTS)))
(P_BETA, P_EPS_LOW, P_EPS_HIGH, P_DELTA, P_TAU_POS, P_TAU_NEG, P_CLIP_C, P_RATIO_MIN, P_REGION_LOW, P_REGION_HIGH,
 P_QUAD, P_LOG_RATIO_CLAMP) = (tl.constexpr(i) for i in range(len(PARAMS)))  # fmt: skip
STATS_PER_ROW = tl.constexpr(N_ROW_STATS)
(STAT_LOSS_SUM, STAT_COUNT, STAT_KL_SUM, STAT_LOW_SUM, STAT_HIGH_SUM, STAT_REGION_SUM, STAT_CISPO_SUM,
 STAT_COEF, STAT_DUAL_SUM) = (tl.constexpr(i) for i in range(N_ROW_STATS))  # fmt: skip
assert TOKEN_INPUTS.index("is_ratio") == IN_IS_RATIO.value and PARAMS.index("log_ratio_clamp") == P_LOG_RATIO_CLAMP.value
assert ROW_STATS.index("dual_sum") == STAT_DUAL_SUM.value and STAT_LOSS_SUM.value == 0  # the launcher splits column 0 off


def input_flags(present) -> dict:
    """``{"HAS_OLD": bool, ...}`` for the names in ``OPTIONAL_INPUTS`` that ``present`` holds."""
    return {f"HAS_{name.upper()}": name in present for name in OPTIONAL_INPUTS}


def pick_config(seq_len: int):
    for block_t, num_warps in GRPO_CONFIGS:
        if seq_len <= block_t:
            return block_t, num_warps
    return GRPO_CONFIGS[-1]


@triton.jit
def _load(inputs, row_strides, token_strides, which: tl.constexpr, row, offs, m, other):
    ptr = inputs[which] + row * row_strides[which] + offs * token_strides[which]
    return tl.load(ptr, mask=m, other=other).to(tl.float32)


@triton.jit
def _load_tile(
    inputs, row_strides, token_strides, row, offs, T,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_IS_RATIO: tl.constexpr,
):  # fmt: skip
    """One tile of a row: ``(valid, logp, old, ref, adv, w * isr)``; absent inputs take their
    neutral value (old = logp: ratio 1; ref = logp: kl 0; weights 1)."""
    in_row = offs < T
    m = (_load(inputs, row_strides, token_strides, IN_MASK, row, offs, in_row, 0.0) != 0) & in_row
    lp = _load(inputs, row_strides, token_strides, IN_LOGP, row, offs, m, 0.0)
    adv = _load(inputs, row_strides, token_strides, IN_ADV, row, offs, m, 0.0)
    old = lp
    if HAS_OLD:
        old = _load(inputs, row_strides, token_strides, IN_OLD, row, offs, m, 0.0)
    ref = lp
    if HAS_REF:
        ref = _load(inputs, row_strides, token_strides, IN_REF, row, offs, m, 0.0)
    scale = tl.full(lp.shape, 1.0, tl.float32)
    if HAS_WEIGHT:
        scale = scale * _load(inputs, row_strides, token_strides, IN_WEIGHT, row, offs, m, 1.0)
    if HAS_IS_RATIO:
        scale = scale * _load(inputs, row_strides, token_strides, IN_IS_RATIO, row, offs, m, 1.0)
    return m, lp, old, ref, adv, scale


@triton.jit
def _log_ratio(lp, old, params):
    """``(clamp(lp - old, -L, L), k)``: the clamped log-ratio and 1 where the clamp passes the
    gradient (its closed interval), else 0; ``L = +inf``: no clamp."""
    lr = lp - old
    bound = params[P_LOG_RATIO_CLAMP]
    keep = tl.where((lr >= -bound) & (lr <= bound), 1.0, 0.0)
    # selects, not tl.minimum / tl.maximum: a NaN log-ratio stays NaN (GPU fmin / fmax would drop it)
    return tl.where(lr < -bound, -bound, tl.where(lr > bound, bound, lr)), keep


@triton.jit
def _trust_region(lp, old, adv, params, TRUST_REGION: tl.constexpr):
    """1 inside verl DPPO's trust region, 0 outside: A > 0 bounds the rise of the token's
    probability by region_high, A <= 0 its fall by region_low; TV on p - p_old (1), or the binary
    KL of (p_old, p) with a move away from the bound always kept (2)."""
    prob = tl.exp(lp)
    old_prob = tl.exp(old)
    if TRUST_REGION == 1:
        pos = (prob - old_prob) <= params[P_REGION_HIGH]
        neg = (prob - old_prob) >= -params[P_REGION_LOW]
    else:
        bkl = old_prob * (old - lp) + (1.0 - old_prob) * tl.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        pos = (bkl <= params[P_REGION_HIGH]) | (prob <= old_prob)
        neg = (bkl <= params[P_REGION_LOW]) | (prob >= old_prob)
    return tl.where(adv > 0, tl.where(pos, 1.0, 0.0), tl.where(neg, 1.0, 0.0))


@triton.jit
def _token_terms(
    lp, old, ref, adv, coef, scale, params, LOSS_KIND: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    DUAL_CLIP: tl.constexpr, CISPO_LOWER: tl.constexpr, TRUST_REGION: tl.constexpr, QUADRATIC: tl.constexpr,
):  # fmt: skip
    """Per-token loss, its parts and derivatives (see the module docstring):
    ``(ptl, klc, c1, d_coef, d_direct, dual)`` (``dual``: 1 where the dual-clip cap binds)."""
    beta = params[P_BETA]
    eps_high = params[P_EPS_HIGH]
    c1 = coef
    dual = 0.0 * lp
    if LOSS_KIND == 0:  # clipped
        c2 = tl.minimum(tl.maximum(coef, 1.0 - params[P_EPS_LOW]), 1.0 + eps_high)
        c1 = tl.minimum(coef, params[P_DELTA])
        a = c1 * adv
        b = c2 * adv
        pol = -tl.minimum(a, b)
        da = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))  # min splits a tie 1/2-1/2
        db = tl.where(b < a, 1.0, tl.where(a == b, 0.5, 0.0))
        dc1 = tl.where(coef <= params[P_DELTA], 1.0, 0.0)
        dc2 = tl.where((coef >= 1.0 - params[P_EPS_LOW]) & (coef <= 1.0 + eps_high), 1.0, 0.0)
        dpol_dcoef = -(da * adv * dc1 + db * adv * dc2)
        if DUAL_CLIP:  # A < 0: min(pol, -A*c), a tie split 1/2-1/2
            cap = -adv * params[P_CLIP_C]
            dd = tl.where(pol < cap, 1.0, tl.where(pol == cap, 0.5, 0.0))
            dpol_dcoef = tl.where(adv < 0, dd * dpol_dcoef, dpol_dcoef)
            dual = tl.where((adv < 0) & (pol > cap), 1.0, 0.0)
            pol = tl.where(adv < 0, tl.minimum(pol, cap), pol)
        dpol_direct = 0.0 * lp
    elif LOSS_KIND == 1:  # cispo: the clamped ratio is a constant, d/dlogp of -cl*A*logp = -cl*A
        cl = tl.minimum(coef, eps_high)
        if CISPO_LOWER:
            cl = tl.minimum(tl.maximum(coef, params[P_RATIO_MIN]), eps_high)
        if TRUST_REGION != 0:
            cl = cl * _trust_region(lp, old, adv, params, TRUST_REGION)
        pol = -cl * adv * lp
        dpol_dcoef = 0.0 * lp
        dpol_direct = -cl * adv
        if QUADRATIC:
            pol = pol + 0.5 * params[P_QUAD] * (lp - old) * (lp - old)
            dpol_direct = dpol_direct + params[P_QUAD] * (lp - old)
    else:  # sapo: d/dcoef of -sigmoid(tau (coef-1)) 4/tau A = -4 A s (1-s)
        tau = tl.where(adv > 0, params[P_TAU_POS], params[P_TAU_NEG])
        s = tl.sigmoid(tau * (coef - 1.0))
        pol = -s * 4.0 / tau * adv
        dpol_dcoef = -4.0 * adv * s * (1.0 - s)
        dpol_direct = 0.0 * lp
    diff = ref - lp
    e = tl.exp(diff)
    kl = e - diff - 1.0  # k3; d kl / d logp = 1 - exp(ref - logp)
    if BIAS_CORRECTION:
        klc = kl * coef
        d_coef = scale * dpol_dcoef + beta * kl
        d_direct = scale * dpol_direct + beta * (1.0 - e) * coef
    else:
        klc = kl
        d_coef = scale * dpol_dcoef
        d_direct = scale * dpol_direct + beta * (1.0 - e)
    ptl = pol * scale + beta * klc
    return ptl, klc, c1, d_coef, d_direct, dual


@triton.jit
def _row_seq_coef(
    inputs, row_strides, token_strides, row, T, params,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_IS_RATIO: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Sequence-level ratio exp(sum(m * lr) / max(n, 1)) and the valid-token count n."""
    lr_sum = 0.0
    n = 0.0
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, lp, old, ref, adv, scale = _load_tile(inputs, row_strides, token_strides, row, offs, T,
                                                 HAS_OLD, HAS_REF, HAS_WEIGHT, HAS_IS_RATIO)  # fmt: skip
        lr, _keep = _log_ratio(lp, old, params)
        lr_sum += tl.sum(tl.where(m, lr, 0.0), axis=0)
        n += tl.sum(m.to(tl.float32), axis=0)
    return tl.exp(lr_sum / tl.maximum(n, 1.0)), n


@triton.jit
def grpo_fwd_kernel(
    inputs, row_strides, token_strides,
    stats_ptr,  # [B, N_ROW_STATS] fp32 out (ROW_STATS)
    T, params,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_IS_RATIO: tl.constexpr,
    LOSS_KIND: tl.constexpr, SEQUENCE: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    DUAL_CLIP: tl.constexpr, CISPO_LOWER: tl.constexpr, TRUST_REGION: tl.constexpr, QUADRATIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    seq_coef = 1.0
    if SEQUENCE:
        seq_coef, _n = _row_seq_coef(inputs, row_strides, token_strides, row, T, params,
                                     HAS_OLD, HAS_REF, HAS_WEIGHT, HAS_IS_RATIO, BLOCK_T)  # fmt: skip
    eps_low = params[P_EPS_LOW]
    eps_high = params[P_EPS_HIGH]
    loss_sum = 0.0
    count = 0.0
    kl_sum = 0.0
    low_sum = 0.0
    high_sum = 0.0
    region_sum = 0.0
    cispo_sum = 0.0
    dual_sum = 0.0
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, lp, old, ref, adv, scale = _load_tile(inputs, row_strides, token_strides, row, offs, T,
                                                 HAS_OLD, HAS_REF, HAS_WEIGHT, HAS_IS_RATIO)  # fmt: skip
        if SEQUENCE:
            coef = seq_coef + 0.0 * lp
        else:
            lr, _keep = _log_ratio(lp, old, params)
            coef = tl.exp(lr)
        ptl, klc, c1, d_coef, d_direct, dual = _token_terms(
            lp, old, ref, adv, coef, scale, params,
            LOSS_KIND, BIAS_CORRECTION, DUAL_CLIP, CISPO_LOWER, TRUST_REGION, QUADRATIC,
        )  # fmt: skip
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
        dual_sum += tl.sum(mf * dual, axis=0)
    out = stats_ptr + row * STATS_PER_ROW
    tl.store(out + STAT_LOSS_SUM, loss_sum)
    tl.store(out + STAT_COUNT, count)
    tl.store(out + STAT_KL_SUM, kl_sum)
    tl.store(out + STAT_LOW_SUM, low_sum)
    tl.store(out + STAT_HIGH_SUM, high_sum)
    tl.store(out + STAT_REGION_SUM, region_sum)
    tl.store(out + STAT_CISPO_SUM, cispo_sum)
    tl.store(out + STAT_COEF, seq_coef)
    tl.store(out + STAT_DUAL_SUM, dual_sum)


@triton.jit
def grpo_bwd_kernel(
    inputs, row_strides, token_strides,
    grad_row_ptr,  # [B] fp32: dLoss / d row_loss_sum
    grad_logp_ptr,  # [B, T] fp32 out, contiguous
    T, params,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_IS_RATIO: tl.constexpr,
    LOSS_KIND: tl.constexpr, SEQUENCE: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    DUAL_CLIP: tl.constexpr, CISPO_LOWER: tl.constexpr, TRUST_REGION: tl.constexpr, QUADRATIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_row_ptr + row).to(tl.float32)
    seq_coef = 1.0
    coef_sum = 0.0  # sequence level: sum_s m_s * d_coef_s, times coef / max(n, 1)
    if SEQUENCE:
        seq_coef, n = _row_seq_coef(inputs, row_strides, token_strides, row, T, params,
                                    HAS_OLD, HAS_REF, HAS_WEIGHT, HAS_IS_RATIO, BLOCK_T)  # fmt: skip
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            m, lp, old, ref, adv, scale = _load_tile(inputs, row_strides, token_strides, row, offs, T,
                                                     HAS_OLD, HAS_REF, HAS_WEIGHT, HAS_IS_RATIO)  # fmt: skip
            ptl, klc, c1, d_coef, d_direct, dual = _token_terms(
                lp, old, ref, adv, seq_coef + 0.0 * lp, scale, params,
                LOSS_KIND, BIAS_CORRECTION, DUAL_CLIP, CISPO_LOWER, TRUST_REGION, QUADRATIC,
            )  # fmt: skip
            coef_sum += tl.sum(tl.where(m, d_coef, 0.0), axis=0)
        # d coef_b / d logp_t = coef_b * m_t / max(n, 1)  (coef_b = exp(mean of the row's log ratios))
        coef_sum = coef_sum * seq_coef / tl.maximum(n, 1.0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, lp, old, ref, adv, scale = _load_tile(inputs, row_strides, token_strides, row, offs, T,
                                                 HAS_OLD, HAS_REF, HAS_WEIGHT, HAS_IS_RATIO)  # fmt: skip
        if SEQUENCE:
            ptl, klc, c1, d_coef, d_direct, dual = _token_terms(
                lp, old, ref, adv, seq_coef + 0.0 * lp, scale, params,
                LOSS_KIND, BIAS_CORRECTION, DUAL_CLIP, CISPO_LOWER, TRUST_REGION, QUADRATIC,
            )  # fmt: skip
            _lr, keep = _log_ratio(lp, old, params)
            d = d_direct + coef_sum * keep
        else:
            lr, keep = _log_ratio(lp, old, params)
            coef = tl.exp(lr)
            ptl, klc, c1, d_coef, d_direct, dual = _token_terms(
                lp, old, ref, adv, coef, scale, params,
                LOSS_KIND, BIAS_CORRECTION, DUAL_CLIP, CISPO_LOWER, TRUST_REGION, QUADRATIC,
            )  # fmt: skip
            d = d_coef * coef * keep + d_direct  # d coef / d logp = coef (token level, inside the clamp)
        tl.store(grad_logp_ptr + row * T + offs, tl.where(m, g * d, 0.0), mask=offs < T)


# ---- compile cases: every launch config, at the two flag sets that bound the kernels' size -----
_FLAG_SETS = (
    # everything loaded, clipped, sequence level, bias-corrected KL (the most registers)
    dict(input_flags(OPTIONAL_INPUTS), LOSS_KIND=LOSS_KINDS["clipped"], SEQUENCE=True, BIAS_CORRECTION=True,
         DUAL_CLIP=True, CISPO_LOWER=False, TRUST_REGION=0, QUADRATIC=False),
    # on-policy, nothing optional, token level: SAPO and CISPO (two-sided: verl's)
    dict(input_flags(()), LOSS_KIND=LOSS_KINDS["sapo"], SEQUENCE=False, BIAS_CORRECTION=False, DUAL_CLIP=False,
         CISPO_LOWER=False, TRUST_REGION=0, QUADRATIC=False),
    dict(input_flags(("ref",)), LOSS_KIND=LOSS_KINDS["cispo"], SEQUENCE=False, BIAS_CORRECTION=True,
         DUAL_CLIP=False, CISPO_LOWER=True, TRUST_REGION=0, QUADRATIC=False),
    # verl's DPPO (binary-KL trust region) and DRO (quadratic penalty) on the CISPO variant
    dict(input_flags(("old", "is_ratio")), LOSS_KIND=LOSS_KINDS["cispo"], SEQUENCE=False, BIAS_CORRECTION=False,
         DUAL_CLIP=False, CISPO_LOWER=True, TRUST_REGION=2, QUADRATIC=True),
)


def _signature(kernel_name: str, constexprs: dict):
    n = len(TOKEN_INPUTS)
    sig = {"inputs": ("*fp32",) * n, "row_strides": ("i64",) * n, "token_strides": ("i64",) * n}
    if kernel_name == "fwd":
        sig["stats_ptr"] = "*fp32"
    else:
        sig["grad_row_ptr"] = "*fp32"
        sig["grad_logp_ptr"] = "*fp32"
    sig["T"] = "i32"
    sig["params"] = ("fp32",) * len(PARAMS)
    sig.update({name: "constexpr" for name in constexprs})
    return sig


COMPILE_CASES = [
    dict(kernel=kernel, signature=_signature(name, {**flags, "BLOCK_T": block_t}),
         constexprs={**flags, "BLOCK_T": block_t}, num_warps=num_warps)  # fmt: skip
    for name, kernel in (("fwd", grpo_fwd_kernel), ("bwd", grpo_bwd_kernel))
    for flags in _FLAG_SETS
    for block_t, num_warps in GRPO_CONFIGS
]
