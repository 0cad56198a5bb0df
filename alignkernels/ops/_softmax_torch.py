"""The softmax math of every PyTorch path, once: the fold of a logits block into centred row
statistics, the merge of partial statistics (vocab blocks of the lm-head engine and vocab-parallel
shards alike), the gradient, and the logit transform with its derivative. The Triton twin is
``alignkernels/kernels/_softmax.py``; both follow the same derivation.

Notation, per row: ``y`` a transformed logit before the temperature (``transform_``), ``z = y / T``,
``p = softmax(z)``. A row's state is :class:`RowStats` ``(row_max, log_sum, entropy)``:
``row_max = max z``, ``log_sum = log Σ e^(z - row_max)`` (``lse = row_max + log_sum``),
``entropy = H = log_sum - Σ p·(z - row_max)``. Nothing is ever formed from one absolute ``lse``.

Precision at large ``|z|`` (offset logits, low temperature). ``z - row_max`` is formed by
:func:`centred` as ``(y - shift)/T + fix``: ``shift = row_max·T`` (rounded) is a raw-unit shift,
``y - shift`` is a small difference (rounded relative to itself, not to ``|y|``), and the per-row
``fix = shift/T - row_max`` is computed in fp64 (``shift/T`` exactly, then one rounding). Rounding
``z = y/T`` first would cost ``ulp(|z|)`` -- 0.06 at ``|z| = 1e6`` -- in every exponent.

Fold of a block (:func:`fold_block`): with the block max ``m_y`` of ``y``, ``d = (y - m_y)/T`` is
``z`` centred on the exact ``m_y/T``; ``s = Σ e^d``, ``t = Σ d e^d`` give the block's
``log_sum = log s + fix`` (``fix = m_y/T - row_max``, fp64 per row) and ``H = log s - t/s`` (shift
invariant).

Merge (:func:`merge_terms` + :func:`merged`): for parts ``k`` of a row and a shared ``M >= row_max_k``,
``Σ_{v∈k} e^(z-M) = w_k = e^(row_max_k - M + log_sum_k)`` and
``Σ_{v∈k} (z-M) e^(z-M) = w_k·(log_sum_k - H_k + row_max_k - M)``; summing the two terms over the
parts (``torch.sum``, or an all-reduce across ranks) gives ``log_sum = log S``, ``H = log S - P/S``.
A part with no mass (``row_max_k = -inf``) has ``w_k = 0`` exactly.

Bounds (:func:`log_prob`, :func:`non_negative`): ``logp <= 0`` and ``H >= 0`` hold exactly, not just
to an ulp: the roundings of ``exp``/``log`` can put ``zc_label - log_sum`` or ``log s - t/s`` one ulp on
the wrong side of 0 (a peaked row, ``p_label ≈ 1``), so both are clamped where they are formed (NaN stays
NaN). Moving them *towards* the true value never adds error.

A row with no mass (every logit ``-inf``: a ``support=`` row with no kept token, ``ops/_support.py``)
has ``log_sum = -inf`` and no distribution at all; its limit is that of any label outside the kept set:
``logp = -inf`` (:func:`log_prob`), ``H = 0`` (:func:`merged`, :func:`fold_block`) and a gradient of
exactly 0 on every logit, the label's included (:func:`grad_from_centred_`): no NaN anywhere.

Gradient (:func:`grad_from_centred_`), with ``zc = z - row_max``: ``p = e^(zc - log_sum)``,
``z - Σp·z = zc - (log_sum - H)``, ``dz = g_logp (onehot - p) - g_H p (z - Σp·z)``; the chain rule
to the raw logit (:func:`raw_grad_`) multiplies by ``1/T`` and the transform's derivative.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# -z beyond this is "no mass": exp() is exactly 0 and products with any upstream gradient stay finite
# (-inf itself would turn 0 · inf into NaN).
_NO_MASS = -1e30


class RowStats(NamedTuple):
    """Centred softmax state of rows (each field ``[rows]``, fp32 or fp64)."""

    row_max: torch.Tensor  # max z
    log_sum: torch.Tensor  # log Σ e^(z - row_max)
    entropy: torch.Tensor  # log_sum - Σ p·(z - row_max)


def transform_(x: torch.Tensor, logit_scale: float, softcap: float | None, keep_derivative: bool = False):
    """In place: raw logits ``x`` (bias included) -> ``y = logit_scale·x``, or with ``softcap``
    ``y = softcap·tanh(logit_scale·x / softcap)`` (Gemma). With ``keep_derivative`` returns
    ``(y, dy/dx)`` where ``dy/dx = logit_scale·(1 - tanh²)`` (a new tensor; ``None`` without
    softcap: the derivative is the constant ``logit_scale``), else ``y``."""
    derivative = None
    if softcap is not None:
        x.mul_(logit_scale / softcap).tanh_()
        if keep_derivative:  # d/du tanh(u) = 1 - tanh²(u)
            derivative = torch.addcmul(torch.ones((), dtype=x.dtype, device=x.device), x, x, value=-1.0)
            derivative.mul_(logit_scale)
        x.mul_(softcap)
    elif logit_scale != 1.0:
        x.mul_(logit_scale)
    return (x, derivative) if keep_derivative else x


def log_prob(label_centred: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """``logp = (z_label - row_max) - log_sum``, at most 0 (``-inf`` for a masked label and for a row with
    no mass, ``log_sum = -inf``, where the difference would be NaN; NaN stays)."""
    return torch.where(torch.isneginf(log_sum), float("-inf"), torch.clamp(label_centred - log_sum, max=0.0))


def log_sum_sq_probs(sum_sq_exp: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """``log Σ p² = log Σ e^{2(z - m)} - 2·log_sum`` (TRL's statistic); ``-inf`` for a row with no mass
    (``log_sum = -inf``: ``Σ p²`` over an empty distribution is 0), where the difference would be NaN."""
    return torch.where(torch.isneginf(log_sum), float("-inf"), sum_sq_exp.log() - 2 * log_sum)


def non_negative(entropy: torch.Tensor) -> torch.Tensor:
    """An entropy (or a partial one) formed as ``log s - t/s``, at least 0 (NaN stays NaN)."""
    return torch.clamp(entropy, min=0.0)


def _shift_fix(raw_shift: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """``raw_shift/T - row_max`` per row in fp64, rounded once to the compute dtype."""
    exact = raw_shift.double() / temperature - row_max.double()
    return exact.to(row_max.dtype)


def centred(y: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z - row_max`` for pre-temperature ``y [rows, cols]`` (a new tensor; see the module docstring)."""
    finite_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
    if temperature == 1.0:
        return torch.sub(y, finite_max[:, None])
    shift = finite_max * temperature
    fix = _shift_fix(shift, finite_max, temperature)
    return torch.sub(y, shift[:, None]).div_(temperature).add_(fix[:, None])


class BlockFold(NamedTuple):
    """What :func:`fold_block` returns: the block's stats, ``d = z - m_y/T`` (``z`` centred on the
    block's exact max, ``_NO_MASS`` at ``-inf``) and ``e = e^d`` (in the ``work`` buffer)."""

    stats: RowStats
    d: torch.Tensor
    e: torch.Tensor
    sum_e: torch.Tensor  # Σ e per row


def fold_block(y: torch.Tensor, temperature: float, work: torch.Tensor) -> BlockFold:
    """Fold pre-temperature logits ``y [rows, cols]`` (overwritten with ``d``) into centred stats;
    ``work`` is a scratch buffer of ``y``'s shape and dtype (receives ``e``)."""
    m_y = y.amax(1)
    finite = torch.where(torch.isneginf(m_y), 0.0, m_y)
    d = y.sub_(finite[:, None])
    if temperature != 1.0:
        d.div_(temperature)
    d.clamp_(min=_NO_MASS)
    e = torch.exp(d, out=work)
    s = e.sum(1)
    # Σ d e^d (torch.linalg.vecdot sums exactly enough; an einsum loses ~1e-4 over long rows on CPU)
    t = torch.linalg.vecdot(e, d)
    log_s = s.log()
    row_max = m_y / temperature if temperature != 1.0 else m_y
    fix = _shift_fix(finite, torch.where(torch.isneginf(m_y), 0.0, row_max), temperature)
    empty = s == 0  # only -inf in the block: no mass
    entropy = torch.where(empty, 0.0, non_negative(log_s - t / s))
    log_sum = torch.where(empty, float("-inf"), log_s + fix)
    return BlockFold(RowStats(row_max, log_sum, entropy), d, e, s)


def merge_terms(part: RowStats, row_max: torch.Tensor) -> torch.Tensor:
    """``[2, rows]``: ``Σ e^(z-M)`` and ``Σ (z-M) e^(z-M)`` of ``part`` for the shared max ``M = row_max``."""
    finite_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
    offset = part.row_max - finite_max  # <= 0; -inf for an empty part
    w = torch.exp(offset + part.log_sum)
    centred_mean = torch.where(w > 0, part.log_sum - part.entropy + offset, 0.0)
    return torch.stack((w, w * centred_mean))


def merged(row_max: torch.Tensor, terms: torch.Tensor) -> RowStats:
    """Rows' stats from the summed :func:`merge_terms` of all their parts."""
    log_sum = terms[0].log()
    # no mass: 0; NaN stays NaN
    entropy = torch.where(terms[0] == 0, 0.0, non_negative(log_sum - terms[1] / terms[0]))
    return RowStats(row_max, log_sum, entropy)


def merge_pair(a: RowStats, b: RowStats) -> tuple[RowStats, torch.Tensor, torch.Tensor]:
    """Merge two partials of the same rows; also returns ``e^(row_max_a - M)``, ``e^(row_max_b - M)``
    (rescale factors for any other sum kept relative to the parts' maxima)."""
    row_max = torch.maximum(a.row_max, b.row_max)
    finite = torch.where(torch.isneginf(row_max), 0.0, row_max)
    return merged(row_max, merge_terms(a, row_max) + merge_terms(b, row_max)), (a.row_max - finite).exp(), (
        b.row_max - finite
    ).exp()


def grad_from_centred_(zc, log_sum, entropy, g_logp, g_entropy, label_cols, work):
    """In place: centred logits ``zc = z - row_max [rows, cols]`` -> ``dz`` (returned in ``work``).

    ``g_logp`` / ``g_entropy``: per-row upstream gradients or ``None`` (not both); ``label_cols``:
    each row's label column in this block, or an out-of-block value (no one-hot there). A row with no
    mass (``log_sum = -inf``, every ``zc = -inf``) gets exactly 0: its ``p`` is formed against
    ``log_sum = 0`` (``e^(-inf) = 0``, never ``e^(-inf + inf)``) and it has no one-hot."""
    zc.clamp_(min=_NO_MASS)  # z = -inf: p = 0 and every product finite
    has_mass = ~torch.isneginf(log_sum)
    log_sum = torch.where(has_mass, log_sum, 0.0)
    p = torch.sub(zc, log_sum[:, None], out=work).exp_()  # p = e^(zc - log_sum)
    if g_entropy is not None:
        # g_logp + g_H (z - Σp·z) = g_H·zc + (g_logp - g_H (log_sum - H))   (zc centred: no cancellation)
        g_l = g_logp if g_logp is not None else torch.zeros_like(g_entropy)
        coef = zc.mul_(g_entropy[:, None]).add_((g_l - g_entropy * (log_sum - entropy))[:, None])
        dz = p.mul_(coef).neg_()
    else:
        dz = p.mul_(-g_logp[:, None])
    if g_logp is not None:  # + g_logp · onehot
        n_cols = dz.shape[1]
        in_block = (label_cols >= 0) & (label_cols < n_cols) & has_mass
        dz.scatter_add_(1, label_cols.clamp(0, n_cols - 1)[:, None], torch.where(in_block, g_logp, 0.0)[:, None])
    return dz


def raw_grad_(dz: torch.Tensor, dy_dx: torch.Tensor | None, logit_scale: float, temperature: float) -> torch.Tensor:
    """In place: ``d loss / dz`` -> ``d loss / dx`` for ``z = f(x) / T``: ``dz · f'(x) / T``, with
    ``f' = dy_dx`` from :func:`transform_` (``None``: the constant ``logit_scale``)."""
    if dy_dx is None:
        return dz.mul_(logit_scale / temperature)
    return dz.mul_(dy_dx).div_(temperature)
