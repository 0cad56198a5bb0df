"""KL estimators as rows, differentiable: per-token estimates of KL(π_θ ‖ π_ref) from log-probs.

With ``d = logp - ref_logp`` (http://joschu.net/blog/kl-approx.html), one row of ``KL_ESTIMATORS``
each:

- ``k1`` (verl ``kl``): ``d``; ``abs``: ``|d|``; ``k2`` (verl ``mse``): ``d² / 2``;
- ``k3`` (verl ``low_var_kl``): ``exp(-d) - 1 + d``.

``gradient`` picks what the backward pass differentiates:

- ``"estimator"`` (default): the estimate's own formula (the pathwise gradient);
- ``"reverse_kl"``: straight-through, the value is the estimate but the gradient is that of
  ``w · d² / 2`` (k2's gradient ``d · ∇logp``, whose expectation is ∇KL), with
  ``w = min(exp(logp - old_logp), is_clip)`` detached when ``old_logp`` is given (off-policy samples,
  OpenRLHF ``unbiased_gradient=True``) and ``w = 1`` otherwise (verl's ``k1+`` / ``k3+`` ...).
  A name with a ``+`` suffix (``"k3+"``) selects it, as in verl.

``clamp`` picks the framework's numerical guards, one ``KLClamp`` row each: ``"none"`` (default,
the formulas as written), ``"verl"`` (``k3``: ``d`` in ``[-20, 20]`` before ``exp``, the estimate
in ``[-10, 10]``; verl ``kl_penalty_forward``), ``"openrlhf"`` (``k3``: ``d >= -10`` before
``exp``; every estimate in ``[-10, 10]``; OpenRLHF ``compute_approx_kl``).

Memory: elementwise on ``[B, T]``, one temporary per step. Numerics: in the inputs' floating
dtype promoted to at least fp32 (fp64 stays fp64). Masked positions (``mask == 0``) give 0 and no
gradient whatever they hold (NaN padding included).
Tests: ``tests/frameworks/test_verl_parity.py``, ``tests/frameworks/test_openrlhf_parity.py``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._utils import check_same_device, check_tensor
from .aggregation import lookup
from .validation import check_number


class KLEstimator(NamedTuple):
    name: str
    value: Callable[[torch.Tensor], torch.Tensor]  # d = logp - ref_logp -> the estimate
    aliases: tuple[str, ...]  # other frameworks' names of the same row
    has_exp: bool  # the formula exponentiates d (KLClamp.exp_log_ratio applies)
    unbiased_value: bool  # E_{π_θ}[estimate] = KL
    nonnegative: bool
    summary: str


class KLClamp(NamedTuple):
    name: str
    exp_log_ratio: tuple[float, float] | None  # bounds on d before an exp (rows with has_exp)
    value: tuple[float, float] | None  # bounds on the estimate
    value_rows: tuple[str, ...] | None  # the rows whose estimate is bounded (None: all)


KL_ESTIMATORS: dict[str, KLEstimator] = {
    row.name: row
    for row in (
        KLEstimator("k1", lambda d: d, ("kl",), False, True, False, "log-ratio"),
        KLEstimator("abs", torch.abs, (), False, False, True, "|log-ratio|"),
        KLEstimator("k2", lambda d: 0.5 * d.square(), ("mse",), False, False, True, "half squared log-ratio"),
        KLEstimator("k3", lambda d: torch.expm1(-d) + d, ("low_var_kl",), True, True, True,
                    "exp(-d) - 1 + d (Schulman's low-variance estimator)"),  # fmt: skip
    )
}
KL_ALIASES = {alias: row.name for row in KL_ESTIMATORS.values() for alias in (row.name, *row.aliases)}

KL_CLAMPS: dict[str, KLClamp] = {
    row.name: row
    for row in (
        KLClamp("none", None, None, None),
        KLClamp("verl", (-20.0, 20.0), (-10.0, 10.0), ("k3",)),
        KLClamp("openrlhf", (-10.0, float("inf")), (-10.0, 10.0), None),
    )
}
KL_GRADIENTS = ("estimator", "reverse_kl")
IS_WEIGHT_CLIP = 10.0  # OpenRLHF KL_IS_WEIGHT_CLIP: the importance weight's upper bound


def resolve_estimator(name: str) -> tuple[KLEstimator, bool]:
    """``(row, straight_through)`` for a name, an alias, or either with verl's ``+`` suffix."""
    base = name[:-1] if isinstance(name, str) and name.endswith("+") else name
    canonical = KL_ALIASES.get(base) if isinstance(base, str) else None
    if canonical is None:
        names = ", ".join(sorted(KL_ALIASES))
        raise ValueError(f"kl_estimator must be one of {names} (optionally with a '+' suffix); got {name!r}")
    return KL_ESTIMATORS[canonical], name != base


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kl_estimator: str = "k1",
    *,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    gradient: str | None = None,
    clamp: str = "none",
    is_clip: float = IS_WEIGHT_CLIP,
) -> torch.Tensor:
    """Per-token KL estimate ``[*]`` (see the module docstring), differentiable w.r.t. ``logp``
    (and ``ref_logp``, which a trainer usually detaches).

    Args:
        logp, ref_logp: log-probs of the sampled tokens under the policy and the reference.
        kl_estimator: a row name or alias of ``KL_ESTIMATORS``; a ``+`` suffix means
            ``gradient="reverse_kl"`` (verl).
        mask: positions to keep; elsewhere 0 with no gradient.
        old_logp: the rollout policy's log-probs: importance weight of the ``reverse_kl`` gradient.
        gradient: ``"estimator"`` or ``"reverse_kl"`` (default: from the name's ``+``).
        clamp: a ``KL_CLAMPS`` row: ``"none"``, ``"verl"``, ``"openrlhf"``.
        is_clip: upper bound of the importance weight (OpenRLHF: 10).
    """
    row, plus = resolve_estimator(kl_estimator)
    if gradient is None:
        gradient = "reverse_kl" if plus else "estimator"
    if gradient not in KL_GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(KL_GRADIENTS)}; got {gradient!r}")
    if plus and gradient != "reverse_kl":
        raise ValueError(f"kl_estimator {kl_estimator!r} (a '+' name) asks for gradient='reverse_kl', got {gradient!r}")
    rule = lookup(KL_CLAMPS, clamp, "clamp")
    check_tensor("logp", logp, floating=True)
    check_tensor("ref_logp", ref_logp, floating=True)
    for name, t in (("ref_logp", ref_logp), ("mask", mask), ("old_logp", old_logp)):
        if t is not None and tuple(t.shape) != tuple(logp.shape):
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(t.shape)}")
    if old_logp is not None:
        check_tensor("old_logp", old_logp, floating=True)
        if gradient != "reverse_kl":
            raise ValueError("old_logp (the importance weight) is only used with gradient='reverse_kl'")
    check_same_device(logp=logp, ref_logp=ref_logp, mask=mask, old_logp=old_logp)
    if not check_number("is_clip", is_clip) > 0:
        raise ValueError(f"is_clip must be > 0, got {is_clip}")

    cd = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    valid = None if mask is None else mask != 0
    zero = torch.zeros((), dtype=cd, device=logp.device)

    def keep(t):  # masked positions: 0, and no gradient through whatever they hold
        return t.to(cd) if valid is None else torch.where(valid, t.to(cd), zero)

    d = keep(logp) - keep(ref_logp)
    x = d.clamp(*rule.exp_log_ratio) if (row.has_exp and rule.exp_log_ratio is not None) else d
    value = row.value(x)
    if rule.value is not None and (rule.value_rows is None or row.name in rule.value_rows):
        value = value.clamp(*rule.value)
    if gradient == "estimator":
        return value
    surrogate = 0.5 * d.square()
    if old_logp is not None:
        w = torch.exp(keep(logp).detach() - keep(old_logp).detach()).clamp(max=float(is_clip))
        surrogate = w * surrogate
    return value.detach() + (surrogate - surrogate.detach())
