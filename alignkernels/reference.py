"""Eager PyTorch references: the ground truth of the tests and the "eager" baseline of bench.

These materialise everything (full softmax / log-softmax, full logits) in fp32 (fp64 for fp64
inputs), exactly the way most training code does it today. They are deliberately simple:
read them to know what every fast backend must return.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._utils import output_dtype



def token_logprobs_reference(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log_softmax(logits / T) gathered at ``labels`` (+ entropy of softmax(logits / T)).

    Ignored positions (``labels == ignore_index``) give 0 in both outputs. The softmax is
    shift-invariant, so the logits are centred on their row max before the division: ``x/T`` in
    fp32 would round ``z`` itself (``ulp(1e6) = 0.06`` at offset 1e4 and ``T = 0.01``).
    A row whose logits are all ``-inf`` (``support=`` with no kept token) has no distribution: logp
    ``-inf``, entropy 0, gradient 0 (its log-softmax is taken as ``-inf`` everywhere, never NaN).
    """
    x = logits.to(output_dtype(logits.dtype))
    row_max = x.detach().amax(-1, keepdim=True)
    no_mass = torch.isneginf(row_max)
    z = (x - torch.where(torch.isinf(row_max), 0.0, row_max)) / temperature
    logsm = F.log_softmax(torch.where(no_mass, 0.0, z), dim=-1).masked_fill(no_mass, float("-inf"))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = torch.where(valid, entropy_of_log_softmax(logsm), torch.zeros_like(logp))
    return logp, entropy


def entropy_of_log_softmax(logsm):
    """``H = -Σ p·log p`` over the last dim from log-probabilities, with ``0·log 0 := 0``: a ``-inf``
    logit (a masked vocabulary entry) has probability 0 and adds nothing (``p·logsm`` would be NaN)."""
    return -(logsm.exp() * logsm.masked_fill(logsm == float("-inf"), 0.0)).sum(-1)


def transform_logits(logits, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """The logit transform every backend applies, in this order:
    ``z = logit_scale * logits``; ``z = softcap * tanh(z / softcap)`` (Gemma); ``z = z / T``."""
    z = logits * logit_scale if logit_scale != 1.0 else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


def linear_logprobs_reference(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
):
    """Materialise ``logits = hidden @ weight.T (+ bias)`` in fp32, transform, then log-softmax."""
    cd = output_dtype(hidden.dtype)
    logits = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        logits = logits + bias.to(cd)
    z = transform_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=1.0)
    return token_logprobs_reference(
        z, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


def linear_logprobs_stats_reference(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
):
    """Materialised ``linear_logprobs(..., return_stats=True)``: returns the tuple
    ``(logp, entropy, log_sum_sq_probs, mean_logit, is_top1, lse)`` (TRL's definitions:
    ``log Σ p²``, ``Σ_v z_v / V``, ``argmax(z) == label`` with first-argmax ties -- False in a row
    whose logp is NaN --, ``logsumexp(z)``).
    Ignored positions give 0 (``False`` for ``is_top1``); ``logp`` and ``entropy`` carry autograd."""
    cd = output_dtype(hidden.dtype)
    logits = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        logits = logits + bias.to(cd)
    z = transform_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    # a row whose logits are all -inf has no distribution: logp -inf, entropy 0, log Σp² -inf, lse -inf,
    # gradient 0 (its logits are replaced by zeros before logsumexp, whose backward would be NaN there)
    no_mass = torch.isneginf(z.detach().amax(-1, keepdim=True))
    z_safe = torch.where(no_mass, 0.0, z)
    lse = torch.logsumexp(z_safe, dim=-1)
    logsm = torch.where(no_mass, float("-inf"), z_safe - lse.unsqueeze(-1))
    lse = torch.where(no_mass.squeeze(-1), float("-inf"), lse)
    p = logsm.exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    entropy = torch.where(valid, entropy_of_log_softmax(logsm), zero)
    log_sum_sq_probs = torch.where(valid, (p * p).sum(-1).log(), zero).detach()
    mean_logit = torch.where(valid, z.mean(-1), zero).detach()
    is_top1 = (z.argmax(-1) == safe) & valid & ~logp.isnan()  # a NaN / +inf row: NaN logp, never top-1
    return logp, entropy, log_sum_sq_probs, mean_logit, is_top1, torch.where(valid, lse, zero).detach()


# ============================================================================================
# GRPO / PPO references (appended by the GRPO/PPO engineer)
# ============================================================================================
def _mean_std(values):
    """Mean and Bessel-corrected sample std of a list of floats (NaN where undefined)."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def group_advantages_reference(rewards_per_func, num_generations, scale_rewards="group", reward_weights=None,
                               multi_objective_aggregation="sum_then_normalize"):
    """Group-relative advantages from the formulas, one completion at a time in Python floats
    (fp64), with TRL 1.16's rules (``GRPOTrainer._generate_and_score_completions``): a NaN reward
    is "not scored" and left out of sums, means and stds; a completion no function scored gets
    advantage 0; std is the sample std, the divisor ``std + 1e-4``; a group (or batch) of one
    has std 0, fewer than two scored values std NaN (so those advantages become 0).

    ``sum_then_normalize``: ``s_i = Σ_k w_k r_ik`` over scored k; ``A_i = (s_i - mean_g(s)) /
    (std + 1e-4)`` with the std of the group (``"group"``), of the batch (``"batch"``) or no
    division (``"none"``). ``normalize_then_sum`` (GDPO): ``z_ik = (r_ik - mean_gk) / (std_gk +
    1e-4)`` per function within the group, ``s_i = Σ_k w_k z_ik`` over defined z, then
    ``A_i = (s_i - mean(s)) / (std(s) + 1e-4)`` over the batch. ``rewards_per_func`` is ``[B, K]``."""
    rows = rewards_per_func.double().tolist()
    B, K, G = len(rows), len(rows[0]), num_generations
    weights = [1.0] * K if reward_weights is None else [float(w) for w in reward_weights]
    scored = [any(not math.isnan(r) for r in row) for row in rows]
    groups = [range(start, start + G) for start in range(0, B, G)]

    def present(values):
        return [v for v in values if not math.isnan(v)]

    advantages = [math.nan] * B
    if multi_objective_aggregation == "sum_then_normalize":
        sums = [sum(w * r for w, r in zip(weights, row) if not math.isnan(r)) if ok else math.nan
                for row, ok in zip(rows, scored)]  # fmt: skip
        _, batch_std = _mean_std(present(sums))
        for group in groups:
            mean, std = _mean_std(present([sums[i] for i in group]))
            if G == 1:
                std = 0.0
            if scale_rewards == "batch":
                std = batch_std if B > 1 else 0.0
            for i in group:
                centred = sums[i] - mean
                advantages[i] = centred if scale_rewards == "none" else centred / (std + 1e-4)
    else:
        z = [[math.nan] * K for _ in range(B)]
        for group in groups:
            for k in range(K):
                mean, std = _mean_std(present([rows[i][k] for i in group]))
                if G == 1:
                    std = 0.0
                for i in group:
                    z[i][k] = (rows[i][k] - mean) / (std + 1e-4)
        sums = [sum(w * v for w, v in zip(weights, zi) if not math.isnan(v)) if ok else math.nan
                for zi, ok in zip(z, scored)]  # fmt: skip
        mean, std = _mean_std(present(sums))
        if B == 1:
            std = 0.0
        advantages = [(s - mean) / (std + 1e-4) for s in sums]
    out = torch.tensor([0.0 if math.isnan(a) else a for a in advantages], dtype=torch.float64)
    return out.to(output_dtype(rewards_per_func.dtype))


def gae_reference(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """GAE as a Python loop over time: verl ``core_algos.compute_gae_advantage_return`` (masked
    positions skipped), outputs zeroed at masked positions. fp32 (fp64 for fp64 inputs)."""
    cd = output_dtype(torch.promote_types(rewards.dtype, values.dtype))
    r, v = rewards.to(cd), values.to(cd)
    m = (mask != 0).to(cd)
    nextvalues = r.new_zeros(r.shape[0])
    lastgaelam = r.new_zeros(r.shape[0])
    advantages_reversed = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = v[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    adv = torch.stack(advantages_reversed[::-1], dim=1) if advantages_reversed else torch.zeros_like(r)
    return adv * m, (adv + v) * m


def trl_ppo_rollout_reference(logprobs, ref_logprobs, values, scores, sequence_lengths, *, kl_coef=0.05,
                              kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95):
    """TRL 0.x ``PPOTrainer.train`` rollout post-processing, line by line (masks from
    ``sequence_lengths`` = index of the last response token; steps 4-6: KL rewards, score at
    ``sequence_lengths_p1``, optional reward whitening, GAE loop, advantage whitening).
    Returns ``(rewards, advantages, returns, padding_mask, padding_mask_p1)``."""
    INVALID_LOGPROB = 1.0

    def masked_mean(values, mask, axis=None):
        if axis is not None:
            return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
        return (values * mask).sum() / mask.sum()

    def masked_var(values, mask, unbiased=True):
        mean = masked_mean(values, mask)
        variance = masked_mean((values - mean) ** 2, mask)
        if unbiased:
            mask_sum = mask.sum()
            variance = variance * (mask_sum / (mask_sum - 1))
        return variance

    def masked_whiten(values, mask, shift_mean=True):
        mean, var = masked_mean(values, mask), masked_var(values, mask)
        whitened = (values - mean) * torch.rsqrt(var + 1e-8)
        if not shift_mean:
            whitened += mean
        return whitened

    response_idxs = torch.arange(logprobs.shape[1], device=logprobs.device).repeat(logprobs.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[(actual_start, actual_end)] += scores  # TRL indexes with a list; a tuple is the same
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = logprobs.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return rewards, advantages, returns, padding_mask, padding_mask_p1


def trl_ppo_loss_reference(new_logprobs, mb_logprobs, mb_advantage, padding_mask, vpred, mb_values, mb_return,
                           padding_mask_p1, *, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1):
    """TRL 0.x ``PPOTrainer.train`` minibatch loss, line by line (padded log-probs are
    ``INVALID_LOGPROB``, padded values 0). Returns ``(loss, stats)``."""
    INVALID_LOGPROB = 1.0

    def masked_mean(values, mask):
        return (values * mask).sum() / mask.sum()

    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    mb_logprobs = torch.masked_fill(mb_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask)
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
        approxkl = 0.5 * (logprobs_diff**2).mean()
    stats = {
        "policy/approxkl_avg": approxkl,
        "policy/clipfrac_avg": pg_clipfrac,
        "loss/policy_avg": pg_loss.detach(),
        "loss/value_avg": vf_loss.detach(),
        "val/clipfrac_avg": vf_clipfrac,
        "val/ratio": ratio.mean().detach(),
    }
    return loss, stats


# --------------------------------------------------------------------------------------------
# Sequence pooling (gather_last / last_token_index / sequence_logprobs): plain loops, row by row
# --------------------------------------------------------------------------------------------
def last_token_index_reference(valid_rows):
    """Loop over rows: the rightmost position where the row is truthy, 0 if none
    (``transformers`` ``GenericForSequenceClassification``: argmax of ``arange * non_pad``)."""
    out = []
    for row in valid_rows.tolist():
        last = 0
        for t, v in enumerate(row):
            if v:
                last = t
        out.append(last)
    return torch.tensor(out, dtype=torch.int64)


def gather_last_reference(x, valid_rows=None, cu_seqlens=None):
    """Loop over rows (padded ``x[B, T, ...]`` + ``valid_rows[B, T]``) or over packed sequences
    (``x[N, ...]`` + ``cu_seqlens``; an empty sequence reads its start, clamped into range)."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        n = x.shape[0]
        rows = []
        for s in range(len(cu) - 1):
            idx = cu[s + 1] - 1 if cu[s + 1] > cu[s] else cu[s]
            rows.append(x[min(max(idx, 0), n - 1)])
        return torch.stack(rows) if rows else x[:0]
    index = last_token_index_reference(valid_rows)
    return torch.stack([x[b, int(index[b])] for b in range(x.shape[0])])


def sequence_logprobs_reference(logp, mask, average=False):
    """Loop over rows: sum (or mean) of ``logp`` where ``mask`` is non-zero; empty rows give 0."""
    flat_logp = logp.reshape(-1, logp.shape[-1]).double()
    flat_mask = mask.reshape(-1, mask.shape[-1]) != 0
    out = []
    for lp, m in zip(flat_logp, flat_mask):
        total = sum((float(v) for v, keep in zip(lp.tolist(), m.tolist()) if keep), 0.0)
        count = int(m.sum())
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64).reshape(logp.shape[:-1])


# --------------------------------------------------------------------------------------------
# Process reward models (gather_steps / prm_loss / aggregate_step_scores): loops and the eager
# per-token head that transformers' AutoModelForTokenClassification + TRL's PRM trainer run
# --------------------------------------------------------------------------------------------
def step_positions_reference(step_flags, cu_seqlens=None):
    """Loop: ``[(seq, token_in_seq, flat_index), ...]`` of the non-zero flags, row-major.
    Padded: ``step_flags[B, T]``; packed: ``step_flags[N]`` + ``cu_seqlens`` (tokens outside
    ``[cu[0], cu[-1])`` are not steps)."""
    out = []
    if cu_seqlens is None:
        rows = step_flags.tolist()
        T = len(rows[0]) if rows else 0
        for b, row in enumerate(rows):
            for t, v in enumerate(row):
                if v:
                    out.append((b, t, b * T + t))
        return out
    flags = step_flags.reshape(-1).tolist()
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        for n in range(cu[s], cu[s + 1]):
            if flags[n]:
                out.append((s, n - cu[s], n))
    return out


def token_classification_loss_reference(hidden, weight, bias, labels, ignore_index=-100):
    """Eager per-token head + loss, as ``transformers``' ``GenericForTokenClassification`` with
    ``ForTokenClassification`` (what TRL's PRM trainer optimises): ``[B, T, K]`` logits for every
    token, upcast to fp32, mean cross-entropy over labels != ignore_index (NaN if there are none)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    K = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, K).float(), labels.reshape(-1), ignore_index=ignore_index
    )


def aggregate_step_scores_reference(scores_per_sequence, how="min", empty_value=0.0):
    """Loop over sequences: ``scores_per_sequence`` is a list of 1-D lists (steps in order)."""
    out = []
    for steps in scores_per_sequence:
        steps = [float(v) for v in steps]
        if not steps:
            out.append(float(empty_value))
        elif how == "min":
            out.append(min(steps))
        elif how == "max":
            out.append(max(steps))
        elif how == "mean":
            out.append(sum(steps) / len(steps))
        elif how == "sum":
            out.append(sum(steps))
        elif how == "last":
            out.append(steps[-1])
        elif how == "prod":
            p = 1.0
            for v in steps:
                p *= v
            out.append(p)
        else:
            raise ValueError(f"unknown aggregation {how!r}")
    return torch.tensor(out, dtype=torch.float64)
