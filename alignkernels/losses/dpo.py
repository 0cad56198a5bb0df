"""DPO and its variants on sequence log-probs, with the semantics of the installed TRL (1.16)
``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``), loss type by loss type.

Inputs are summed completion log-probs per sequence (``[B]`` each for policy/reference x
chosen/rejected). Everything is cheap ``[B]`` math, computed in fp32 (fp64 for fp64 inputs), so
one PyTorch implementation serves every device; the expensive part (per-token log-probs from
hidden states) lives in ``linear_logprobs`` and the fused wrappers feed this module through
:func:`dpo_loss_from_token_logps`.

With ``rc = π_c − ref_c`` and ``rr = π_r − ref_r`` (log-ratios), TRL first maps them through the
f-divergence's f'(·) ("scores" s_c, s_r; identity for reverse KL), then ``Δ = s_c − s_r`` and:

    sigmoid       −logσ(βΔ);  cdpo=True: −(1−ε)logσ(βΔ) − ε logσ(−βΔ)     (cDPO, OpenRLHF DPOLoss)
    hinge         relu(1 − βΔ)
    ipo           (s_c/|c| − s_r/|r| − 1/(2β))²                        (lengths clamp ≥ 1)
    exo_pair      σ(βΔ)(logσ(βΔ) − log(1−ε)) + σ(−βΔ)(logσ(−βΔ) − log ε)   (ε = label_smoothing > 0)
    nca_pair      −logσ(β rc) − ½logσ(−β rc) − ½logσ(−β rr)
    robust        [−(1−ε)logσ(βΔ) + ε logσ(−βΔ)] / (1 − 2ε)
    bco_pair      −logσ(β rc) − logσ(−β rr)
    sppo_hard     (rc − 1/(2β))² + (rr + 1/(2β))²
    aot           δ = sort(π_c − π_r) − sort(ref_c − ref_r);  −(1−ε)logσ(βδ) − ε logσ(−βδ)
    aot_unpaired  δ = sort(rc) − sort(rr);                     same smoothed form
    apo_zero      1 − σ(β rc) + σ(β rr)
    apo_down      σ(β rc) + 1 − σ(β (rc − rr))
    discopop      L = βΔ:  −logσ(L)·(1 − σ(L/τ)) + e^(−L)·σ(L/τ)
    sft           −Σ chosen token log-probs / Σ chosen tokens    (one number, same for every pair)
    sigmoid_norm  −logσ(β (s_c/|c| − s_r/|r|))

Several types combine as ``Σ_k w_k · mean_b loss_k[b]`` (``loss_weights``, default 1 each). WPO
(``use_weighting``) multiplies every per-pair loss by ``w_c·w_r`` with ``w = exp(mean over the
completion of (log π(y_t) − log Σ_v π(v)²))``, treated as a constant.

Differences from TRL, all on inputs where TRL returns NaN or divides by zero: ``sft`` with no
chosen token gives 0 (TRL: mean of an empty tensor); ``robust`` with ``label_smoothing == 0.5``
raises instead of dividing by zero.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import check_same_device, check_tensor
from ..ops.gather import sequence_logprobs
from .validation import check_length_tensor, check_number

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: only losses built on the chosen-minus-rejected score difference have an f-DPO form.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
LENGTH_LOSS_TYPES = ("ipo", "sigmoid_norm", "sft")  # need chosen_lengths (and rejected for ipo/sigmoid_norm)
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")

# exp() argument clamp in the alpha-divergence scores (TRL's table for float32/bfloat16; fp64 too)
_ALPHA_CLAMP_MAX = {torch.float32: 80.0, torch.float64: 80.0}


def _compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------
# The math (one place; every entry point calls these)
# --------------------------------------------------------------------------------------------
def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, f_alpha_divergence_coef: float):
    """f'(π/ref) expressed through the log-ratio, as TRL's DPOTrainer computes it."""
    if f_divergence_type == "reverse_kl":  # f'(t) = log t (+1, cancels)
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t/(t+1)) = log 2 + logσ(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(α-1) - 1)/(α-1)
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # limit α -> 1 is log t
            return logratios
        t = torch.clamp((alpha - 1.0) * logratios, max=_ALPHA_CLAMP_MAX[logratios.dtype])
        return (torch.exp(t) - 1.0) * (1.0 / (alpha - 1.0))
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")


def _smoothed_sigmoid_loss(x, beta, eps):
    return -F.logsigmoid(beta * x) * (1 - eps) - F.logsigmoid(-beta * x) * eps


def dpo_per_pair_losses(
    loss_type: str,
    *,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_scores,
    rejected_scores,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    chosen_lengths=None,
    rejected_lengths=None,
    sft_chosen_logps=None,
    cdpo: bool = False,
):
    """``[B]`` loss of one DPO loss type (TRL ``DPOTrainer._compute_loss``, the ``for loss_type``
    loop body; ``cdpo``: ``sigmoid`` smoothed by ``label_smoothing`` as OpenRLHF ``DPOLoss``). All
    tensors already in the compute dtype; lengths as floats."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return _smoothed_sigmoid_loss(delta, beta, label_smoothing) if cdpo else -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        # KL(softmax(βΔ, 0) || [1-ε, ε]) expanded; ε > 0 is checked by the caller
        eps = label_smoothing
        return torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - math.log1p(-eps)) + torch.sigmoid(
            -beta * delta
        ) * (F.logsigmoid(-beta * delta) - math.log(eps))
    if loss_type == "nca_pair":
        c, r = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "robust":
        eps = label_smoothing
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot":
        policy_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
        ref_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
        return _smoothed_sigmoid_loss(policy_sorted - ref_sorted, beta, label_smoothing)
    if loss_type == "aot_unpaired":
        chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
        return _smoothed_sigmoid_loss(chosen_sorted - rejected_sorted, beta, label_smoothing)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        margin = chosen_logratios - rejected_logratios
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * margin))
    if loss_type == "discopop":
        logits = delta * beta
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sft":
        # mean NLL over every chosen completion token of the batch; no token -> 0 (TRL: NaN)
        nll = -sft_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1.0)
        return nll.expand(chosen_logps.shape[0])
    if loss_type == "sigmoid_norm":
        delta_norm = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
        return -F.logsigmoid(beta * delta_norm)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid loss types: {list(DPO_LOSS_TYPES)}")


def wpo_pair_weights(
    chosen_logps, rejected_logps, chosen_log_sum_sq_probs, rejected_log_sum_sq_probs, chosen_lengths, rejected_lengths
):
    """WPO weight per pair (Eq. 2 of the WPO paper, TRL ``use_weighting``), no gradient:
    ``exp((Σ_t log π(y_t) − Σ_t log Σ_v π(v)²)/|y|)`` for chosen times the same for rejected.
    Inputs are masked sums over the completion (``[B]``) and token counts (clamped ≥ 1)."""
    with torch.no_grad():
        w_c = torch.exp((chosen_logps - chosen_log_sum_sq_probs) / chosen_lengths.clamp(min=1))
        w_r = torch.exp((rejected_logps - rejected_log_sum_sq_probs) / rejected_lengths.clamp(min=1))
        return w_c * w_r


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _normalize_loss_types(loss_type, loss_weights):
    if isinstance(loss_type, str):
        loss_types = [loss_type]
    elif isinstance(loss_type, Sequence) and loss_type and all(isinstance(t, str) for t in loss_type):
        loss_types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a string or a non-empty list of strings, got {loss_type!r}")
    unknown = [t for t in loss_types if t not in DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown DPO loss_type {unknown[0]!r}; valid loss types: {list(DPO_LOSS_TYPES)}")
    if loss_weights is None:
        weights = [1.0] * len(loss_types)
    else:
        weights = [check_number("loss_weights", w) for w in loss_weights]
        if len(weights) != len(loss_types):
            raise ValueError(
                f"loss_weights must have one weight per loss type: got {len(weights)} weights for "
                f"{len(loss_types)} loss types {loss_types}"
            )
    return loss_types, weights


def _check_config(
    loss_types, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, use_weighting,
    cdpo=False,
):
    beta = check_number("beta", beta)
    if not beta > 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {loss_types}. Use f_divergence_type='reverse_kl' with these."
        )
    label_smoothing = check_number("label_smoothing", label_smoothing)
    if not isinstance(cdpo, bool):
        raise TypeError(f"cdpo must be a bool, got {type(cdpo).__name__} {cdpo!r}")
    if cdpo and "sigmoid" not in loss_types:
        raise ValueError(f"cdpo=True smooths loss_type 'sigmoid' (cDPO); it is not among {loss_types}")
    if cdpo and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing (cDPO's label-flip probability) must be in [0, 1], got {label_smoothing}")
    if "exo_pair" in loss_types and not (0.0 < label_smoothing < 1.0):
        raise ValueError(
            f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {label_smoothing}"
        )
    if "robust" in loss_types:
        if label_smoothing == 0.5:
            raise ValueError("loss_type 'robust' divides by (1 - 2*label_smoothing): label_smoothing must not be 0.5")
        if not 0.0 <= label_smoothing < 0.5:
            warnings.warn(
                f"label_smoothing should lie in [0.0, 0.5) for the 'robust' loss, got {label_smoothing}", stacklevel=3
            )
    discopop_tau = check_number("discopop_tau", discopop_tau)
    f_alpha_divergence_coef = check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if "discopop" in loss_types and not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if use_weighting and any(t in SORTING_LOSS_TYPES for t in loss_types):
        raise ValueError(
            "WPO weighting (use_weighting / pair_weights) is not supported with 'aot' or 'aot_unpaired': those "
            "losses sort the batch, which would misalign the per-pair weights (TRL raises too)."
        )
    return beta, label_smoothing, float(f_alpha_divergence_coef), float(discopop_tau)


def _check_seq(name, t, shape, device):
    check_tensor(name, t, floating=True)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B] (one summed log-prob per sequence), got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} like policy_chosen_logps, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like policy_chosen_logps")


def _check_lengths(name, t, shape, device, cd, check_values):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token counts [B], got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if check_values:  # a negative count flips the sign of ipo / sigmoid_norm / sft / WPO terms
        check_length_tensor(name, t)
    elif t.dtype == torch.bool:
        raise TypeError(f"{name} must hold token counts (an integer or float tensor), got {t.dtype}")
    return t.detach().to(cd)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    use_weighting: bool = False,
    chosen_log_sum_sq_probs: torch.Tensor | None = None,
    rejected_log_sum_sq_probs: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
    validate_lengths: bool = True,
    cdpo: bool = False,
):
    """DPO-family preference loss on summed sequence log-probs, exactly as TRL 1.16's DPOTrainer.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs under the
            policy (differentiable; any float dtype, math runs in fp32 / fp64).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference model
            (treated like any input: detach them yourself if they carry a graph).
        beta: β (> 0); for ``ipo`` it is the regulariser τ.
        loss_type: one of ``DPO_LOSS_TYPES`` or a list of them (combined with ``loss_weights``).
        loss_weights: one float per loss type (default 1.0 each): ``loss = Σ_k w_k · mean(loss_k)``.
        label_smoothing: ε of ``robust`` (flip probability, in [0, 0.5)), ``exo_pair`` (> 0),
            ``aot`` and ``aot_unpaired``. Other types ignore it (as in TRL 1.16, ``sigmoid`` too,
            unless ``cdpo``).
        f_divergence_type: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence``,
            ``alpha_divergence`` (f-DPO); only for the types in ``F_DIVERGENCE_LOSS_TYPES``.
        f_alpha_divergence_coef: α of ``alpha_divergence`` (TRL default 0.5).
        discopop_tau: τ of ``discopop``.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts. Required by ``ipo`` and
            ``sigmoid_norm`` (both), ``sft`` and ``use_weighting`` (``sft``: chosen only).
        use_weighting: WPO weighting; needs ``chosen_log_sum_sq_probs`` / ``rejected_log_sum_sq_probs``
            (``[B]`` masked sums over the completion of ``log Σ_v π(v)²``, e.g. from
            ``linear_logprobs(..., return_stats=True).log_sum_sq_probs``) and both lengths; the
            policy sums must then be plain (not LD-weighted) sums. Or pass ``pair_weights``.
        pair_weights: ``[B]`` precomputed per-pair weights (e.g. :func:`wpo_pair_weights`)
            multiplying every per-pair loss, used as constants. Overrides ``use_weighting``'s computation.
        sft_chosen_logps: ``[B]`` plain summed chosen log-probs for ``sft`` when the policy sums
            carry LD-DPO weighting (default: ``policy_chosen_logps``).
        validate_lengths: check that the lengths are counts ``>= 0`` (one host sync); callers
            that computed them from masks pass False.
        cdpo: conservative DPO (opt-in; TRL 1.16 has no such option): ``sigmoid`` becomes
            ``−(1−ε)logσ(βΔ) − ε logσ(−βΔ)`` with ``ε = label_smoothing`` in [0, 1], as OpenRLHF's
            ``DPOLoss(beta, label_smoothing)`` and the cDPO note (Mitchell, 2023).

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-dim fp32 (fp64 for fp64 inputs) tensor; ``metrics``
        maps TRL's logged names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected``) to detached 0-dim tensors (no
        host sync), with rewards ``β · (π − ref)``.
    """
    loss_types, weights = _normalize_loss_types(loss_type, loss_weights)
    weighting = bool(use_weighting) or pair_weights is not None
    beta, label_smoothing, f_alpha, tau = _check_config(
        loss_types, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, weighting, cdpo
    )
    _check_seq("policy_chosen_logps", policy_chosen_logps, None, None)
    shape, device = tuple(policy_chosen_logps.shape), policy_chosen_logps.device
    if shape[0] == 0:
        raise ValueError("dpo_loss needs at least one preference pair (B >= 1)")
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        _check_seq(name, t, shape, device)
    cd = _compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc, pr = policy_chosen_logps.to(cd), policy_rejected_logps.to(cd)
    rc, rr = ref_chosen_logps.to(cd), ref_rejected_logps.to(cd)

    wpo_needs = ["use_weighting"] if use_weighting and pair_weights is None else []
    for name, t, users in (
        ("chosen_lengths", chosen_lengths, [x for x in loss_types if x in LENGTH_LOSS_TYPES] + wpo_needs),
        ("rejected_lengths", rejected_lengths, [x for x in loss_types if x in ("ipo", "sigmoid_norm")] + wpo_needs),
    ):
        if users and t is None:
            raise ValueError(f"{name} ([B] completion token counts) is required by {users}")
    clen = rlen = None
    if chosen_lengths is not None:
        clen = _check_lengths("chosen_lengths", chosen_lengths, shape, device, cd, validate_lengths)
    if rejected_lengths is not None:
        rlen = _check_lengths("rejected_lengths", rejected_lengths, shape, device, cd, validate_lengths)

    sft_pc = pc
    if sft_chosen_logps is not None:
        _check_seq("sft_chosen_logps", sft_chosen_logps, shape, device)
        sft_pc = sft_chosen_logps.to(cd)

    if pair_weights is not None:
        _check_seq("pair_weights", pair_weights, shape, device)
        pw = pair_weights.detach().to(cd)
    elif use_weighting:
        if chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
            raise ValueError(
                "use_weighting=True needs chosen_log_sum_sq_probs and rejected_log_sum_sq_probs ([B] masked sums of "
                "log Σ p² over the completion), or precomputed pair_weights"
            )
        _check_seq("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs, shape, device)
        _check_seq("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs, shape, device)
        pw = wpo_pair_weights(pc, pr, chosen_log_sum_sq_probs.to(cd), rejected_log_sum_sq_probs.to(cd), clen, rlen)
    else:
        pw = None

    chosen_scores = f_divergence_scores(pc - rc, f_divergence_type, f_alpha)
    rejected_scores = f_divergence_scores(pr - rr, f_divergence_type, f_alpha)
    loss = torch.zeros((), dtype=cd, device=device)
    for lt, w in zip(loss_types, weights):
        per_pair = dpo_per_pair_losses(
            lt,
            chosen_logps=pc,
            rejected_logps=pr,
            ref_chosen_logps=rc,
            ref_rejected_logps=rr,
            chosen_scores=chosen_scores,
            rejected_scores=rejected_scores,
            beta=beta,
            label_smoothing=label_smoothing,
            discopop_tau=tau,
            chosen_lengths=clen,
            rejected_lengths=rlen,
            sft_chosen_logps=sft_pc,
            cdpo=cdpo,
        )
        if pw is not None:
            per_pair = per_pair * pw
        loss = loss + per_pair.mean() * w
    return loss, dpo_metrics(pc, pr, rc, rr, beta)


def dpo_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRL DPOTrainer's logged reward metrics (single process: the gathered mean is the mean)."""
    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }


def _ld_weighted_sums(token_logps, mask, shared_lengths, ld_alpha, cd):
    """LD-DPO sums (TRL ``_compute_loss`` with ``ld_alpha``): the first ``shared_lengths``
    completion tokens count fully, the tail beyond the shorter response counts ``ld_alpha``."""
    x = torch.where(mask, token_logps.to(cd), torch.zeros((), dtype=cd, device=token_logps.device))
    position = mask.to(torch.int64).cumsum(dim=-1)  # 1-based index among completion tokens
    in_tail = position > shared_lengths.unsqueeze(-1)
    shared = torch.where(in_tail, 0.0, x).sum(-1)
    tail = torch.where(in_tail, x, 0.0).sum(-1)
    return shared + ld_alpha * tail


def dpo_loss_from_token_logps(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    ld_alpha: float | None = None,
    chosen_log_sum_sq_probs: torch.Tensor | None = None,
    rejected_log_sum_sq_probs: torch.Tensor | None = None,
    chosen_entropy: torch.Tensor | None = None,
    rejected_entropy: torch.Tensor | None = None,
    chosen_mean_logits: torch.Tensor | None = None,
    rejected_mean_logits: torch.Tensor | None = None,
    chosen_is_top1: torch.Tensor | None = None,
    **kwargs,
):
    """:func:`dpo_loss` from per-token log-probs: does the sequence sums, lengths, LD-DPO
    weighting (``ld_alpha``), ``sft`` token mean and WPO weights the way TRL's trainer does.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B, Tc]`` / ``[B, Tr]`` per-token log-probs
            of the completion tokens (aligned with the masks: TRL's ``shift_completion_mask``).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` (precomputed sums, already LD-weighted if
            ``ld_alpha`` is used) or per-token ``[B, Tc]`` / ``[B, Tr]`` (summed here like the policy).
        chosen_mask, rejected_mask: ``[B, Tc]`` / ``[B, Tr]``, non-zero = completion token. Their
            row sums are the token counts of ``ipo`` / ``sigmoid_norm`` / ``sft`` / WPO unless
            ``chosen_lengths`` / ``rejected_lengths`` are passed explicitly.
        ld_alpha: LD-DPO α in [0, 1]: tokens past the shorter response's length count α.
        chosen_log_sum_sq_probs, rejected_log_sum_sq_probs: per-token ``log Σ_v π(v)²`` (``[B, T]``)
            for WPO; needed when ``use_weighting=True``.
        chosen_entropy, rejected_entropy, chosen_mean_logits, rejected_mean_logits, chosen_is_top1:
            optional per-token statistics (``[B, T]``, e.g. ``linear_logprobs(..., return_stats=True)``)
            for TRL's token metrics: ``entropy`` (both entropies), ``logits/chosen``,
            ``logits/rejected``, ``mean_token_accuracy`` (masked means; 0 when no token).
        **kwargs: forwarded to :func:`dpo_loss` (beta, loss_type, loss_weights, ...).

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss` (plus the token metrics above when their inputs
        are given). Masked positions get exactly zero gradient.
    """
    for name, t in (("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)):
        check_tensor(name, t, floating=True)
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T] per-token log-probs, got shape {tuple(t.shape)}")
    for name, t, ref in (
        ("chosen_mask", chosen_mask, policy_chosen_logps),
        ("rejected_mask", rejected_mask, policy_rejected_logps),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape {tuple(ref.shape)}, got {got}")
    check_same_device(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        chosen_mask=chosen_mask, rejected_mask=rejected_mask,
    )  # fmt: skip
    if policy_chosen_logps.shape[0] != policy_rejected_logps.shape[0]:
        raise ValueError(
            f"chosen and rejected batches differ: {policy_chosen_logps.shape[0]} vs {policy_rejected_logps.shape[0]}"
        )
    cmask, rmask = chosen_mask != 0, rejected_mask != 0
    cd = _compute_dtype(policy_chosen_logps, policy_rejected_logps)
    clen, rlen = cmask.sum(-1), rmask.sum(-1)
    plain_c = sequence_logprobs(policy_chosen_logps, cmask).to(cd)
    plain_r = sequence_logprobs(policy_rejected_logps, rmask).to(cd)

    def ref_sum(name, ref, mask, shared):
        check_tensor(name, ref, floating=True)
        if ref.dim() == 1:
            return ref
        if tuple(ref.shape) != tuple(mask.shape):
            raise ValueError(f"{name} must be [B] sums or per-token {tuple(mask.shape)}, got {tuple(ref.shape)}")
        if shared is None:
            return sequence_logprobs(ref, mask)
        return _ld_weighted_sums(ref, mask, shared, ld_alpha, _compute_dtype(ref))

    if ld_alpha is None:
        pc, pr, shared = plain_c, plain_r, None
    else:
        ld_alpha = check_number("ld_alpha", ld_alpha)
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
        shared = torch.minimum(clen, rlen)
        pc = _ld_weighted_sums(policy_chosen_logps, cmask, shared, ld_alpha, cd)
        pr = _ld_weighted_sums(policy_rejected_logps, rmask, shared, ld_alpha, cd)
    rc = ref_sum("ref_chosen_logps", ref_chosen_logps, cmask, shared)
    rr = ref_sum("ref_rejected_logps", ref_rejected_logps, rmask, shared)

    pair_weights = kwargs.pop("pair_weights", None)
    if kwargs.get("use_weighting") and pair_weights is None:
        if chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
            raise ValueError("use_weighting=True needs chosen_log_sum_sq_probs and rejected_log_sum_sq_probs [B, T]")
        pair_weights = wpo_pair_weights(
            plain_c, plain_r,
            sequence_logprobs(chosen_log_sum_sq_probs.detach(), cmask).to(cd),
            sequence_logprobs(rejected_log_sum_sq_probs.detach(), rmask).to(cd),
            clen.to(cd), rlen.to(cd),
        )  # fmt: skip
    # Token counts default to the masks' sums. TRL's ipo / sigmoid_norm count the unshifted
    # completion mask, equal to this except for an empty prompt: pass the counts to override.
    user_lengths = "chosen_lengths" in kwargs or "rejected_lengths" in kwargs
    loss, metrics = dpo_loss(
        pc, pr, rc, rr,
        chosen_lengths=kwargs.pop("chosen_lengths", clen), rejected_lengths=kwargs.pop("rejected_lengths", rlen),
        sft_chosen_logps=plain_c, pair_weights=pair_weights, validate_lengths=user_lengths,
        **kwargs,
    )  # fmt: skip
    metrics.update(
        dpo_token_metrics(
            cmask, rmask, chosen_entropy=chosen_entropy, rejected_entropy=rejected_entropy,
            chosen_mean_logits=chosen_mean_logits, rejected_mean_logits=rejected_mean_logits,
            chosen_is_top1=chosen_is_top1,
        )
    )  # fmt: skip
    return loss, metrics


def _masked_mean(values, mask):
    """Mean of ``values`` over ``mask`` (one or several (values, mask) pairs), 0 with no token; no host sync."""
    pairs = values if isinstance(values, list) else [(values, mask)]
    total = sum(torch.where(m, v.detach().float(), 0.0).sum() for v, m in pairs)
    count = sum(m.sum() for _, m in pairs)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def dpo_token_metrics(chosen_mask, rejected_mask, *, chosen_entropy=None, rejected_entropy=None,
                      chosen_mean_logits=None, rejected_mean_logits=None, chosen_is_top1=None):  # fmt: skip
    """TRL DPOTrainer's per-token metrics (``entropy``, ``logits/chosen``, ``logits/rejected``,
    ``mean_token_accuracy``) from whichever statistics are given; masks are bool ``[B, T]``."""
    for name, t, mask in (
        ("chosen_entropy", chosen_entropy, chosen_mask),
        ("rejected_entropy", rejected_entropy, rejected_mask),
        ("chosen_mean_logits", chosen_mean_logits, chosen_mask),
        ("rejected_mean_logits", rejected_mean_logits, rejected_mask),
        ("chosen_is_top1", chosen_is_top1, chosen_mask),
    ):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(mask.shape)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a per-token tensor of shape {tuple(mask.shape)}, got {got}")
    metrics = {}
    with torch.no_grad():
        if chosen_entropy is not None and rejected_entropy is not None:
            metrics["entropy"] = _masked_mean([(chosen_entropy, chosen_mask), (rejected_entropy, rejected_mask)], None)
        if chosen_mean_logits is not None:
            metrics["logits/chosen"] = _masked_mean(chosen_mean_logits, chosen_mask)
        if rejected_mean_logits is not None:
            metrics["logits/rejected"] = _masked_mean(rejected_mean_logits, rejected_mask)
        if chosen_is_top1 is not None:
            metrics["mean_token_accuracy"] = _masked_mean(chosen_is_top1.bool(), chosen_mask)
    return metrics


class DPOLoss(nn.Module):
    """``nn.Module`` form of :func:`dpo_loss`: hyper-parameters at construction, tensors at call.

    ``forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    **extra)`` -> ``(loss, metrics)``; ``extra`` takes the per-call inputs (lengths, WPO sums,
    pair_weights, sft_chosen_logps).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        use_weighting: bool = False,
        cdpo: bool = False,
    ):
        super().__init__()
        loss_types, weights = _normalize_loss_types(loss_type, loss_weights)
        _check_config(
            loss_types, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, use_weighting,
            cdpo,
        )
        self.config = dict(
            beta=beta,
            loss_type=loss_types,
            loss_weights=weights,
            label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            use_weighting=use_weighting,
            cdpo=cdpo,
        )

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **extra):
        return dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **self.config, **extra
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
