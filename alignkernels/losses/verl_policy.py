"""verl's policy losses as rows: ``verl.trainer.ppo.core_algos``'s registered ``loss_mode`` s.

One row of ``VERL_POLICY_LOSSES`` per verl 0.9.1 ``POLICY_LOSS_REGISTRY`` name: its per-token (or
per-sequence) formula, the ratio level, clipping rule and IS weighting (documentation columns), a
fixed aggregation where verl ignores ``loss_agg_mode``, the metrics it logs, whether it is
token-separable, and which Triton row variant runs it. ``verl_policy_loss`` is the dispatcher:
validation (an unknown name lists the table), the row's formula on masked-neutral inputs, then
``losses/aggregation.py`` ``aggregate_rows`` with verl's semantics and global-batch arguments.

With ``r = exp(clamp(logp − old, ±20))`` (the clamp where verl has it), ``A`` the advantages,
``w`` verl's ``rollout_is_weights`` (multiplies every per-token loss), per valid token:

- ``vanilla``: dual-clip PPO, ``max(−A·r, −A·clip(r, 1−ε_l, 1+ε_h))``, for ``A < 0`` capped at
  ``−A·c`` (``clip_ratio_c``, default 3);
- ``gspo``: the same clip on the sequence ratio ``exp(min(mean lr, 10))`` with the token's gradient;
- ``sapo``: ``−σ(τ(r−1))·4/τ·A`` (``τ = tau_pos`` if ``A > 0`` else ``tau_neg``);
- ``gpg``: ``−A·logp``; ``dro``: ``−(A·logp − β/2·(logp − old)²)``;
- ``cispo``: ``−sg(clip(r, 1−ε_l, 1+ε_h))·A·logp`` (two-sided, unlike TRL's ``min(r, ε_high)``);
- ``dppo_tv`` / ``dppo_kl``: ``−A·sg(min(r, c))·logp·sg(valid)``, ``valid`` a trust region on
  ``p − p_old`` (TV) or the binary KL of ``p_old`` and ``p`` (``c`` default 20);
- ``clip_cov``: PPO clip with the gradient of a random ``clip_cov_ratio`` share of the tokens whose
  centred covariance ``(A − Ā)(logp − l̄)`` lies in ``(lb, ub)`` removed (``torch.randperm`` on the
  default generator, as verl);
- ``kl_cov``: ``−A·r``, plus ``ppo_kl_coef·|logp − old|`` on the top ``kl_cov_ratio`` tokens by that
  covariance;
- ``geo_mean`` (GMPO): per sequence ``−Ā·exp(mean of sign(A)·min(sign(A)·lr, sign(A)·clip(lr, −ε_l,
  ε_h)))``, averaged over sequences.
- ``bypass_mode``: ``old`` is the rollout policy's log-probs; a ``prepare`` stage (verl
  ``rollout_corr_helper``, here ``verl_rollout_correction``) drops the tokens its rejection rules reject
  (per token or whole sequences, from KL statistics of the detached log-ratio) and forms detached IS
  weights (token or sequence, truncated or IcePop); then ``ppo_clip``: ``vanilla`` without weights, or
  ``reinforce``: ``−w·A·logp``, aggregated over the kept tokens.

Memory: eager PyTorch on ``[B, T]``, a few temporaries kept for autograd. Numerics: fp32 (fp64 for
fp64 inputs); masked positions read 0 before any exp/log, so they never give NaN and get no
gradient; a fully masked batch gives 0. Differences from verl, on purpose: its ``+1e-8`` in
token-mean / sequence-length denominators (1e-8 relative) — ours divides by the clamped count.
Tests: ``tests/frameworks/test_verl_policy_parity.py`` (each row vs verl's own registered function).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .._utils import OpBackends, check_same_device, output_dtype
from .aggregation import AGGREGATION_MODES, AGGREGATION_SEMANTICS, GlobalBatch, aggregate_rows, lookup
from .clipped_policy import PolicyTerm, TokenInputs, policy_rows_triton
from .kl import KL_ESTIMATORS
from .rollout_metrics import SAFETY_BOUND, ISWeights, RejectionStat, is_metrics, offpolicy_metrics, rejection_metrics
from .validation import check_number, check_token_tensors, no_other_keywords, typed_value


VERL_POLICY_LOSS = OpBackends("verl_policy_loss", ("triton", "torch", "reference"))


class RolloutCorrection(NamedTuple):
    """verl's ``RolloutCorrectionConfig`` fields that ``loss_mode="bypass_mode"`` reads (verl's
    defaults), in verl's formats: ``rollout_is_threshold`` a number (truncate above) or
    ``"lower_upper"`` / ``(lower, upper)`` (zero outside); ``rollout_rs`` names of
    ``REJECTION_OPTIONS``, comma-separated or a tuple; ``rollout_rs_threshold`` one spec shared by
    every option or one per option (comma-separated or a tuple), a ``*_k1`` option's as ratio bounds
    ``"lower_upper"`` / ``(lower, upper)`` or an upper bound whose reciprocal is the lower one."""

    loss_type: str = "ppo_clip"  # or "reinforce"
    rollout_is: str | None = "sequence"  # "token", "sequence" or None (no IS weights)
    rollout_is_threshold: float | str | tuple = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: str | tuple[str, ...] | None = None
    rollout_rs_threshold: float | str | tuple | None = None


class VerlPolicyConfig(NamedTuple):
    """verl's ``ActorConfig`` / ``PolicyLossConfig`` fields the policy losses read (verl's defaults;
    ``clip_ratio_c=None``: the row's own default, 3 for ``vanilla``, 20 for ``dppo_*``)."""

    clip_ratio: float = 0.2
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1
    dro_beta: float | None = None
    entropy_coeff: float = 0.0  # ActorConfig.entropy_coeff: loss −= coeff · agg(entropy) (needs entropy=)
    rollout_correction: RolloutCorrection | None = None  # bypass_mode's (verl: policy_loss.rollout_correction)

    @property
    def low(self) -> float:
        return self.clip_ratio if self.clip_ratio_low is None else self.clip_ratio_low

    @property
    def high(self) -> float:
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high


class PolicyTokens(NamedTuple):
    """A formula's inputs: ``[B, T]`` in the compute dtype, 0 at masked positions."""

    logp: torch.Tensor  # differentiable
    old: torch.Tensor
    adv: torch.Tensor
    maskf: torch.Tensor
    valid: torch.Tensor  # bool
    config: VerlPolicyConfig


class KernelTerm(NamedTuple):
    """A row as the row engine's term: ``clipped_policy.PolicyTerm`` and whether it reads
    ``old_logp`` (``False``: ratio 1, e.g. ``gpg``)."""

    term: PolicyTerm
    uses_old: bool = True


class VerlPolicyLoss(NamedTuple):
    name: str
    formula: Callable[[PolicyTokens], tuple[torch.Tensor, dict]]  # -> (loss [B, T] or [B], metrics)
    level: str  # "token" (a [B, T] loss, aggregated by loss_agg_mode) or "sequence" (a [B] loss)
    clipping: str
    is_weighting: str
    aggregation: str | None  # a fixed AGGREGATION_MODES row (verl ignores loss_agg_mode), or None
    metrics: tuple[str, ...]
    not_separable: str | None  # None: token-separable (three-GEMM head)
    # the clipped-policy row engine's term that computes it (Triton kernel, kernels/grpo.py), or None
    kernel: Callable[[VerlPolicyConfig], KernelTerm] | None
    # a stage before the formula: (tokens, rollout_is_weights) -> (tokens with the loss mask it keeps,
    # the weights multiplying the loss, metrics); bypass_mode's rollout correction and rejection
    prepare: Callable[[PolicyTokens, torch.Tensor | None], tuple[PolicyTokens, torch.Tensor | None, dict]] | None = None

    @property
    def triton(self) -> bool:
        return self.kernel is not None

    @property
    def token_separable(self) -> bool:
        return self.not_separable is None


# ---------------------------------------------------------------------------------------- helpers
def _masked_mean(x: torch.Tensor, t: PolicyTokens) -> torch.Tensor:
    return (x * t.maskf).sum() / t.maskf.sum().clamp(min=1.0)


def _log_ratio(t: PolicyTokens, clamp: bool = True) -> torch.Tensor:
    lr = t.logp - t.old
    return torch.clamp(lr, min=-20.0, max=20.0) if clamp else lr


def _ppo_clip(t: PolicyTokens, ratio: torch.Tensor):
    """``(max(pg1, pg2), pg1, pg2)`` with ``pg1 = −A·r``, ``pg2 = −A·clip(r, 1−ε_l, 1+ε_h)``."""
    pg1 = -t.adv * ratio
    pg2 = -t.adv * torch.clamp(ratio, 1 - t.config.low, 1 + t.config.high)
    return torch.maximum(pg1, pg2), pg1, pg2


def _clip_ratio_c(t: PolicyTokens, default: float) -> float:
    return default if t.config.clip_ratio_c is None else t.config.clip_ratio_c


def _centred_cov(t: PolicyTokens) -> torch.Tensor:
    """``(A − Ā)(logp − l̄)`` with the means over valid tokens, detached."""
    adv, logp = t.adv.detach(), t.logp.detach()
    return (adv - _masked_mean(adv, t)) * (logp - _masked_mean(logp, t))


# --------------------------------------------------------------------------------------- formulas
def _vanilla(t):
    lr = _log_ratio(t)
    clip1, pg1, pg2 = _ppo_clip(t, torch.exp(lr))
    pg3 = -t.adv * _clip_ratio_c(t, 3.0)
    clip2 = torch.min(pg3, clip1)
    metrics = {"actor/pg_clipfrac": _masked_mean((pg2 > pg1).to(lr.dtype), t),
               "actor/ppo_kl": _masked_mean(-lr, t),
               "actor/pg_clipfrac_lower": _masked_mean(((clip1 > pg3) & (t.adv < 0)).to(lr.dtype), t)}  # fmt: skip
    return torch.where(t.adv < 0, clip2, clip1), metrics


def _gspo(t):
    lr = _log_ratio(t, clamp=False)
    seq = (lr * t.maskf).sum(-1) / t.maskf.sum(-1).clamp(min=1.0)
    log_seq_ratio = torch.clamp(t.logp - t.logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    loss, pg1, pg2 = _ppo_clip(t, torch.exp(log_seq_ratio))
    metrics = {"actor/pg_clipfrac": _masked_mean((pg2 > pg1).to(lr.dtype), t), "actor/ppo_kl": _masked_mean(-lr, t),
               "actor/pg_clipfrac_lower": torch.zeros((), dtype=lr.dtype, device=lr.device)}  # fmt: skip
    return loss, metrics


def _sapo(t):
    lr = _log_ratio(t)
    tau_pos, tau_neg = (torch.tensor(v, dtype=lr.dtype, device=lr.device) for v in (t.config.tau_pos, t.config.tau_neg))
    tau = torch.where(t.adv > 0, tau_pos, tau_neg)
    gates = torch.sigmoid(tau * (torch.exp(lr) - 1.0)) * (4.0 / tau)
    zero = torch.zeros((), dtype=lr.dtype, device=lr.device)
    return -gates * t.adv, {"actor/pg_clipfrac": zero, "actor/ppo_kl": _masked_mean(-lr, t),
                            "actor/pg_clipfrac_lower": zero}  # fmt: skip


def _gpg(t):
    return -t.logp * t.adv, {}


def _dro(t):
    lr = t.logp - t.old
    return -(t.logp * t.adv - 0.5 * t.config.dro_beta * lr.square()), {"actor/ppo_kl": _masked_mean(-lr.detach(), t)}


def _cispo(t):
    lr = _log_ratio(t)
    ratio = torch.exp(lr)
    clipped = torch.clamp(ratio, 1 - t.config.low, 1 + t.config.high)
    metrics = {"actor/pg_clipfrac": _masked_mean((ratio != clipped).to(lr.dtype), t),
               "actor/ppo_kl": _masked_mean(-lr, t),
               "actor/pg_clipfrac_lower": torch.zeros((), dtype=lr.dtype, device=lr.device)}  # fmt: skip
    return -clipped.detach() * t.adv * t.logp, metrics


def _dppo(valid_region):
    def formula(t):
        lr = _log_ratio(t)
        ratio = torch.exp(lr)
        c = _clip_ratio_c(t, 20.0)
        truncated = torch.clamp(ratio, max=c).detach()
        with torch.no_grad():
            prob, old_prob = torch.exp(t.logp), torch.exp(t.old)
            pos, neg = valid_region(t, prob, old_prob)
            keep = torch.where(t.adv > 0, pos, neg).to(lr.dtype)
        metrics = {"actor/pg_clipfrac": _masked_mean(1.0 - keep, t), "actor/ppo_kl": _masked_mean(-lr, t),
                   "actor/pg_clipfrac_lower": _masked_mean((ratio > c).to(lr.dtype) * keep, t)}  # fmt: skip
        return -t.adv * truncated * t.logp * keep, metrics

    return formula


def _tv_region(t, prob, old_prob):
    return (prob - old_prob) <= t.config.high, (prob - old_prob) >= -t.config.low


def _binary_kl_region(t, prob, old_prob):
    binary_kl = old_prob * (t.old - t.logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    return (binary_kl <= t.config.high) | (prob <= old_prob), (binary_kl <= t.config.low) | (prob >= old_prob)


def _clip_cov(t):
    lr = _log_ratio(t, clamp=False)
    loss, pg1, pg2 = _ppo_clip(t, torch.exp(lr))
    with torch.no_grad():
        cov = _centred_cov(t)
        clip_by_origin = pg2 > pg1
        n_clip = max(int(t.config.clip_cov_ratio * float(t.maskf.sum())), 1)
        eligible = (cov < t.config.clip_cov_ub) & (cov > t.config.clip_cov_lb) & t.valid & ~clip_by_origin
        idx = torch.nonzero(eligible)
        if len(idx) > 0:  # verl draws the permutation from the default generator
            idx = idx[torch.randperm(len(idx))[: min(n_clip, len(idx))]]
        corr = torch.ones_like(t.adv)
        corr[idx[:, 0], idx[:, 1]] = 0
    metrics = {"actor/pg_clipfrac": _masked_mean((corr == 0).to(lr.dtype), t), "actor/ppo_kl": _masked_mean(-lr, t)}
    return loss * corr, metrics


def _kl_cov(t):
    lr = _log_ratio(t, clamp=False)
    pg = -t.adv * torch.exp(lr)
    with torch.no_grad():
        flat = t.valid.reshape(-1)
        adv_v, logp_v = t.adv.detach().reshape(-1)[flat], t.logp.detach().reshape(-1)[flat]
        top = torch.zeros_like(flat)
        if adv_v.numel():
            cov = (adv_v - adv_v.mean()) * (logp_v - logp_v.mean())
            k = max(1, int(adv_v.numel() * t.config.kl_cov_ratio))
            top[torch.nonzero(flat).squeeze(-1)[torch.topk(cov, k, largest=True).indices]] = True
        top = top.reshape(t.valid.shape)
    loss = torch.where(top, pg + t.config.ppo_kl_coef * lr.abs(), pg)
    return loss, {"actor/ppo_kl": _masked_mean(lr.detach().abs(), t)}


def _geo_mean(t):
    lr = _log_ratio(t, clamp=False)
    sgn = torch.sign(t.adv)
    lr_min = sgn * torch.min(sgn * lr, sgn * torch.clamp(lr, -t.config.low, t.config.high))
    n = t.maskf.sum(-1).clamp(min=1.0)
    ratio = torch.exp((lr_min * t.maskf).sum(-1) / n)
    seq_adv = (t.adv * t.maskf).sum(-1) / n
    with torch.no_grad():
        clipped = (lr != torch.clamp(lr, -t.config.low, t.config.high)).to(lr.dtype)
    metrics = {"actor/pg_clipfrac": _masked_mean(clipped * (t.adv > 0), t), "actor/ppo_kl": _masked_mean(-lr, t),
               "actor/pg_clipfrac_lower": _masked_mean(clipped * (t.adv < 0), t)}  # fmt: skip
    return -seq_adv * ratio, metrics


# ------------------------------------------------------ bypass_mode: rollout correction, rejection
BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")
ROLLOUT_IS_LEVELS = ("token", "sequence")
REJECTION_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")  # per token, or a sequence's sum / mean / max
# verl's rollout_rs names: a level and a KL_ESTIMATORS row of d = rollout_logp − logp (k1 = −log r)
REJECTION_OPTIONS = tuple(f"{level}_{k}" for level in REJECTION_LEVELS for k in ("k1", "k2", "k3")
                          if (level, k) != ("seq_max", "k1"))  # fmt: skip


class Rejection(NamedTuple):
    """One rejection option: keep a token (or its whole sequence) while ``lower ≤ stat ≤ upper``
    (``k1``: bounds on the log-ratio, the logs of verl's ratio bounds; others: an upper bound)."""

    level: str
    estimator: str
    lower: float | None
    upper: float


class CorrectionPlan(NamedTuple):
    is_bounds: tuple[float | None, float] | None  # (lower or None: truncate; upper), None: no IS weights
    rejections: tuple[Rejection, ...]


def _one_of(names: tuple[str, ...], value, what: str) -> str:
    return lookup({n: n for n in names}, value, what)


def _bounds(name: str, spec, pair_ok: bool) -> tuple[float | None, float]:
    """A threshold in verl's formats: a number, ``"upper"``, ``"lower_upper"`` or ``(lower, upper)``."""
    if isinstance(spec, str):
        try:
            values = [float(part) for part in spec.strip().split("_", 1)]
        except ValueError:
            raise ValueError(f"{name} must be a number or 'lower_upper', got {spec!r}") from None
    elif isinstance(spec, tuple) and len(spec) == 2:
        values = [check_number(name, v) for v in spec]
    else:
        values = [check_number(name, spec)]
    if len(values) == 2 and not pair_ok:
        raise ValueError(f"{name} takes an upper bound only (no 'lower_upper'), got {spec!r}")
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"{name} bounds must be finite numbers > 0, got {spec!r}")
    if len(values) == 2 and values[0] > values[1]:
        raise ValueError(f"{name} lower bound must be <= its upper bound, got {spec!r}")
    return (values[0], values[1]) if len(values) == 2 else (None, values[0])


def correction_plan(c: RolloutCorrection | None) -> CorrectionPlan:
    """Validates a ``RolloutCorrection`` (errors name the field) into IS bounds and rejection rules."""
    c = RolloutCorrection() if c is None else c
    if not isinstance(c, RolloutCorrection):
        raise TypeError(f"rollout_correction must be a RolloutCorrection, got {type(c).__name__}")
    _one_of(BYPASS_LOSS_TYPES, c.loss_type, "rollout_correction.loss_type")
    if c.rollout_is is not None:
        _one_of(ROLLOUT_IS_LEVELS, c.rollout_is, "rollout_correction.rollout_is")
    if not isinstance(c.rollout_is_batch_normalize, bool):
        raise TypeError(f"rollout_correction.rollout_is_batch_normalize must be a bool, got "
                        f"{c.rollout_is_batch_normalize!r}")  # fmt: skip
    is_bounds = None
    if c.rollout_is is not None and c.rollout_is_threshold is not None:
        is_bounds = _bounds("rollout_correction.rollout_is_threshold", c.rollout_is_threshold, True)
    names = c.rollout_rs
    if names is None:
        return CorrectionPlan(is_bounds, ())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    elif isinstance(names, tuple) and all(isinstance(n, str) for n in names):
        names = list(names)
    else:
        raise TypeError(f"rollout_correction.rollout_rs must be a str or a tuple of str, got {names!r}")
    if not names:
        raise ValueError("rollout_correction.rollout_rs names no option")
    for n in names:
        _one_of(REJECTION_OPTIONS, n, "rollout_correction.rollout_rs")
    names = list(dict.fromkeys(names))
    spec = c.rollout_rs_threshold
    if spec is None:
        raise ValueError("rollout_correction.rollout_rs_threshold is required when rollout_rs is set")
    specs = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else \
        list(spec) if isinstance(spec, (tuple, list)) else [spec]  # fmt: skip
    if len(specs) not in (1, len(names)):
        raise ValueError(f"rollout_correction.rollout_rs_threshold must hold one threshold or one per option "
                         f"({len(names)}), got {spec!r}")  # fmt: skip
    rejections = []
    for n, s in zip(names, specs * len(names) if len(specs) == 1 else specs):
        level, k = n.rsplit("_", 1)
        lower, upper = _bounds(f"rollout_correction.rollout_rs_threshold ({n})", s, pair_ok=k == "k1")
        if k == "k1":  # ratio bounds, a lone upper bound's reciprocal the lower one; compared as logs
            lower, upper = math.log(1.0 / upper if lower is None else lower), math.log(upper)
        rejections.append(Rejection(level, k, lower, upper))
    return CorrectionPlan(is_bounds, tuple(rejections))


def verl_rollout_correction(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       correction: RolloutCorrection | None = None):  # fmt: skip
    """verl's ``compute_rollout_correction_and_rejection_mask(logp, rollout_logp, mask, ...)``
    (``rollout_corr_helper``), no gradient: ``(weights [B, T] or None, kept mask [B, T] bool,
    metrics)``. With ``lr = logp − rollout_logp``:

    - IS weights: ``token``: ``exp(clamp(lr, ±20))``; ``sequence``: ``exp(clamp(Σ lr, ±20))`` on every
      token; truncated at the upper bound, or zero outside ``[lower, upper]`` (IcePop); optionally
      divided by their batch mean (tokens, or sequences for ``sequence``) when it exceeds 1e-8;
    - rejection: every option must pass; a statistic of ``d = −clamp(lr, ±20)`` (``k1 = d``,
      ``k2 = d²/2``, ``k3 = e^−d − 1 + d``, the rows of ``losses/kl.py``) per token or per sequence.

    Metrics: every key of verl's (``rollout_corr/`` + the names of ``losses/rollout_metrics.py``:
    off-policy perplexities / KL / χ², the IS weights' spread before normalising and
    ``rollout_is_batch_norm_factor``, each rejection option's statistics and masked fractions). A
    fully masked batch gives no weight, no token and finite metrics (verl: ``ValueError``)."""
    plan = correction_plan(correction)
    check_token_tensors(logp, logp, rollout_logp=rollout_logp, mask=mask)
    check_same_device(logp=logp, rollout_logp=rollout_logp, mask=mask)
    valid = mask != 0
    cd = output_dtype(logp.dtype)
    zero = torch.zeros((), dtype=cd, device=logp.device)
    with torch.no_grad():
        logp, rollout_logp = (torch.where(valid, t.detach().to(cd), zero) for t in (logp, rollout_logp))
        return _correct(logp, rollout_logp, valid, RolloutCorrection() if correction is None else correction, plan)


def _correct(logp: torch.Tensor, rollout_logp: torch.Tensor, valid: torch.Tensor, c: RolloutCorrection,
             plan: CorrectionPlan):  # fmt: skip
    """``verl_rollout_correction`` on log-probs that are 0 at masked positions (no grad); the metrics
    from ``losses/rollout_metrics.py``, prefixed ``rollout_corr/``."""
    lr = logp - rollout_logp
    maskf = valid.to(lr.dtype)
    count = maskf.sum(-1)

    def mean(x):  # over the valid tokens of the batch
        return (x * maskf).sum() / maskf.sum().clamp(min=1.0)

    metrics = offpolicy_metrics(logp, rollout_logp, maskf)
    weights = None
    if plan.is_bounds is not None:
        lower, upper = plan.is_bounds
        level_lr = lr if c.rollout_is == "token" else lr.sum(-1, keepdim=True)
        raw = torch.exp(level_lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(lr) * maskf
        weights = raw.clamp(max=upper) if lower is None else torch.where((raw >= lower) & (raw <= upper), raw, 0.0)
        metrics.update(is_metrics(ISWeights(weights, raw, level_lr, c.rollout_is == "sequence", lower, upper), maskf))
        if c.rollout_is_batch_normalize:
            if c.rollout_is == "token":
                norm = mean(weights)
            else:  # one weight per sequence that has tokens
                rows = count > 0
                norm = ((weights * maskf).sum(-1) / count.clamp(min=1.0))[rows].sum() / rows.sum().clamp(min=1)
            norm = torch.where(norm > 1e-8, norm, torch.ones_like(norm))
            weights = weights / norm
            metrics["rollout_is_batch_norm_factor"] = norm
    if plan.rejections:
        keep = torch.ones_like(valid)
        d = -lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        options = []
        for r in plan.rejections:
            stat = torch.where(valid, KL_ESTIMATORS[r.estimator].value(d), 0.0)
            if r.level == "seq_sum":
                stat = stat.sum(-1, keepdim=True)
            elif r.level == "seq_mean":
                stat = stat.sum(-1, keepdim=True) / count.clamp(min=1.0).unsqueeze(-1)
            elif r.level == "seq_max":  # a fully masked row: 0
                stat = torch.where(valid, stat, -torch.inf).amax(-1, keepdim=True) if stat.shape[-1] else \
                    stat.new_zeros(stat.shape[0], 1)  # fmt: skip
                stat = torch.where(torch.isneginf(stat), 0.0, stat)
            ok = (stat <= r.upper if r.lower is None else (stat >= r.lower) & (stat <= r.upper)).expand_as(valid)
            keep = keep & ok
            options.append(RejectionStat(f"{r.level}_{r.estimator}", stat.expand_as(lr),
                                         None if r.level == "token" else stat[:, 0], ok, r.lower, r.upper))  # fmt: skip
        metrics.update(rejection_metrics(tuple(options), keep, maskf))
        valid = valid & keep
    return weights, valid, {f"rollout_corr/{name}": value for name, value in metrics.items()}


def _bypass_prepare(t: PolicyTokens, rollout_is_weights):
    """verl ``compute_policy_loss_bypass_mode``: ``old`` is the rollout policy's log-probs; the IS
    weights (``reinforce`` only) and the rejection mask come from the current ``logp`` (detached)."""
    if rollout_is_weights is not None:
        raise ValueError("rollout_is_weights: loss_mode='bypass_mode' computes its IS weights from "
                         "config.rollout_correction; pass None")  # fmt: skip
    c = RolloutCorrection() if t.config.rollout_correction is None else t.config.rollout_correction
    with torch.no_grad():
        weights, valid, metrics = _correct(t.logp.detach(), t.old, t.valid, c, correction_plan(c))
    zero = torch.zeros((), dtype=t.logp.dtype, device=t.logp.device)
    tokens = PolicyTokens(torch.where(valid, t.logp, zero), torch.where(valid, t.old, zero),
                          torch.where(valid, t.adv, zero), valid.to(t.maskf.dtype), valid, t.config)  # fmt: skip
    return tokens, weights if c.loss_type == "reinforce" else None, metrics


def _bypass(t):
    """``ppo_clip``: ``vanilla`` (the ratio to the rollout policy is the IS correction);
    ``reinforce``: ``−A·logp`` (the weights multiply it), verl ``compute_policy_loss_reinforce``."""
    c = RolloutCorrection() if t.config.rollout_correction is None else t.config.rollout_correction
    if c.loss_type == "ppo_clip":
        return _vanilla(t)
    return -t.adv * t.logp, {"actor/ppo_kl": _masked_mean(t.old - t.logp.detach(), t)}


def _vanilla_kernel(c: VerlPolicyConfig) -> KernelTerm:
    return KernelTerm(PolicyTerm("clipped", eps_low=c.low, eps_high=c.high, bias_correction=False,
                                 clip_c=3.0 if c.clip_ratio_c is None else c.clip_ratio_c,
                                 log_ratio_clamp=SAFETY_BOUND))  # fmt: skip


def _cispo_kernel(c: VerlPolicyConfig) -> KernelTerm:
    return KernelTerm(PolicyTerm("cispo", eps_high=1 + c.high, ratio_min=1 - c.low, bias_correction=False,
                                 log_ratio_clamp=SAFETY_BOUND))  # fmt: skip


def _sapo_kernel(c: VerlPolicyConfig) -> KernelTerm:
    return KernelTerm(PolicyTerm("sapo", tau_pos=c.tau_pos, tau_neg=c.tau_neg, bias_correction=False,
                                 log_ratio_clamp=SAFETY_BOUND))  # fmt: skip


def _dro_kernel(c: VerlPolicyConfig) -> KernelTerm:  # weight clamp(r, 1, 1) = 1, + β/2 · lr²
    return KernelTerm(PolicyTerm("cispo", eps_high=1.0, ratio_min=1.0, quad=c.dro_beta, bias_correction=False))


def _dppo_kernel(region: str):
    def kernel(c: VerlPolicyConfig) -> KernelTerm:
        return KernelTerm(PolicyTerm("cispo", eps_high=20.0 if c.clip_ratio_c is None else c.clip_ratio_c,
                                     trust_region=region, region_low=c.low, region_high=c.high,
                                     bias_correction=False, log_ratio_clamp=SAFETY_BOUND))  # fmt: skip

    return kernel


def _gpg_kernel(c: VerlPolicyConfig) -> KernelTerm:  # ratio 1: -min(1, inf) * A * logp
    return KernelTerm(PolicyTerm("cispo", eps_high=float("inf"), bias_correction=False), uses_old=False)


_CLIP = "clip(r, 1−ε_low, 1+ε_high)"
_CLIP_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
_SEQ_RATIO = "one ratio per sequence (the mean log-ratio)"
_BATCH_STATS = "selects tokens by a covariance over the whole batch"

VERL_POLICY_LOSSES: dict[str, VerlPolicyLoss] = {
    row.name: row
    for row in (
        VerlPolicyLoss("vanilla", _vanilla, "token", f"{_CLIP}; A<0: ≤ −A·clip_ratio_c (dual clip)", "r · A",
                       None, _CLIP_METRICS, None, _vanilla_kernel),  # fmt: skip
        VerlPolicyLoss("gspo", _gspo, "token", f"{_CLIP} of the sequence ratio", "seq r · A", None, _CLIP_METRICS,
                       _SEQ_RATIO, None),  # fmt: skip
        VerlPolicyLoss("sapo", _sapo, "token", "none (soft gate σ(τ(r−1))·4/τ)", "gate of r · A",
                       "seq-mean-token-mean", _CLIP_METRICS, None, _sapo_kernel),  # fmt: skip
        VerlPolicyLoss("gpg", _gpg, "token", "none", "none (−A · logp)", None, (), None, _gpg_kernel),
        VerlPolicyLoss("clip_cov", _clip_cov, "token", f"{_CLIP}; random high-covariance tokens detached", "r · A",
                       None, ("actor/pg_clipfrac", "actor/ppo_kl"), _BATCH_STATS, None),  # fmt: skip
        VerlPolicyLoss("kl_cov", _kl_cov, "token", "none; |lr| penalty on top-covariance tokens", "r · A", None,
                       ("actor/ppo_kl",), _BATCH_STATS, None),  # fmt: skip
        VerlPolicyLoss("geo_mean", _geo_mean, "sequence", "sign(A)-wise clip of lr to [−ε_low, ε_high]",
                       "exp(mean clipped lr) · mean A", "seq-mean-token-sum", _CLIP_METRICS, _SEQ_RATIO,
                       None),  # fmt: skip
        VerlPolicyLoss("dro", _dro, "token", "none; β/2 · lr² penalty", "none (−A · logp)", None,
                       ("actor/ppo_kl",), None, _dro_kernel),  # fmt: skip
        VerlPolicyLoss("cispo", _cispo, "token", f"sg({_CLIP})", "sg(clipped r) · A · logp", None, _CLIP_METRICS,
                       None, _cispo_kernel),  # fmt: skip
        VerlPolicyLoss("dppo_tv", _dppo(_tv_region), "token", "trust region on p − p_old; sg(min(r, c))",
                       "sg(truncated r) · A · logp", None, _CLIP_METRICS, None, _dppo_kernel("tv")),  # fmt: skip
        VerlPolicyLoss("dppo_kl", _dppo(_binary_kl_region), "token", "trust region on binary KL(p_old, p); "
                       "sg(min(r, c))", "sg(truncated r) · A · logp", None, _CLIP_METRICS, None,
                       _dppo_kernel("binary_kl")),  # fmt: skip
        VerlPolicyLoss("bypass_mode", _bypass, "token", f"ppo_clip: as vanilla; reinforce: none; rejection "
                       "masks tokens", "ppo_clip: r · A; reinforce: sg(rollout IS weight) · A · logp", None,
                       ("actor/ppo_kl", "rollout_corr/kl", "rollout_corr/k3_kl"),
                       "its IS weights and rejection read whole sequences and the batch", None,
                       prepare=_bypass_prepare),  # fmt: skip
    )
}
assert all(row.aggregation is None or row.aggregation in AGGREGATION_MODES for row in VERL_POLICY_LOSSES.values())


def _check_config(row: VerlPolicyLoss, config: VerlPolicyConfig) -> VerlPolicyConfig:
    values = {name: check_number(name, getattr(config, name), allow_none=name in ("clip_ratio_low",
              "clip_ratio_high", "clip_ratio_c", "dro_beta")) for name in VerlPolicyConfig._fields
              if name != "rollout_correction"}  # fmt: skip
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high"):
        if values[name] is not None and not values[name] >= 0:
            raise ValueError(f"{name} must be >= 0, got {values[name]}")
    for name in ("tau_pos", "tau_neg", "clip_cov_ratio", "kl_cov_ratio"):
        if not values[name] > 0:
            raise ValueError(f"{name} must be > 0, got {values[name]}")
    if values["clip_ratio_c"] is not None and not values["clip_ratio_c"] > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0, got {values['clip_ratio_c']}")
    if row.name == "dro" and not (values["dro_beta"] is not None and values["dro_beta"] > 0):
        raise ValueError(f"dro_beta must be a number > 0 for loss_mode='dro', got {values['dro_beta']}")
    if row.prepare is not None:
        correction_plan(config.rollout_correction)
    return VerlPolicyConfig(**values, rollout_correction=config.rollout_correction)


def verl_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_mode: str = "vanilla",
    config: VerlPolicyConfig | None = None,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    semantics: str = "verl",
    global_batch: GlobalBatch | None = None,
    entropy: torch.Tensor | None = None,
    backend: str = "auto",
    **config_fields,
):
    """verl's ``get_policy_loss_fn(loss_mode)(old_log_prob, log_prob, advantages, response_mask,
    loss_agg_mode, config, rollout_is_weights)`` (verl 0.9.1); with ``entropy``, also the entropy
    bonus of verl's actor loss (``verl.workers.utils.losses.ppo_loss``).

    Args:
        logp, old_logp, advantages, mask: ``[B, T]`` (``advantages`` also ``[B]``).
        loss_mode: a row of ``VERL_POLICY_LOSSES``.
        config: a ``VerlPolicyConfig``, or its fields as keywords (``clip_ratio=0.2``, ...).
        loss_agg_mode, semantics, global_batch: as ``agg_loss`` (verl ``config.global_batch_info``:
            ``GlobalBatch(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)``);
            rows with a fixed aggregation (``sapo``, ``geo_mean``) ignore ``loss_agg_mode`` as verl.
        rollout_is_weights: ``[B, T]`` detached rollout-correction weights multiplying the loss.
        entropy: ``[B, T]`` per-token entropies (differentiable): ``loss −= entropy_coeff ·
            agg_loss(entropy, mask, loss_agg_mode, global_batch)``, the loss's own mode and global
            batch (every row's, also where the policy term has a fixed aggregation, as verl), logged
            as ``actor/entropy_loss``.
        backend: ``"auto"`` (Triton on CUDA tensors), ``"triton"``: rows with a ``kernel`` term
            (the token-separable ones: ``vanilla``, ``sapo``, ``gpg``, ``dro``, ``cispo``,
            ``dppo_tv``, ``dppo_kl``) run their loss and gradient in the fused clipped-policy
            kernels (``kernels/grpo.py``; the metrics from the PyTorch formula without gradient;
            not twice differentiable; the ±20 log-ratio clamp as verl's), the other rows in PyTorch;
            ``"torch"`` / ``"reference"``: eager.

    Returns:
        ``(loss, metrics)``: 0-d loss (fp64 for fp64 ``logp``), metrics as detached 0-d tensors with
        verl's names (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``).
    """
    row = lookup(VERL_POLICY_LOSSES, loss_mode, "loss_mode")
    config = typed_value("config", VerlPolicyConfig, config, config_fields)
    no_other_keywords("verl_policy_loss", config_fields)
    config = _check_config(row, config)
    lookup(AGGREGATION_MODES, loss_agg_mode, "loss_agg_mode")
    lookup(AGGREGATION_SEMANTICS, semantics, "semantics")
    B, T = check_token_tensors(logp, advantages, old_logp=old_logp, mask=mask, rollout_is_weights=rollout_is_weights,
                               entropy=entropy)  # fmt: skip
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                      rollout_is_weights=rollout_is_weights, entropy=entropy)  # fmt: skip
    if entropy is None and config.entropy_coeff != 0.0:
        raise ValueError(f"entropy ([B, T]) is required when entropy_coeff != 0, got {config.entropy_coeff}")
    be = VERL_POLICY_LOSS.resolve(backend, logp.device, logp.dtype)

    cd = output_dtype(logp.dtype)
    valid = mask != 0
    maskf = valid.to(cd)
    zero = torch.zeros((), dtype=cd, device=logp.device)
    adv = advantages.detach().to(cd)
    adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(B, T)
    tokens = PolicyTokens(torch.where(valid, logp.to(cd), zero), torch.where(valid, old_logp.detach().to(cd), zero),
                          torch.where(valid, adv, zero), maskf, valid, config)  # fmt: skip
    isw = None if rollout_is_weights is None else torch.where(valid, rollout_is_weights.detach().to(cd), zero)
    extra_metrics = {}
    if entropy is not None:  # over the response mask, before any rejection (verl)
        entropy_loss = aggregate_rows(torch.where(valid, entropy.to(cd), zero).mul(maskf).sum(-1), maskf.sum(-1), T,
                                      loss_agg_mode, semantics=semantics, global_batch=global_batch)  # fmt: skip
        extra_metrics["actor/entropy_loss"] = entropy_loss
    if row.prepare is not None:
        tokens, isw, correction_metrics = row.prepare(tokens, isw)
        extra_metrics.update(correction_metrics)
        valid, maskf = tokens.valid, tokens.maskf
    if be == "triton" and row.triton:
        kernel = row.kernel(config)
        inputs = TokenInputs(tokens.logp, tokens.old if kernel.uses_old else None, None, tokens.adv, valid,
                             is_ratio=isw)  # fmt: skip
        rows = policy_rows_triton(inputs, kernel.term)
        with torch.no_grad():
            _, metrics = row.formula(tokens._replace(logp=tokens.logp.detach()))
        loss = aggregate_rows(rows["loss_sum"], rows["count"], T, row.aggregation or loss_agg_mode,
                              semantics=semantics, global_batch=global_batch)  # fmt: skip
        return _entropy_bonus(loss, config, extra_metrics), {**metrics, **extra_metrics}
    loss, metrics = row.formula(tokens)
    if row.level == "sequence":
        if rollout_is_weights is not None:  # verl: the geometric mean of the token weights
            log_w = torch.log(rollout_is_weights.detach().to(cd) + 1e-10)
            loss = loss * torch.exp((log_w * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0))
        # one value per sequence, averaged over every sequence (verl: torch.mean)
        loss = aggregate_rows(loss, torch.ones_like(loss), T, row.aggregation, semantics="classic")
    else:
        if isw is not None:
            loss = loss * isw
        loss_sum = torch.where(valid, loss, zero).mul(maskf).sum(-1)
        loss = aggregate_rows(loss_sum, maskf.sum(-1), T, row.aggregation or loss_agg_mode, semantics=semantics,
                              global_batch=global_batch)  # fmt: skip
    loss = _entropy_bonus(loss, config, extra_metrics)
    return loss, {name: value.detach() for name, value in {**metrics, **extra_metrics}.items()}


def _entropy_bonus(loss: torch.Tensor, config: VerlPolicyConfig, metrics: dict) -> torch.Tensor:
    """``loss − entropy_coeff · entropy_loss`` where ``entropy=`` was given; the metric detached."""
    if "actor/entropy_loss" not in metrics:
        return loss
    entropy_loss = metrics["actor/entropy_loss"]
    metrics["actor/entropy_loss"] = entropy_loss.detach()
    return loss - config.entropy_coeff * entropy_loss

