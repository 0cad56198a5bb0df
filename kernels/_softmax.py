"""The softmax math every Triton kernel shares (token fwd/bwd, linear fwd/bwd): one home per formula.

Notation, per row: ``x`` a raw logit (bias included), ``y = f(x)`` the transformed logit before the
temperature (``f`` = logit_scale, then the optional softcap), ``z = y / T`` the logit the softmax sees,
``p = softmax(z)``.

The saved state of a row is the centred pair ``(m, log_sum)`` with ``m`` the row max of ``z`` and
``log_sum = log Σ e^(z - m)`` (so ``lse = m + log_sum``), plus the entropy ``H``. Every sum is kept
relative to ``m`` and every ``z - m`` is formed as ``fma(y, 1/T, -m)``: one rounding of the exact
``y/T - m``, so nothing loses digits when ``|z|`` is large (offset logits, low temperature) --
``y * (1/T) - m`` would round ``z`` first (an error of ``ulp(|z|)``: 0.06 at ``|z| = 1e6``).

Online statistics of one row (``centred_stats`` for a block, ``merge_stats`` to combine two):

    m = max z,   s = Σ e^(z - m),   t = Σ (z - m) e^(z - m)
    log_sum = log s,   Σ p·(z - m) = t / s,   H = -Σ p log p = log s - t / s

Two partials (m1, s1, t1), (m2, s2, t2) merge on ``m = max(m1, m2)`` with ``a_i = e^(m_i - m)``:
``s = a1 s1 + a2 s2`` and, since ``z - m = (z - m_i) + (m_i - m)``,
``t = a1 (t1 + (m1 - m) s1) + a2 (t2 + (m2 - m) s2)``.
A partial with no mass (``m_i = -inf``, ``s_i = 0``) contributes exactly 0 (never ``0 * inf``).

Gradient (``grad_centred``), with ``zc = z - m``:

    d logp / dz_v = onehot_v - p_v,   d H / dz_v = -p_v (z_v - Σ p·z)
    p_v = e^(zc_v - log_sum),   z_v - Σ p·z = zc_v - (log_sum - H)      (both centred)
    dz_v = g_logp (onehot_v - p_v) - g_H p_v (z_v - Σ p·z)

and ``d/dx = dz / T · f'(x)`` (``transform`` returns ``f'``). Interpreter-safe: softcap's tanh is
``2·sigmoid(2u) - 1`` (``libdevice.tanh`` returns nothing under ``TRITON_INTERPRET=1``); the
interpreter's ``tl.fma`` rounds once, like the hardware's.
"""
import triton
import triton.language as tl

# The per-row softmax state the forward saves for the backward: rows of one [len(ROW_STATS), N] fp32
# tensor, in this order (the field offsets below come from this tuple).
ROW_STATS = ("row_max", "log_sum", "entropy")
ROW_MAX, LOG_SUM, ENTROPY = (tl.constexpr(i) for i in range(len(ROW_STATS)))
# Upstream gradients read by the backward, rows of one [len(GRADS), N] fp32 tensor (a missing one is
# a constexpr-off flag, never read).
GRADS = ("grad_logp", "grad_entropy")
GRAD_LOGP, GRAD_ENTROPY = (tl.constexpr(i) for i in range(len(GRADS)))


@triton.jit
def transform(x, logit_scale, softcap):
    """``y = f(x)`` and ``f'(x)``: ``f(x) = logit_scale·x``, or with ``softcap > 0``
    ``f(x) = softcap·tanh(logit_scale·x / softcap)``, ``f'(x) = logit_scale·(1 - tanh²)``
    (``d/du tanh(u) = 1 - tanh²(u)``; tanh written as ``2·sigmoid(2u) - 1``, exact to ~1e-7)."""
    y = x * logit_scale
    dy_dx = tl.zeros_like(x) + logit_scale  # (not x·0: x = -inf, a -inf bias, would make it NaN)
    if softcap > 0:
        c = 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0
        y = softcap * c
        dy_dx = logit_scale * (1.0 - c * c)
    return y, dy_dx


@triton.jit
def centred(y, inv_temperature, m):
    """``z - m = y/T - m`` with one rounding (``m`` finite)."""
    return tl.fma(y, inv_temperature, -m)


@triton.jit
def centred_stats(y, inv_temperature):
    """``(m, s, t, e)`` of a block of pre-temperature logits ``y`` (``-inf`` on masked lanes):
    ``m = max z``, ``s = Σ e^(z-m)``, ``t = Σ (z-m) e^(z-m)``, ``e = e^(z-m)`` per lane (0 on masked
    lanes). A block of only ``-inf`` gives ``m = -inf``, ``s = t = 0``."""
    m = tl.max(y, axis=0) * inv_temperature
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # never (-inf) - (-inf)
    zc = centred(y, inv_temperature, m_safe)
    e = tl.exp(zc)
    s = tl.sum(e, axis=0)
    t = tl.sum(tl.where(e == 0.0, 0.0, e * zc), axis=0)  # 0·(-inf) := 0
    return m, s, t, e


@triton.jit
def merge_stats(m1, s1, t1, m2, s2, t2):
    """Merge two centred partials (see the module docstring). Returns ``(m, s, t, a1, a2)`` with the
    rescale factors ``a_i = e^(m_i - m)`` (0 for an empty partial) for sums that merge alike."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    a1 = tl.exp(m1 - m_safe)
    a2 = tl.exp(m2 - m_safe)
    # (m_i - m) s_i with s_i = 0 where m_i = -inf: guard the 0·(-inf)
    shift1 = tl.where(s1 > 0, (m1 - m_safe) * s1, 0.0)
    shift2 = tl.where(s2 > 0, (m2 - m_safe) * s2, 0.0)
    s = a1 * s1 + a2 * s2
    t = a1 * (t1 + shift1) + a2 * (t2 + shift2)
    return m, s, t, a1, a2


@triton.jit
def finalise(s, t):
    """``(log_sum, H)`` from a row's merged ``s``, ``t``: ``log_sum = log s``, ``H = log s - t/s``."""
    log_sum = tl.log(s)
    return log_sum, log_sum - t / s


@triton.jit
def grad_centred(zc, is_label, log_sum, entropy, g_logp, g_entropy):
    """``dz = g_logp (onehot - p) - g_H p (z - Σp·z)`` from centred logits ``zc = z - m`` (see the
    module docstring); exactly 0 where ``p = 0`` (``z = -inf``)."""
    p = tl.exp(zc - log_sum)
    dev = zc - (log_sum - entropy)  # z - Σ p·z
    dz = tl.where(p == 0.0, 0.0, -p * (g_logp + g_entropy * dev))
    return dz + tl.where(is_label, g_logp, 0.0)
