"""PPO for LLMs: clipped policy loss, clipped value loss, KL-penalty rewards, GAE, whitening.

TRL 1.16 ships no PPO trainer. Semantics follow TRL's last one (``trl/trainer/ppo_trainer.py``,
``PPOTrainer.train`` in TRL 0.12-0.2x, the former PPOv2) and verl's
``verl/trainer/ppo/core_algos.py`` (``compute_gae_advantage_return``, ``compute_policy_loss``
"vanilla" with dual clip, ``agg_loss``, ``compute_value_loss``); each function cites the lines
it follows. Differences, all confined to degenerate inputs: empty masks give 0 instead of NaN
(TRL's ``masked_mean`` divides by ``mask.sum()``) and ``masked_var`` of one element is 0
instead of NaN/raise.

``gae`` is never a Python loop over time: a Triton reverse affine scan on CUDA
(``alignkernels.kernels.gae``), a vectorised blocked scan in PyTorch elsewhere, and the loop
itself only in ``alignkernels.reference.gae_reference``.

``ppo_loss`` takes its hyper-parameters as one ``PPOConfig`` (or its fields as keywords); its
policy term is the shared row engine's clipped term (``clipped_policy.policy_rows``) reduced by the
shared aggregation rows (``aggregation.aggregate_rows``); the value loss is TRL's.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from .._utils import OpBackends, check_same_device, check_tensor, output_dtype
from .._cuda_backend import gae_cuda
from ..reference import gae_reference
from .aggregation import LOSS_AGG_MODES  # noqa: F401  (re-exported: the modes' names)
from .aggregation import AGGREGATION_MODES, GlobalBatch, aggregate, aggregate_rows, lookup
from .clipped_policy import PolicyTerm, TokenInputs, policy_rows
from .kl import kl_estimate
from .validation import check_number, check_token_tensors, no_other_keywords, typed_value

# "reference" is the same eager transcription of TRL/verl as "torch" for the loss; for gae it is
# the Python loop over time (alignkernels.reference.gae_reference).
PPO_LOSS = OpBackends("ppo_loss", ("triton", "torch", "reference"))
GAE = OpBackends("gae", ("triton", "cuda", "torch", "reference"))
KL_ESTIMATORS = ("k1", "k3")
SCORE_POSITIONS = ("last", "after_last")
GAE_HOLES = ("bridge", "zero")  # masked steps skipped (verl, TRL) / steps of reward 0, value 0 (OpenRLHF)


def _check_same_shape(ref_name, ref, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# Masked statistics (TRL 0.x trl/trainer/utils.py masked_mean / masked_var / masked_whiten)
# --------------------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """``(values * mask).sum() / mask.sum()`` (TRL ``masked_mean``); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if axis is None else (values * mask).sum(axis)
    count = mask.sum() if axis is None else mask.sum(axis)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked elements, Bessel-corrected (TRL ``masked_var``). With fewer than
    two elements the correction is skipped (TRL raises / returns NaN there)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        variance = variance * torch.where(n > 1, n / (n - 1).clamp(min=1.0), torch.ones_like(n))
    return variance


class Whitening(NamedTuple):
    name: str
    unbiased: bool  # Bessel-corrected variance
    rsqrt: Callable[[torch.Tensor], torch.Tensor]  # var -> 1 / std, with the framework's guard


WHITENINGS: dict[str, Whitening] = {
    row.name: row
    for row in (
        Whitening("trl", True, lambda var: torch.rsqrt(var + 1e-8)),  # TRL / verl masked_whiten
        Whitening("openrlhf", False, lambda var: var.clamp(min=1e-8).rsqrt()),  # experience_maker
    )
}


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *,
                  semantics: str = "trl") -> torch.Tensor:  # fmt: skip
    """``(values - mean) * rsqrt(var + 1e-8)`` over the masked elements, mean added back when
    ``shift_mean=False`` (TRL ``masked_whiten``; verl ``masked_whiten`` is the same).
    ``semantics="openrlhf"``: OpenRLHF's global whitening, biased variance and
    ``rsqrt(max(var, 1e-8))`` (``RemoteExperienceMaker.compute_advantages_and_returns``)."""
    row = lookup(WHITENINGS, semantics, "semantics")
    mean, var = masked_mean(values, mask), masked_var(values, mask, unbiased=row.unbiased)
    whitened = (values - mean) * row.rsqrt(var)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero of each row of ``mask`` ``[B, T]`` (-1 for an empty row)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask != 0, pos, torch.full_like(pos, -1)).amax(-1)


# --------------------------------------------------------------------------------------------
# KL-penalty rewards
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def kl_penalty_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float = 0.05,
    kl_estimator: str = "k1",
    score_at: str = "last",
    whiten_rewards: bool = False,
):
    """Per-token PPO rewards: ``-kl_coef * KL_t`` at every valid token plus the sequence score at
    the end (TRL PPOTrainer.train, steps "4. compute rewards" and "5. whiten rewards").

    ``logr = ref_logp - logp``; ``k1``: ``KL = -logr``; ``k3``: ``KL = (exp(logr) - 1) - logr``
    (http://joschu.net/blog/kl-approx.html). KL is 0 at masked positions (TRL fills both
    log-prob tensors with ``INVALID_LOGPROB`` there).

    ``score_at="last"`` adds ``scores`` at the last valid token of each row (empty rows get no
    score). ``score_at="after_last"`` reproduces TRL exactly: TRL adds the score one position
    past the last response token (``sequence_lengths_p1``) when that position exists, else at the
    last token, and whitens over that extended mask (``padding_mask_p1``); pass the same
    extension to ``gae`` as its mask (``gae_mask`` in the returned dict).

    Returns a dict: ``rewards`` ``[B, T]``, ``non_score_reward`` ``[B, T]``, ``kl`` ``[B, T]``,
    ``gae_mask`` (the mask the rewards live on: ``mask``, or its one-token extension).
    """
    check_tensor("logp", logp, floating=True)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    _check_same_shape("logp", logp, ref_logp=ref_logp, mask=mask)
    check_tensor("scores", scores, floating=True)
    if tuple(scores.shape) != (logp.shape[0],):
        raise ValueError(f"scores must have shape ({logp.shape[0]},), got {tuple(scores.shape)}")
    check_same_device(logp=logp, ref_logp=ref_logp, scores=scores, mask=mask)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if score_at not in SCORE_POSITIONS:
        raise ValueError(f"score_at must be one of {SCORE_POSITIONS}, got {score_at!r}")
    cd = output_dtype(logp.dtype)
    valid = mask != 0
    zero = logp.new_zeros((), dtype=cd)
    kl = kl_estimate(logp.to(cd), ref_logp.to(cd), kl_estimator, mask=valid)  # rows in losses/kl.py
    non_score_reward = -check_number("kl_coef", kl_coef) * kl
    rewards = non_score_reward.clone()
    B, T = logp.shape
    last = last_valid_index(mask)
    rows = torch.arange(B, device=logp.device)
    gae_mask = valid
    if score_at == "after_last":
        end = torch.where(last + 1 < T, last + 1, last)
        # TRL: an empty response has sequence_length -1, so its score lands at position 0,
        # which padding_mask_p1 keeps.
        end = end.clamp(min=0)
        gae_mask = valid.clone()
        gae_mask[rows, end] = True
    else:
        end = last
    has_token = end >= 0
    score_add = torch.zeros_like(rewards)
    score_add[rows, end.clamp(min=0)] = torch.where(has_token, scores.to(cd), zero)
    rewards = rewards + score_add
    if whiten_rewards:
        rewards = masked_whiten(rewards, gae_mask, shift_mean=False)
        rewards = rewards.masked_fill(~gae_mask, 0.0)
    return {"rewards": rewards, "non_score_reward": non_score_reward, "kl": kl, "gae_mask": gae_mask}


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------
def _reverse_affine_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All ``x_t = a_t * x_{t+1} + b_t`` (``x_T = 0``) along the last dim, as a blocked scan.

    The row is cut into ``nb`` blocks of ``K ~ sqrt(T)`` steps. (1) Within every block at once
    (vectorised over rows and blocks), a K-step loop builds the block-local result ``x_loc``
    (carry-in 0) and ``p`` = the product of the ``a``'s from each step to the block end. (2) An
    ``nb``-step loop over rows computes the carry entering each block from its right,
    ``carry_j = x_loc[j+1, 0] + p[j+1, 0] * carry_{j+1}``. (3) ``x = x_loc + p * carry``.
    About ``2 sqrt(T)`` small vectorised steps instead of T; only products of the ``a``'s appear
    (no division), so it is stable for any ``a`` including 0."""
    T = a.shape[-1]
    lead = a.shape[:-1]
    if T == 0:
        return b.clone()
    K = max(1, math.isqrt(T))
    nb = -(-T // K)
    pad = nb * K - T
    if pad:  # identity steps at the end: a = 1, b = 0 keep the carry-in (0) unchanged
        a = torch.cat([a, a.new_ones(*lead, pad)], dim=-1)
        b = torch.cat([b, b.new_zeros(*lead, pad)], dim=-1)
    a = a.reshape(*lead, nb, K)
    b = b.reshape(*lead, nb, K)
    x = torch.empty_like(b)
    p = torch.empty_like(a)
    x[..., K - 1] = b[..., K - 1]
    p[..., K - 1] = a[..., K - 1]
    for k in range(K - 2, -1, -1):
        torch.addcmul(b[..., k], a[..., k], x[..., k + 1], out=x[..., k])
        torch.mul(a[..., k], p[..., k + 1], out=p[..., k])
    carry = torch.zeros_like(x[..., 0])
    x_first, p_first = x[..., 0], p[..., 0]
    for j in range(nb - 2, -1, -1):
        torch.addcmul(x_first[..., j + 1], p_first[..., j + 1], carry[..., j + 1], out=carry[..., j])
    return torch.addcmul(x, p, carry.unsqueeze(-1)).reshape(*lead, nb * K)[..., :T]


def _gae_torch(rewards, values, maskf, gamma, lam):
    # c_t: value of the next valid token at or after t; A_t: GAE (verl masked recursion).
    c = _reverse_affine_scan(1.0 - maskf, maskf * values)
    c_next = torch.cat([c[..., 1:], torch.zeros_like(c[..., :1])], dim=-1)
    delta = rewards + gamma * c_next - values
    adv = _reverse_affine_scan(maskf * (gamma * lam) + (1.0 - maskf), maskf * delta)
    return maskf * adv, maskf * (adv + values)


def _gae_triton(rewards, values, maskf, gamma, lam):
    # imported on first launch: Triton is optional off Linux, and TRITON_INTERPRET is read when
    # the kernels are decorated
    from ..kernels.gae import gae_fwd_kernel, pick_config

    if values.dtype != rewards.dtype:
        values = values.to(rewards.dtype)
    rewards = rewards if rewards.stride(-1) == 1 else rewards.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    maskf = maskf.to(torch.float32).contiguous()
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B and T:
        block_t, num_warps = pick_config(T)
        gae_fwd_kernel[(B,)](
            rewards, values, maskf, adv, ret,
            T, rewards.stride(0), values.stride(0), maskf.stride(0), adv.stride(0),
            float(gamma), float(gamma * lam),
            BLOCK_T=block_t, num_warps=num_warps,
        )  # fmt: skip
    return adv, ret


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
    whiten_mask: torch.Tensor | None = None,
    holes: str = "bridge",
    backend: str = "auto",
):
    """Generalized Advantage Estimation over ``[B, T]`` token rewards and values.

    Recursion (verl ``compute_gae_advantage_return``; for right padding it equals TRL
    PPOTrainer's loop, whose padded rewards and values are 0), from the end of each row:
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``, where
    ``V_next``/``A_next`` belong to the next position with ``mask != 0`` (0 past the end).
    Masked positions are skipped: they contribute neither reward nor value (holes such as tool
    outputs are bridged). ``returns = A + V`` (before whitening, as both TRL and verl do).

    Args:
        rewards, values: ``[B, T]`` floating (e.g. ``kl_penalty_rewards(...)["rewards"]``).
        mask: ``[B, T]`` positions that are steps of the trajectory. To reproduce TRL PPO exactly
            use its ``~padding_mask_p1`` here (``kl_penalty_rewards(score_at="after_last")``
            returns it as ``gae_mask``) and ``whiten_mask=~padding_mask``.
        gamma, lam: discount and GAE lambda (TRL defaults 1.0 and 0.95).
        whiten: whiten the advantages over ``whiten_mask`` (default ``mask``) with
            ``masked_whiten`` and zero them outside it (TRL: always on; verl: always on).
        holes: ``"bridge"`` (default, verl / TRL): masked steps are skipped, as above;
            ``"zero"`` (OpenRLHF ``get_advantages_and_returns``): every position is a step, masked
            ones with reward 0 and value 0, and their advantages / returns are kept.
        backend: ``"auto"`` (Triton on CUDA, vectorised blocked torch scan elsewhere), ``"triton"``,
            ``"torch"``, ``"reference"`` (the Python loop).

    Returns:
        ``(advantages, returns)``, ``[B, T]`` fp32 (fp64 for fp64 inputs), 0 at masked
        positions. Not differentiable (computed under ``no_grad``, as in TRL and verl).
    """
    check_tensor("rewards", rewards, floating=True)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    check_tensor("values", values, floating=True)
    _check_same_shape("rewards", rewards, values=values, mask=mask, whiten_mask=whiten_mask)
    check_same_device(rewards=rewards, values=values, mask=mask, whiten_mask=whiten_mask)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= check_number(name, value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if holes not in GAE_HOLES:
        raise ValueError(f"holes must be one of {', '.join(GAE_HOLES)}; got {holes!r}")
    # Masked steps contribute neither reward nor value: whatever they hold (NaN padding included)
    # must not reach the recurrence on any backend.
    rewards = rewards.masked_fill(mask == 0, 0.0)
    values = values.masked_fill(mask == 0, 0.0)
    whiten_mask = mask if whiten_mask is None else whiten_mask
    if holes == "zero":  # every position is a step (masked ones now hold reward 0, value 0)
        mask = torch.ones_like(mask)
    be = GAE.resolve(backend, rewards.device, torch.promote_types(rewards.dtype, values.dtype))
    cd = output_dtype(torch.promote_types(rewards.dtype, values.dtype))
    if be == "triton":
        adv, ret = _gae_triton(rewards, values, mask != 0, float(gamma), float(lam))
    elif be == "reference":
        adv, ret = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    elif be == "cuda":  # the CUDA C++ reverse scan (csrc/gae.cu), same semantics, fp32
        adv, ret = gae_cuda(rewards, values, mask, float(gamma), float(lam))
    else:  # torch
        maskf = (mask != 0).to(cd)
        adv, ret = _gae_torch(rewards.to(cd), values.to(cd), maskf, float(gamma), float(lam))
    if whiten:
        wm = whiten_mask != 0
        adv = masked_whiten(adv, wm).masked_fill(~wm, 0.0)
    return adv, ret


# --------------------------------------------------------------------------------------------
# Loss aggregation (the rows live in losses/aggregation.py)
# --------------------------------------------------------------------------------------------
def agg_rows(loss_sum: torch.Tensor, count: torch.Tensor, seq_len: int, loss_agg_mode: str, **options) -> torch.Tensor:
    """``agg_loss`` from per-row sums over valid tokens (``loss_sum``, ``count``: ``[B]``); every
    backend reduces rows first and calls this. ``options``: those of ``agg_loss``."""
    return aggregate_rows(loss_sum, count, seq_len, loss_agg_mode, **_agg_options(**options))


def _agg_options(*, semantics="classic", global_batch=None, dp_size=1, batch_num_tokens=None,
                 global_batch_size=None, loss_scale_factor=None):  # fmt: skip
    if global_batch is None:
        global_batch = GlobalBatch(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    return {"semantics": semantics, "global_batch": global_batch}


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
    semantics: str = "classic",
    global_batch: GlobalBatch | None = None,
) -> torch.Tensor:
    """Aggregate a ``[B, T]`` per-token loss (verl ``agg_loss``; rows in ``losses/aggregation.py``).
    ``token-mean`` is TRL PPO's ``masked_mean``; the ``seq-mean-*`` modes average per-sequence token
    sums / means. ``semantics="classic"`` (default): empty sequences count as 0 and ``-sum-norm`` is
    total sum / T; ``"verl"`` (verl >= 0.7) / ``"openrlhf"``: empty sequences are excluded and
    ``-sum-norm`` also divides by the sequences. ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor`` (or one ``GlobalBatch``): verl's global-batch
    arguments, under which the micro-batch losses sum to the global-batch loss."""
    return aggregate(loss_mat, loss_mask, loss_agg_mode, **_agg_options(
        semantics=semantics, global_batch=global_batch, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor))  # fmt: skip


# --------------------------------------------------------------------------------------------
# PPO loss
# --------------------------------------------------------------------------------------------
class PPOConfig(NamedTuple):
    """The hyper-parameters of ``ppo_loss``: its keywords, one field each (same names, same defaults)."""

    cliprange: float = 0.2
    cliprange_value: float | None = 0.2
    vf_coef: float = 0.1
    cliprange_low: float | None = None  # None: cliprange
    cliprange_high: float | None = None  # None: cliprange
    clip_ratio_c: float | None = None
    loss_agg_mode: str = "token-mean"  # a row of AGGREGATION_MODES
    entropy_coef: float = 0.0


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    *,
    value_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    config: PPOConfig | None = None,
    backend: str = "auto",
    **options,
):
    """PPO clipped policy loss (+ clipped value loss), as TRL PPOTrainer.train's minibatch step.

    Policy (TRL; verl ``compute_policy_loss`` "vanilla"): ``ratio = exp(logp - old_logp)``,
    ``pg = max(-A * ratio, -A * clamp(ratio, 1 - low, 1 + high))`` aggregated over ``mask``
    (``low``/``high`` default to ``cliprange``). ``clip_ratio_c`` enables verl's dual clip: for
    ``A < 0`` the loss is capped at ``-A * clip_ratio_c``.
    Value (TRL): ``vclip = clamp(values, old_values - cliprange_value, old_values +
    cliprange_value)``, ``vf = 0.5 * masked_mean(max((values - R)^2, (vclip - R)^2),
    value_mask)``; no clipping when ``old_values`` or ``cliprange_value`` is None.
    ``loss = pg + vf_coef * vf - entropy_coef * agg(entropy)``.

    Args:
        logp, old_logp, advantages, mask: ``[B, T]``; ``advantages`` also ``[B]``.
        values, old_values, returns: ``[B, T]`` value predictions (differentiable), rollout
            values, and targets (``gae``'s returns). ``returns`` is required with ``values``.
        value_mask: mask of the value loss (TRL: ``~padding_mask_p1``); default ``mask``.
        entropy: ``[B, T]`` per-token entropies for the metric / the bonus.
        config: a :class:`PPOConfig`, or its fields as keywords (not both): ``cliprange``,
            ``cliprange_value``, ``vf_coef``, ``cliprange_low``, ``cliprange_high``,
            ``clip_ratio_c`` (above), ``entropy_coef``, and ``loss_agg_mode``: verl's modes
            (``AGGREGATION_MODES``), ``"token-mean"`` (TRL) by default; applies to the policy term
            and the entropy term (the value loss is TRL's token mean).
        backend: ``PPO_LOSS.backends``: ``"auto"`` (Triton on CUDA tensors), ``"triton"`` (the
            policy term, dual clip included, runs in the fused clipped-policy kernels,
            ``alignkernels.kernels.grpo``, not twice differentiable), ``"torch"``/``"reference"``
            (the row engine's PyTorch rows, ``losses/clipped_policy.py``, twice differentiable).
            ``"cuda"`` is a ``ValueError``.

    Returns:
        ``(loss, metrics)`` with TRL PPO's metric names: ``loss/policy_avg``,
        ``policy/clipfrac_avg``, ``policy/approxkl_avg`` (``0.5 * mean((logp - old)^2)`` over all
        ``B*T`` positions, masked ones counting 0 as in TRL), ``val/ratio`` (mean ratio over all
        positions, masked ones counting 1 as in TRL), and with values ``loss/value_avg``,
        ``val/clipfrac_avg``; ``policy/entropy_avg`` (masked mean) with ``entropy``;
        ``policy/clipfrac_lower`` (verl ``pg_clipfrac_lower``) with ``clip_ratio_c``.
    """
    config = typed_value("config", PPOConfig, config, options)
    no_other_keywords("ppo_loss", options)
    check_token_tensors(logp, advantages, old_logp=old_logp, mask=mask, values=values, old_values=old_values,
                        returns=returns, value_mask=value_mask, entropy=entropy)  # fmt: skip
    check_tensor("old_logp", old_logp, floating=True)
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, values=values,
                      old_values=old_values, returns=returns, value_mask=value_mask, entropy=entropy)  # fmt: skip
    if values is not None and returns is None:
        raise ValueError("returns is required when values is given (the value loss regresses values on returns)")
    config = checked_ppo_config(config)
    if entropy is None and config.entropy_coef != 0.0:
        raise ValueError("entropy is required when entropy_coef != 0")
    be = PPO_LOSS.resolve(backend, logp.device, logp.dtype)
    valid = mask != 0
    loss, metrics = ppo_policy_loss(logp, old_logp, advantages, valid, config, be)
    if values is not None:
        vf_loss, metrics["val/clipfrac_avg"] = ppo_value_loss(values, old_values, returns,
                                                              valid if value_mask is None else value_mask != 0,
                                                              config.cliprange_value)  # fmt: skip
        loss = loss + config.vf_coef * vf_loss
        metrics["loss/value_avg"] = vf_loss.detach()
    if entropy is not None:
        ent = torch.where(valid, entropy.to(loss.dtype), loss.new_zeros(()))
        maskf = valid.to(loss.dtype)
        if config.entropy_coef != 0.0:
            loss = loss - config.entropy_coef * aggregate(ent, maskf, config.loss_agg_mode)
        metrics["policy/entropy_avg"] = masked_mean(ent.detach(), maskf)
    return loss, metrics


def checked_ppo_config(config: PPOConfig) -> PPOConfig:
    """Each hyper-parameter a number (TE naming it) in range (VE); ``cliprange_low`` /
    ``cliprange_high`` None -> ``cliprange``."""
    lookup(AGGREGATION_MODES, config.loss_agg_mode, "loss_agg_mode")
    ranges = {}
    for name in ("cliprange", "cliprange_value", "cliprange_low", "cliprange_high"):
        ranges[name] = check_number(name, getattr(config, name), allow_none=name != "cliprange")
        if ranges[name] is not None and not ranges[name] >= 0:
            raise ValueError(f"{name} must be >= 0, got {ranges[name]}")
    clip_ratio_c = check_number("clip_ratio_c", config.clip_ratio_c, allow_none=True)
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 (dual clip), got {clip_ratio_c}")
    for name in ("cliprange_low", "cliprange_high"):
        ranges[name] = ranges["cliprange"] if ranges[name] is None else ranges[name]
    return config._replace(clip_ratio_c=clip_ratio_c, vf_coef=check_number("vf_coef", config.vf_coef),
                           entropy_coef=check_number("entropy_coef", config.entropy_coef), **ranges)  # fmt: skip


def ppo_policy_loss(logp, old_logp, advantages, valid, config: PPOConfig, backend: str):
    """The clipped policy term and its metrics. It is the row engine's clipped per-token loss at
    token level with no delta / KL: ``max(-A r, -A clamp(r)) = -min(A r, A clamp(r))``, verl's dual
    clip its ``clip_c``; ``pg_losses2 > pg_losses`` is exactly the engine's "region" clip indicator
    (``losses/clipped_policy.py``: PyTorch, or one fused pass in ``kernels/grpo.py``), reduced by
    ``losses/aggregation.py``."""
    cd = output_dtype(logp.dtype)
    zero = logp.new_zeros((), dtype=cd)
    adv = advantages.detach().to(cd)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old = torch.where(valid, old_logp.detach().to(cd), zero)
    inputs = TokenInputs(torch.where(valid, logp.to(cd), zero), old, None, adv, valid)
    term = PolicyTerm("clipped", eps_low=config.cliprange_low, eps_high=config.cliprange_high, bias_correction=False,
                      clip_c=config.clip_ratio_c)  # fmt: skip
    rows = policy_rows(inputs, term, backend)
    T = logp.shape[1]
    pg_loss = aggregate_rows(rows["loss_sum"], rows["count"], T, config.loss_agg_mode)
    with torch.no_grad():
        d = torch.where(valid, logp.detach().to(cd) - old, zero)
        metrics = {
            "loss/policy_avg": pg_loss.detach(),
            "policy/clipfrac_avg": aggregate_rows(rows["region_sum"], rows["count"], T, "token-mean"),
            "policy/approxkl_avg": 0.5 * (d**2).mean(),
            "val/ratio": torch.exp(d).mean(),
        }
        if config.clip_ratio_c is not None:  # verl's pg_clipfrac_lower: the row engine's dual-clip count
            metrics["policy/clipfrac_lower"] = aggregate_rows(rows["dual_sum"], rows["count"], T, "token-mean")
    return pg_loss, metrics


def ppo_value_loss(values, old_values, returns, vmask, cliprange_value):
    """TRL's clipped value loss ``0.5 * masked_mean(max((V - R)^2, (Vclip - R)^2))`` over ``vmask``
    (unclipped without ``old_values`` or ``cliprange_value``) and its clip fraction (detached)."""
    cd = output_dtype(values.dtype)
    zero = values.new_zeros((), dtype=cd)
    vmaskf = vmask.to(cd)
    vpred = torch.where(vmask, values.to(cd), zero)
    ret = torch.where(vmask, returns.detach().to(cd), zero)
    vf_losses1 = torch.square(vpred - ret)
    if old_values is None or cliprange_value is None:
        return 0.5 * masked_mean(vf_losses1, vmaskf), torch.zeros((), dtype=cd, device=values.device)
    ov = torch.where(vmask, old_values.detach().to(cd), zero)
    vpredclipped = torch.clamp(vpred, ov - cliprange_value, ov + cliprange_value)
    vf_losses2 = torch.square(vpredclipped - ret)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).to(cd), vmaskf).detach()
    return 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), vmaskf), vf_clipfrac


class PPOLoss(nn.Module):
    """``nn.Module`` wrapper of ``ppo_loss``: configuration at construction, tensors in
    ``forward``; keyword arguments of ``forward`` override the configuration for one call."""

    def __init__(self, **config):
        super().__init__()
        options = dict(config)
        mode = typed_value("config", PPOConfig, options.pop("config", None), options).loss_agg_mode
        lookup(AGGREGATION_MODES, mode, "loss_agg_mode")
        self.config = dict(config)

    def forward(self, logp, old_logp, advantages, mask, values=None, old_values=None, returns=None, **overrides):
        return ppo_loss(logp, old_logp, advantages, mask, values, old_values, returns, **{**self.config, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
