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

Memory: eager PyTorch on ``[B, T]``, a few temporaries kept for autograd. Numerics: fp32 (fp64 for
fp64 inputs); masked positions read 0 before any exp/log, so they never give NaN and get no
gradient; a fully masked batch gives 0. Differences from verl, on purpose: its ``+1e-8`` in
token-mean / sequence-length denominators (1e-8 relative) — ours divides by the clamped count.
Tests: ``tests/frameworks/test_verl_policy_parity.py`` (each row vs verl's own registered function).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._utils import OpBackends, check_same_device, output_dtype
from .aggregation import AGGREGATION_MODES, AGGREGATION_SEMANTICS, GlobalBatch, aggregate_rows, lookup
from .clipped_policy import PolicyTerm, TokenInputs, policy_rows_triton
from .validation import check_number, check_token_tensors


VERL_POLICY_LOSS = OpBackends("verl_policy_loss", ("triton", "torch", "reference"))


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


def _vanilla_kernel(c: VerlPolicyConfig) -> KernelTerm:
    return KernelTerm(PolicyTerm("clipped", eps_low=c.low, eps_high=c.high, bias_correction=False,
                                 clip_c=3.0 if c.clip_ratio_c is None else c.clip_ratio_c))  # fmt: skip


def _cispo_kernel(c: VerlPolicyConfig) -> KernelTerm:
    return KernelTerm(PolicyTerm("cispo", eps_high=1 + c.high, ratio_min=1 - c.low, bias_correction=False))


def _sapo_kernel(c: VerlPolicyConfig) -> KernelTerm:
    return KernelTerm(PolicyTerm("sapo", tau_pos=c.tau_pos, tau_neg=c.tau_neg, bias_correction=False))


def _dro_kernel(c: VerlPolicyConfig) -> KernelTerm:  # weight clamp(r, 1, 1) = 1, + β/2 · lr²
    return KernelTerm(PolicyTerm("cispo", eps_high=1.0, ratio_min=1.0, quad=c.dro_beta, bias_correction=False))


def _dppo_kernel(region: str):
    def kernel(c: VerlPolicyConfig) -> KernelTerm:
        return KernelTerm(PolicyTerm("cispo", eps_high=20.0 if c.clip_ratio_c is None else c.clip_ratio_c,
                                     trust_region=region, region_low=c.low, region_high=c.high,
                                     bias_correction=False))  # fmt: skip

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
    )
}
assert all(row.aggregation is None or row.aggregation in AGGREGATION_MODES for row in VERL_POLICY_LOSSES.values())


def _check_config(row: VerlPolicyLoss, config: VerlPolicyConfig) -> VerlPolicyConfig:
    values = {name: check_number(name, getattr(config, name), allow_none=name in ("clip_ratio_low",
              "clip_ratio_high", "clip_ratio_c", "dro_beta")) for name in VerlPolicyConfig._fields}  # fmt: skip
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
    return VerlPolicyConfig(**values)


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
    backend: str = "auto",
    **config_fields,
):
    """verl's ``get_policy_loss_fn(loss_mode)(old_log_prob, log_prob, advantages, response_mask,
    loss_agg_mode, config, rollout_is_weights)`` (verl 0.9.1).

    Args:
        logp, old_logp, advantages, mask: ``[B, T]`` (``advantages`` also ``[B]``).
        loss_mode: a row of ``VERL_POLICY_LOSSES``.
        config: a ``VerlPolicyConfig``, or its fields as keywords (``clip_ratio=0.2``, ...).
        loss_agg_mode, semantics, global_batch: as ``agg_loss`` (verl ``config.global_batch_info``:
            ``GlobalBatch(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)``);
            rows with a fixed aggregation (``sapo``, ``geo_mean``) ignore ``loss_agg_mode`` as verl.
        rollout_is_weights: ``[B, T]`` detached rollout-correction weights multiplying the loss.
        backend: ``"auto"`` (Triton on CUDA tensors), ``"triton"``: rows with a ``kernel`` term
            (the token-separable ones: ``vanilla``, ``sapo``, ``gpg``, ``dro``, ``cispo``,
            ``dppo_tv``, ``dppo_kl``) run their loss and gradient in the fused clipped-policy
            kernels (``kernels/grpo.py``; the metrics from the PyTorch formula without gradient;
            not twice differentiable; no ±20 log-ratio clamp there: values differ by at most
            ``|A|·e^-20`` per token where ``|logp − old| > 20``), the other rows in PyTorch;
            ``"torch"`` / ``"reference"``: eager.

    Returns:
        ``(loss, metrics)``: 0-d loss (fp64 for fp64 ``logp``), metrics as detached 0-d tensors with
        verl's names (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``).
    """
    row = lookup(VERL_POLICY_LOSSES, loss_mode, "loss_mode")
    if config is not None and config_fields:
        raise TypeError("pass config or its fields as keywords, not both")
    try:
        config = config if config is not None else VerlPolicyConfig(**config_fields)
    except TypeError as e:
        raise TypeError(f"unknown verl policy option: {e}; valid: {', '.join(VerlPolicyConfig._fields)}") from None
    config = _check_config(row, config)
    lookup(AGGREGATION_MODES, loss_agg_mode, "loss_agg_mode")
    lookup(AGGREGATION_SEMANTICS, semantics, "semantics")
    B, T = check_token_tensors(logp, advantages, old_logp=old_logp, mask=mask, rollout_is_weights=rollout_is_weights)
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                      rollout_is_weights=rollout_is_weights)  # fmt: skip
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
    if be == "triton" and row.triton:
        kernel = row.kernel(config)
        inputs = TokenInputs(tokens.logp, tokens.old if kernel.uses_old else None, None, tokens.adv, valid,
                             is_ratio=isw)  # fmt: skip
        rows = policy_rows_triton(inputs, kernel.term)
        with torch.no_grad():
            _, metrics = row.formula(tokens._replace(logp=tokens.logp.detach()))
        loss = aggregate_rows(rows["loss_sum"], rows["count"], T, row.aggregation or loss_agg_mode,
                              semantics=semantics, global_batch=global_batch)  # fmt: skip
        return loss, metrics
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
    return loss, {name: value.detach() for name, value in metrics.items()}

