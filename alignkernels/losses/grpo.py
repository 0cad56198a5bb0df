"""GRPO family losses on per-token log-probs, with the exact semantics of TRL 1.16.

Everything here follows ``trl.trainer.grpo_trainer.GRPOTrainer._compute_loss`` (TRL 1.16.0)
line by line -- loss types ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,
``luspo``, ``vespo``; token- and sequence-level (GSPO) importance sampling; two-sided ``delta``
clipping (INTELLECT-2); k3 KL with ``beta`` and ``use_bias_correction_kl``; the vLLM
importance-sampling correction; off-policy sequence masking (DeepSeek-V3.2); top-entropy token
masking; the entropy bonus; every aggregation including ``num_items_in_batch``,
``max_completion_length`` and gradient-accumulation scaling -- and the advantage computation of
``GRPOTrainer._generate_and_score_completions`` (``group_advantages``). Tests pin each path
against TRL's own ``_compute_loss`` called on plain tensors.

Layers: the per-token policy term and its per-row sums live in ``clipped_policy`` (shared with
PPO; PyTorch or the fused Triton kernels); the advantages and TRL's NaN statistics in
``advantages``; what each ``loss_type`` is (term, aggregation, metrics, separability) is its row
in ``policy_rows.POLICY_LOSS_TYPES``. This module holds the GRPO masks/weights and ``grpo_loss``:
validate -> the typed values (``PolicyConfig``, ``policy_rows.TrainerState``; whole or as
keywords) -> the row's term (``clipped_policy.policy_rows``) -> the row's aggregation
(``policy_rows.aggregate_policy_rows``) -> the entropy bonus (TRL's token mean, or with
``entropy_aggregation="loss"`` the row's own aggregation, verl's form) -> the row's metrics.

Conventions: inputs are ``[B, T]`` (advantages ``[B]`` or ``[B, T]``); the mask may be bool,
integer or float. All math runs in fp32 (fp64 for fp64 inputs). Masked positions are replaced by
0 before any exp/log, so garbage or ``-inf`` there never produces NaN in the loss or gradient,
and a fully masked batch gives a finite loss with zero gradients. Metrics are detached 0-d
tensors (no host sync) named as TRL logs them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .._utils import OpBackends, check_same_device, output_dtype
from .advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS, group_advantages, nanmax, nanmin
from .clipped_policy import PolicyTerm, TokenInputs, policy_rows
from .aggregation import lookup
from .policy_rows import (POLICY_LOSS_TYPES, PolicyLossType, TrainerState, aggregate_policy_rows, checked_state,
                          policy_loss_type, with_num_items)  # fmt: skip
from .validation import check_number, check_token_tensors, no_other_keywords, typed_value

__all__ = [
    "ENTROPY_AGGREGATIONS", "GRPO_LOSS", "GRPO_LOSS_TYPES", "GRPOLoss", "PolicyConfig", "IMPORTANCE_SAMPLING_LEVELS", "MULTI_OBJECTIVE_AGGREGATIONS",
    "SCALE_REWARDS", "VLLM_IMPORTANCE_SAMPLING_MODES", "group_advantages", "grpo_loss", "high_entropy_mask",
    "off_policy_mask", "vespo_gamma_weights", "vllm_importance_sampling_ratio",
]  # fmt: skip

# "reference" is the same eager transcription of TRL as "torch" (there is no separate oracle of
# TRL's loss: the tests call TRL's own _compute_loss).
GRPO_LOSS = OpBackends("grpo_loss", ("triton", "torch", "reference"))
GRPO_LOSS_TYPES = tuple(POLICY_LOSS_TYPES)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# --------------------------------------------------------------------------------------------
# Masks and weights of GRPOTrainer (each mirrors one TRL method; cited)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of valid tokens whose entropy is >= the ``threshold`` quantile of the valid
    tokens' entropies (GRPOTrainer.get_high_entropy_mask, single process)."""
    valid = mask.bool()
    local = entropy[valid].float()
    if local.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    return ((entropy * mask.to(entropy.dtype)) >= entropy_threshold) & valid


@torch.no_grad()
def off_policy_mask(advantages, logp, sampling_logp, mask, threshold: float) -> torch.Tensor:
    """Off-policy sequence mask of DeepSeek-V3.2 (GRPOTrainer.get_off_policy_mask): keep a
    sequence if its advantage is >= 0 or its mean KL(sampler || policy) is <= ``threshold``."""
    kl_div = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg_seq_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def vespo_gamma_weights(
    advantages, log_ratio_per_token, mask, importance_sampling_ratio=None,
    k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0,
):  # fmt: skip
    """VESPO sequence weights ``phi(w) = e^lam * w^k * e^(-lam*w)`` in log space, detached
    (GRPOTrainer.get_gamma_weights). Returns ``[B, 1]``."""
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
        # TRL sums over all positions; its padded ratios are exactly 1 (log 0). Masking here gives
        # the same numbers and ignores whatever a caller leaves at padded positions.
        seq_log_ratio = seq_log_ratio + torch.sum(log_is_ratio * mask, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def vllm_importance_sampling_ratio(
    old_logp, sampling_logp, mask, *, mode="sequence_mask", clip_min=None, clip_max=3.0
):  # fmt: skip
    """The vLLM importance-sampling correction ``pi_old / pi_sampler`` that TRL computes in
    ``_generate_and_score_completions`` (``vllm_importance_sampling_mode``, ``_clip_min``,
    ``_clip_max``; TRL's defaults). Returns ``[B, T]`` (token modes) or ``[B, 1]`` (sequence
    modes), to pass as ``grpo_loss(importance_sampling_ratio=...)``."""
    if mode not in VLLM_IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"mode must be one of {VLLM_IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    clip_min = check_number("clip_min", clip_min, allow_none=True)
    clip_max = check_number("clip_max", clip_max, allow_none=True)
    diff = torch.nan_to_num((old_logp - sampling_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


# --------------------------------------------------------------------------------------------
# grpo_loss: validate -> typed values -> the row's term -> the row's aggregation -> metrics
# --------------------------------------------------------------------------------------------
class PolicyConfig(NamedTuple):
    """The hyper-parameters of a GRPO-family loss: ``grpo_loss``'s keywords, one field each (same
    names, same defaults; ``GRPOTrainer``'s config names)."""

    loss_type: str = "dapo"  # a row of POLICY_LOSS_TYPES
    importance_sampling_level: str = "token"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low
    delta: float | None = None
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    entropy_aggregation: str = "trl"  # a name of ENTROPY_AGGREGATIONS
    clip_ratio_c: float | None = None  # dual clip (verl), clipped rows only; None: off (TRL)
    log_ratio_clamp: float | None = None  # logp - old in [-L, L] before exp (verl: 20); None: off (TRL)

    @property
    def sequence(self) -> bool:
        return self.importance_sampling_level == "sequence"


class GRPOTensors(NamedTuple):
    """The tensors of one ``grpo_loss`` call, as the caller gave them (validated)."""

    logp: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    importance_sampling_ratio: torch.Tensor | None = None
    sampling_logp: torch.Tensor | None = None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    importance_sampling_weight: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    config: PolicyConfig | None = None,
    state: TrainerState | None = None,
    backend: str = "auto",
    **options,
):
    """GRPO-family policy loss on per-token log-probs, as ``GRPOTrainer._compute_loss`` (TRL 1.16).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: ``[B, T]`` log-probs under the sampling-time policy, or None for on-policy
            (``logp.detach()``, ratio 1 with gradient of ``logp``).
        ref_logp: ``[B, T]`` reference-model log-probs; required when ``beta != 0``.
        advantages: ``[B]`` (one per completion) or ``[B, T]`` (per token).
        mask: ``[B, T]`` completion mask (TRL: ``completion_mask`` times ``tool_mask``).
        entropy: ``[B, T]`` per-token entropies: logged as ``entropy``; needed by
            ``top_entropy_quantile < 1`` and ``entropy_coef != 0`` (then differentiable).
        importance_sampling_ratio: the vLLM correction ``[B, T]`` or ``[B, 1]`` (see
            ``vllm_importance_sampling_ratio``); multiplies the per-token loss (``vespo``: enters
            the gamma weights instead, token-level only). ``importance_sampling_weight`` is an alias.
        sampling_logp: the sampler's log-probs for ``off_policy_mask_threshold`` (default ``old_logp``).
        config: a :class:`PolicyConfig`, or its fields as keywords (below; not both).
        state: a :class:`~alignkernels.losses.policy_rows.TrainerState`, or its fields as keywords
            (below; not both).
        backend: ``GRPO_LOSS.backends``: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere),
            ``"triton"`` (the fused kernels of ``alignkernels.kernels.grpo``: one pass over
            ``[B, T]`` forward, one backward, not twice differentiable; rows with ``triton=False``,
            e.g. ``vespo``, run in PyTorch), ``"torch"``/``"reference"`` (the PyTorch transcription of
            TRL, twice differentiable). All give the same numbers (tests compare them). ``"cuda"`` is
            a ``ValueError`` (no CUDA C++ kernel for this loss).

    ``PolicyConfig`` keywords:
        loss_type: one of ``GRPO_LOSS_TYPES`` (the rows of ``POLICY_LOSS_TYPES``). Aggregation over
            valid tokens: ``grpo``/``sapo``: mean over sequences of each sequence's token mean,
            ``/ GA``; ``bnpo``: token mean over the batch, ``/ GA``; ``dr_grpo``: sum ``/ (B *
            max_completion_length)``, ``/ GA``; ``dapo``/``cispo``/``vespo``: sum ``/
            (num_items_in_batch / num_processes * GA / steps_per_generation)`` (training) or
            ``/ (num_items_in_batch / num_processes)`` (eval); ``luspo``: mean over sequences of
            each sequence's token sum, ``/ GA``. (GA = ``gradient_accumulation_steps`` in
            training, 1 in eval.)
        importance_sampling_level: ``"token"`` (per-token ratio) or ``"sequence"`` (GSPO: one ratio
            per sequence, ``exp(mean over valid tokens of logp - old_logp)``).
        beta: weight of the per-token k3 KL ``exp(ref - logp) - (ref - logp) - 1``.
        epsilon_low, epsilon_high: clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio
            (``epsilon_high=None`` means ``epsilon_low``, TRL's rule). For ``cispo``,
            ``epsilon_high`` is the upper bound of the clamped (detached) ratio.
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at ``delta``.
        use_bias_correction_kl: multiply the KL by the importance ratio (TRL's default: True).
        sapo_temperature_pos/neg: SAPO gate temperatures for positive / non-positive advantages.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO gamma parameters.
        off_policy_mask_threshold: drop negative-advantage sequences whose mean
            ``sampling_logp - logp`` exceeds it.
        top_entropy_quantile: keep in the policy loss only valid tokens with entropy >= the
            ``1 - q`` quantile (q = 1 keeps all).
        entropy_coef: entropy bonus ``loss -= coef * agg(entropy)`` over the kept tokens (TRL's
            static coefficient; for adaptive control pass the current coefficient).
        clip_ratio_c: dual clip (verl ``compute_policy_loss_vanilla``), rows whose term is ``clipped``
            only, a number > 1: for ``A < 0`` the per-token loss is capped at ``-A * clip_ratio_c``;
            logs ``clip_ratio/dual_clip_mean`` (verl's ``pg_clipfrac_lower``). Default None: off (TRL).
        log_ratio_clamp: a number > 0: ``logp - old_logp`` is clamped to ``[-L, L]`` per token before
            the exponential (and before GSPO's sequence mean), no gradient outside (verl's ``L = 20``).
            Default None: off (TRL).
        entropy_aggregation: how ``agg`` reduces the entropy (``ENTROPY_AGGREGATIONS``): ``"trl"``
            (default, TRL): token mean ``/ GA``; ``"loss"``: the loss type's own aggregation and
            normaliser, as the policy loss (verl: ``agg_loss(entropy, mask, loss_agg_mode)``).

    ``TrainerState`` keywords (what TRL's normalisation reads): ``gradient_accumulation_steps``,
        ``steps_per_generation`` (default = GA), ``num_processes``, ``training``: the counts are
        ints >= 1 (a bool, float or str is a ``TypeError``, 0 or less a ``ValueError``, naming the
        argument); ``max_completion_length``: required by ``dr_grpo``, an int >= 1;
        ``num_items_in_batch``: valid completion tokens in the whole generation batch (all
        processes), an int or a numeric scalar tensor (TRL's); default: ``mask.sum()``. 0 only for
        a fully masked batch (TRL clamps it at 1); checking a tensor costs one host sync.

    Returns:
        ``(loss, metrics)``: 0-d fp32 loss (fp64 for fp64 ``logp``); metrics dict of detached
        0-d tensors with TRL's names: ``kl`` (beta != 0), ``entropy`` (entropy given),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
        ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clipped loss types), ``clip_ratio/dual_clip_mean``
        (``clip_ratio_c``), ``cispo_clip_ratio``,
        ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef`` (entropy bonus on).
    """
    config = typed_value("config", PolicyConfig, config, options)
    state = typed_value("state", TrainerState, state, options)
    no_other_keywords("grpo_loss", options)
    row = policy_loss_type(config.loss_type)
    config = checked_config(config, row)
    if importance_sampling_weight is not None:
        if importance_sampling_ratio is not None:
            raise ValueError("pass importance_sampling_ratio or its alias importance_sampling_weight, not both")
        importance_sampling_ratio = importance_sampling_weight
    tensors = GRPOTensors(logp, old_logp, ref_logp, advantages, mask, entropy, importance_sampling_ratio, sampling_logp)
    state = checked_state(state)
    _check_tensors(tensors, row, config, state)
    be = GRPO_LOSS.resolve(backend, logp.device, logp.dtype)
    return grpo_rows_loss(tensors, row, config, with_num_items(state, mask, output_dtype(logp.dtype)), be)


def checked_config(config: PolicyConfig, row: PolicyLossType) -> PolicyConfig:
    """Each hyper-parameter a number (TE naming it) in range (VE); ``epsilon_high`` None ->
    ``epsilon_low``; the ratio level one the row takes."""
    if config.importance_sampling_level not in row.ratio:
        raise ValueError(f"importance_sampling_level must be one of {row.ratio} for loss_type={row.name!r}, "
                         f"got {config.importance_sampling_level!r}")  # fmt: skip
    lookup(ENTROPY_AGGREGATIONS, config.entropy_aggregation, "entropy_aggregation")
    if config.clip_ratio_c is not None and row.term != "clipped":
        raise ValueError(f"clip_ratio_c (dual clip) applies to the clipped loss types, not loss_type={row.name!r} "
                         f"(term {row.term!r})")  # fmt: skip
    numbers = {name: check_number(name, getattr(config, name), allow_none=name in OPTIONAL_NUMBERS)
               for name in NUMBERS}  # fmt: skip
    for name in ("epsilon_low", "epsilon_high", "delta"):
        if numbers[name] is not None and not numbers[name] >= 0:
            raise ValueError(f"{name} must be >= 0, got {numbers[name]}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if not numbers[name] > 0:
            raise ValueError(f"{name} must be > 0 (SAPO divides by it), got {numbers[name]}")
    if numbers["clip_ratio_c"] is not None and not numbers["clip_ratio_c"] > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {numbers['clip_ratio_c']}")
    if numbers["log_ratio_clamp"] is not None and not numbers["log_ratio_clamp"] > 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {numbers['log_ratio_clamp']}")
    if not 0.0 <= numbers["top_entropy_quantile"] <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {numbers['top_entropy_quantile']}")
    if numbers["epsilon_high"] is None:
        numbers["epsilon_high"] = numbers["epsilon_low"]
    return config._replace(use_bias_correction_kl=bool(config.use_bias_correction_kl), **numbers)


NUMBERS = ("beta", "epsilon_low", "epsilon_high", "delta", "sapo_temperature_pos", "sapo_temperature_neg",
           "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold",
           "top_entropy_quantile", "entropy_coef", "clip_ratio_c", "log_ratio_clamp")  # fmt: skip
OPTIONAL_NUMBERS = ("epsilon_high", "delta", "off_policy_mask_threshold", "clip_ratio_c", "log_ratio_clamp")


def _check_tensors(t: GRPOTensors, row: PolicyLossType, config: PolicyConfig, state: TrainerState) -> None:
    """Shapes, dtypes and devices by name, and what the row and the options need."""
    B, T = check_token_tensors(t.logp, t.advantages, per_sequence=("importance_sampling_ratio",), mask=t.mask,
                               old_logp=t.old_logp, ref_logp=t.ref_logp, entropy=t.entropy,
                               sampling_logp=t.sampling_logp, importance_sampling_ratio=t.importance_sampling_ratio)  # fmt: skip
    if B == 0:
        raise ValueError("logp must hold at least one completion (B >= 1), got an empty batch")
    check_same_device(**t._asdict())
    if config.beta != 0.0 and t.ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    if row.normaliser == "max_completion_length" and state.max_completion_length is None:
        raise ValueError(
            f"loss_type={row.name!r} needs max_completion_length (TRL normalises by B * max_completion_length)"
        )
    is_ratio = t.importance_sampling_ratio
    if row.term == "vespo" and is_ratio is not None and is_ratio.shape[-1] == 1 and T != 1:
        raise ValueError("loss_type='vespo' needs a token-level importance_sampling_ratio [B, T] (TRL's rule)")
    if t.entropy is None and (config.top_entropy_quantile < 1.0 or config.entropy_coef != 0.0):
        raise ValueError("entropy is required when top_entropy_quantile < 1 or entropy_coef != 0")


class GRPOTokens(NamedTuple):
    """``grpo_loss``'s per-token tensors in the compute dtype, masked (0 at masked positions), and
    the weights of TRL's masks: what the row engine and the entropy bonus read."""

    inputs: TokenInputs
    mask: torch.Tensor  # float
    entropy: torch.Tensor | None
    entropy_mask: torch.Tensor | None  # top-entropy token mask (bool), None: all kept
    vespo_weights: torch.Tensor | None  # [B, 1] phi(w_seq), VESPO only


def grpo_tokens(tensors: GRPOTensors, row: PolicyLossType, config: PolicyConfig) -> GRPOTokens:
    """Mask, cast and weight the tensors (TRL's off-policy and top-entropy masks, VESPO's weights)."""
    logp = tensors.logp
    B, T = logp.shape
    cd = output_dtype(logp.dtype)
    valid = tensors.mask != 0
    maskf = valid.to(cd)
    zero = logp.new_zeros((), dtype=cd)

    def masked(t, detach=True):
        return None if t is None else torch.where(valid, (t.detach() if detach else t).to(cd), zero)

    per_token_logps, old, ent = masked(logp, detach=False), masked(tensors.old_logp), masked(tensors.entropy, False)
    on_policy_old = per_token_logps.detach() if old is None else old
    adv = tensors.advantages.to(cd)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    is_ratio = tensors.importance_sampling_ratio
    is_ratio = None if is_ratio is None else is_ratio.detach().to(cd)
    # off-policy sequence mask x top-entropy mask: scale the policy term only
    token_weight = entropy_mask = phi_seq = None
    if config.off_policy_mask_threshold is not None:
        samp = on_policy_old if tensors.sampling_logp is None else masked(tensors.sampling_logp)
        token_weight = off_policy_mask(adv, per_token_logps, samp, maskf, config.off_policy_mask_threshold)
        token_weight = token_weight.expand(B, T)
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(ent.detach(), maskf, 1 - config.top_entropy_quantile)
        token_weight = entropy_mask.to(cd) if token_weight is None else token_weight * entropy_mask
    if row.term == "vespo":
        phi_seq = vespo_gamma_weights(adv, per_token_logps - on_policy_old, maskf, is_ratio, k_pos=config.vespo_k_pos,
                                      lambda_pos=config.vespo_lambda_pos, k_neg=config.vespo_k_neg,
                                      lambda_neg=config.vespo_lambda_neg)  # fmt: skip
    ref = masked(tensors.ref_logp) if config.beta != 0.0 else None
    inputs = TokenInputs(per_token_logps, old, ref, adv, valid, token_weight, is_ratio)
    return GRPOTokens(inputs, maskf, ent, entropy_mask, phi_seq)


def policy_term(row: PolicyLossType, config: PolicyConfig) -> PolicyTerm:
    """The row engine's per-token formula: the row's ``term`` with the config's hyper-parameters."""
    return PolicyTerm(
        kind=row.term, sequence=config.sequence, beta=config.beta, bias_correction=config.use_bias_correction_kl,
        eps_low=config.epsilon_low, eps_high=config.epsilon_high, delta=config.delta,
        tau_pos=config.sapo_temperature_pos, tau_neg=config.sapo_temperature_neg, clip_c=config.clip_ratio_c,
        log_ratio_clamp=config.log_ratio_clamp,
    )  # fmt: skip


def grpo_rows_loss(tensors: GRPOTensors, row: PolicyLossType, config: PolicyConfig, state: TrainerState,
                   backend: str):  # fmt: skip
    """``grpo_loss`` on validated inputs: masks and weights, the row engine's per-row sums
    (``row.term``), the row's aggregation, the entropy bonus and the row's metrics."""
    tokens = grpo_tokens(tensors, row, config)
    rows = policy_rows(tokens.inputs, policy_term(row, config), backend if row.triton else "torch",
                       vespo_weights=tokens.vespo_weights)  # fmt: skip
    T = tensors.logp.shape[1]
    loss, policy_loss = aggregate_policy_rows(row, rows["loss_sum"], rows["count"], T, state)
    metrics = {}
    if config.entropy_coef != 0.0:
        loss = loss - config.entropy_coef * entropy_bonus(tokens, rows["count"], row, config, state)
        metrics["policy_loss"] = policy_loss
        if state.training:  # TRL logs the coefficient at train optimizer steps
            metrics["entropy_coef"] = torch.tensor(float(config.entropy_coef), dtype=tokens.mask.dtype,
                                                   device=tokens.mask.device)  # fmt: skip
    metrics.update(_grpo_metrics(rows, row, config, tokens))
    return loss, metrics


ENTROPY_AGGREGATIONS = {
    "trl": "token mean over the kept tokens / GA (GRPOTrainer._compute_loss)",
    "loss": "the loss type's own aggregation and normaliser (verl: agg_loss(entropy, mask, loss_agg_mode))",
}


def entropy_bonus(tokens: GRPOTokens, count: torch.Tensor, row: PolicyLossType, config: PolicyConfig,
                  state: TrainerState) -> torch.Tensor:  # fmt: skip
    """The aggregated entropy over the kept tokens (valid, and above the entropy quantile), the
    ``config.entropy_aggregation`` way; ``count``: the row engine's valid tokens per row."""
    kept = tokens.mask if tokens.entropy_mask is None else tokens.mask * tokens.entropy_mask
    if config.entropy_aggregation == "loss":
        return aggregate_policy_rows(row, (tokens.entropy * kept).sum(-1), count, kept.shape[1], state)[0]
    accumulation = state.gradient_accumulation_steps if state.training else 1.0
    return (tokens.entropy * kept).sum() / kept.sum().clamp(min=1.0) / accumulation


@torch.no_grad()
def _grpo_metrics(rows, row: PolicyLossType, config: PolicyConfig, tokens: GRPOTokens) -> dict:
    """TRL's names and reductions (one process): ``kl``, ``entropy`` and the row's ``metrics``."""
    maskf, ent, phi_seq, adv = tokens.mask, tokens.entropy, tokens.vespo_weights, tokens.inputs.adv
    cd = maskf.dtype
    B = maskf.shape[0]
    count = rows["count"].detach()
    total = count.sum().clamp(min=1.0)
    metrics = {}
    if config.beta != 0.0:
        metrics["kl"] = rows["kl_sum"].sum() / total
    if ent is not None:
        metrics["entropy"] = (ent * maskf).sum() / total
    if config.clip_ratio_c is not None:  # verl's pg_clipfrac_lower: a token mean
        metrics["clip_ratio/dual_clip_mean"] = rows["dual_sum"].sum() / total
    if not row.metrics:
        return metrics
    n_seq = max(float(B), 1.0)
    # TRL reduces a [B, 1] metric (sequence-level ratio with one advantage per sequence) per
    # sequence, a [B, T] one over valid tokens.
    if config.sequence and adv.shape[1] == 1:
        c1 = rows["coef"]
        if config.delta is not None and row.term == "clipped":
            c1 = c1.clamp(max=config.delta)  # TRL's metrics read coef_1 after the delta cap
        a = adv[:, 0]
        seq_low = ((c1 < 1 - config.epsilon_low) & (a < 0)).to(cd)
        seq_high = ((c1 > 1 + config.epsilon_high) & (a > 0)).to(cd)
        seq_region = torch.maximum(seq_low, seq_high)
        seq_cispo = ((rows["coef"] > config.epsilon_high) & (a > 0)).to(cd)
        low_mean, high_mean, region_mean = seq_low.sum() / n_seq, seq_high.sum() / n_seq, seq_region.sum() / n_seq
        cispo_mean = seq_cispo.sum() / n_seq
    else:
        low_mean, high_mean = rows["low_sum"].sum() / total, rows["high_sum"].sum() / total
        region_mean, cispo_mean = rows["region_sum"].sum() / total, rows["cispo_sum"].sum() / total
        seq_low = rows["low_sum"] / count  # NaN for empty rows, as TRL (skipped by nanmin)
        seq_high = rows["high_sum"] / count
    candidates = {
        "clip_ratio/low_mean": lambda: low_mean, "clip_ratio/high_mean": lambda: high_mean,
        "clip_ratio/region_mean": lambda: region_mean, "clip_ratio/low_min": lambda: nanmin(seq_low),
        "clip_ratio/high_max": lambda: nanmax(seq_high), "cispo_clip_ratio": lambda: cispo_mean,
        "vespo/phi_seq_mean": lambda: phi_seq.sum() / n_seq,
    }  # fmt: skip
    metrics.update({name: candidates[name]() for name in row.metrics})
    return metrics


class GRPOLoss(nn.Module):
    """``nn.Module`` wrapper of ``grpo_loss``: configuration at construction, tensors in
    ``forward``; keyword arguments of ``forward`` override the configuration for one call."""

    def __init__(self, **config):
        super().__init__()
        options = dict(config)
        policy_loss_type(typed_value("config", PolicyConfig, options.pop("config", None), options).loss_type)
        self.config = dict(config)

    def forward(self, logp, old_logp, ref_logp, advantages, mask, **overrides):
        return grpo_loss(logp, old_logp, ref_logp, advantages, mask, **{**self.config, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
