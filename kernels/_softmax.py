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
A whole row with no mass (every logit ``-inf``: a ``support=`` row with no kept token) has no
distribution; its limit, as in ``alignkernels/ops/_softmax_torch.py``: ``log_sum = -inf``, ``H = 0``
(``finalise``), ``logp = -inf`` (``log_prob``), a gradient of exactly 0 (``grad_centred``).

Gradient (``grad_centred``), with ``zc = z - m``:

    d logp / dz_v = onehot_v - p_v,   d H / dz_v = -p_v (z_v - Σ p·z)
    p_v = e^(zc_v - log_sum),   z_v - Σ p·z = zc_v - (log_sum - H)      (both centred)
    dz_v = g_logp (onehot_v - p_v) - g_H p_v (z_v - Σ p·z)

and ``d/dx = dz / T · f'(x)`` (``transform`` returns ``f'``). Interpreter-safe: softcap's tanh is built
from ``tl.exp`` and a short odd polynomial (``libdevice.tanh`` returns nothing under
``TRITON_INTERPRET=1``; ``2·sigmoid(2u) - 1`` has an *absolute* error of ~6e-8, so ``softcap·tanh(u)``
was ~1e-4 off at a cap of 1e3 over O(1) logits); the interpreter's ``tl.fma`` rounds once, like the
hardware's. Softcap precision: tanh within 3.5e-7 relative (3 ulp) at every ``u`` with the
interpreter's exp (numpy, 0.5 ulp), tested against fp64 for caps 1e-3..1e6
(``tests/test_reliability_numerics.py``); on the GPU ``tl.exp`` is ``ex2.approx`` (~2 ulp) of
``-2|u|·log2 e``, which adds at most ~1e-6 relative for ``|u| < 10``.
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


# Below this |u| the softcap's tanh is its odd Taylor polynomial (relative error < 1e-8 there); above
# it, ``(1 - e)/(1 + e)`` with ``e = e^(-2|u|) <= e^-0.5`` loses at most ~1.3 bits to the subtraction.
TANH_SERIES_MAX = tl.constexpr(0.25)


@triton.jit
def transform(x, logit_scale, softcap):
    """``y = f(x)`` and ``f'(x)``: ``f(x) = logit_scale·x``, or with ``softcap > 0``
    ``f(x) = softcap·tanh(u)``, ``u = logit_scale·x / softcap``, ``f'(x) = logit_scale·sech²(u)``.

    Both with *relative* accuracy at every ``u`` (a cap far above the logits makes ``|u|`` tiny, and
    ``softcap·tanh(u)`` must keep the digits of ``logit_scale·x``): with ``e = e^(-2|u|)``,
    ``tanh|u| = u - u³/3 + 2u⁵/15 - 17u⁷/315 + 62u⁹/2835`` for ``|u| < TANH_SERIES_MAX``, else
    ``(1 - e)/(1 + e)``; ``sech²(u) = 4e/(1 + e)²`` everywhere (never ``1 - tanh²``, which cancels as
    ``|u|`` grows). ``x = ±inf`` gives ``e = 0``: ``y = ±softcap``, ``f' = 0``."""
    y = x * logit_scale
    dy_dx = tl.zeros_like(x) + logit_scale  # (not x·0: x = -inf, a -inf bias, would make it NaN)
    if softcap > 0:
        u = y / softcap
        a = tl.abs(u)
        e = tl.exp(-2.0 * a)
        u2 = u * u
        series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
        by_exp = (1.0 - e) / (1.0 + e)
        tanh_u = tl.where(a < TANH_SERIES_MAX, series, tl.where(u < 0, -by_exp, by_exp))
        y = softcap * tanh_u
        dy_dx = logit_scale * (4.0 * e / ((1.0 + e) * (1.0 + e)))
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
    """``(log_sum, H)`` from a row's merged ``s``, ``t``: ``log_sum = log s``, ``H = log s - t/s``, at
    least 0 (see :func:`log_prob`); a row with no mass (``s = 0``): ``log_sum = -inf``, ``H = 0``."""
    log_sum = tl.log(s)
    entropy = tl.where(s == 0.0, 0.0, log_sum - t / s)
    return log_sum, tl.where(entropy < 0.0, 0.0, entropy)  # NaN stays NaN (not tl.maximum: it drops NaN)


@triton.jit
def log_prob(label_centred, log_sum):
    """``logp = (z_label - m) - log_sum``, at most 0: ``logp <= 0`` and ``H >= 0`` hold exactly, while the
    roundings of ``exp``/``log`` can put either one ulp on the wrong side of 0 in a peaked row
    (``p_label ≈ 1``); moving them towards the true value never adds error. NaN stays NaN. A row
    with no mass (``log_sum = -inf``) gives ``-inf``, where the difference would be NaN."""
    logp = tl.where(log_sum == float("-inf"), float("-inf"), label_centred - log_sum)
    return tl.where(logp > 0.0, 0.0, logp)


@triton.jit
def grad_centred(zc, is_label, log_sum, entropy, g_logp, g_entropy):
    """``dz = g_logp (onehot - p) - g_H p (z - Σp·z)`` from centred logits ``zc = z - m`` (see the
    module docstring); exactly 0 where ``p = 0`` (``z = -inf``) and on a whole row with no mass
    (``log_sum = -inf``; its ``zc`` may be NaN, ``-inf - (-inf)``), the label's column included."""
    p = tl.exp(zc - log_sum)
    dev = zc - (log_sum - entropy)  # z - Σ p·z
    dz = tl.where(p == 0.0, 0.0, -p * (g_logp + g_entropy * dev))
    return tl.where(log_sum == float("-inf"), 0.0, dz + tl.where(is_label, g_logp, 0.0))


@triton.jit
def kept_logits(y, support_row_ptr, cols, in_row, has_support):
    """The sampler's kept set (``support=``, ``alignkernels/ops/_support.py``): ``y`` with every column
    outside the row's kept set (bit ``cols % 32`` of word ``cols // 32`` at
    ``support_row_ptr``) set to ``-inf``; ``y`` itself when ``has_support`` is false (nothing read; a
    constexpr or a program-uniform runtime flag)."""
    if has_support:
        words = tl.load(support_row_ptr + cols // 32, mask=in_row, other=0)
        y = tl.where(((words >> (cols % 32)) & 1) != 0, y, float("-inf"))
    return y
