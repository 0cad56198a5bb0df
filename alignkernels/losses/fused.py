"""Fused-from-hidden-states losses: hidden states + lm_head in, loss + metrics out.

Each is ``linear_logprobs`` (the ``[N, V]`` logits never exist; masked positions cost no FLOPs)
followed by the per-token loss of this package (``dpo_loss_from_token_logps``, ``grpo_loss``,
``ppo_loss``) -- the loss math lives only there. The per-token statistics the trainers log
(entropy, token accuracy, mean logit) come out of the same pass over the vocabulary.

Memory: besides the inputs and their gradients, one logits tile per chunk (see
``linear_logprobs``) and O(B x T) per-token tensors.
"""
from __future__ import annotations

import torch

from ..ops.linear_logprobs import linear_logprobs
from .dpo import dpo_loss_from_token_logps
from .grpo import grpo_loss
from .ppo import ppo_loss



def _masked_labels(labels, mask, ignore_index):
    """Labels with ``ignore_index`` wherever ``mask`` is 0: those rows are skipped by the kernel."""
    if mask is None:
        return labels
    if tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(f"mask must have the shape of labels {tuple(labels.shape)}, got {tuple(mask.shape)}")
    return labels.masked_fill(~mask.bool(), ignore_index)


def _reference_token_logps(ref_hidden, labels, *, weight, ref_weight, ref_bias, head, ignore_index):
    """Per-token log-probs of the reference model from its hidden states (no gradient). Without
    ``ref_weight`` the reference shares the policy's head (weight and bias). A policy's ``lora=``
    adapter is never applied to the reference: it is the base head (PEFT's disabled adapter)."""
    if ref_weight is None:
        ref_weight, ref_bias = weight, head["bias"] if ref_bias is None else ref_bias
    with torch.no_grad():
        kwargs = {k: v for k, v in head.items() if k not in ("bias", "lora")}
        return linear_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, ignore_index=ignore_index, **kwargs)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_labels: bool | None = None,
    lora=None,
    **grpo_kwargs,
):
    """GRPO-family loss straight from the policy's last hidden states.

    ``logp, entropy = linear_logprobs(hidden, weight, completion_ids)`` over the completion
    tokens only, then :func:`alignkernels.grpo_loss` with every TRL knob it takes.

    Args:
        hidden: ``[B, T, H]`` hidden states that predict ``completion_ids`` (already aligned:
            position t predicts token t, i.e. TRL's ``hidden[:, -logits_to_keep-1:-1]``).
        weight: ``[V, H]`` lm_head weight (``bias`` optional).
        completion_ids: ``[B, T]`` sampled tokens.
        advantages: ``[B]`` or ``[B, T]``.
        completion_mask: ``[B, T]``; masked tokens are never projected (no FLOPs) and get no gradient.
        old_logp: ``[B, T]`` sampling-time log-probs; None = on-policy.
        ref_logp: ``[B, T]`` reference log-probs; or give ``ref_hidden`` (``[B, T, H]``, with
            ``ref_weight``/``ref_bias`` defaulting to the policy head) and they are computed here
            without gradient. Needed when ``beta != 0``.
        temperature, logit_scale, softcap: the logit transform (see ``linear_logprobs``).
        lora: ``(lora_A, lora_B, scaling)``, a LoRA adapter on the policy's head (see
            ``linear_logprobs``; never applied to ``ref_hidden``'s reference head).
        **grpo_kwargs: ``beta``, ``epsilon_low``, ``epsilon_high``, ``delta``, ``loss_type``,
            ``importance_sampling_level``, ``max_completion_length``, ``num_items_in_batch``, ...
            exactly as :func:`alignkernels.grpo_loss`.

    Returns:
        ``(loss, metrics)`` from ``grpo_loss`` (its ``entropy`` metric included).
    """
    head = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                chunk_size=chunk_size, backend=backend, check_labels=check_labels, lora=lora)  # fmt: skip
    labels = _masked_labels(completion_ids, completion_mask, ignore_index)
    logp, entropy = linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, return_entropy=True, **head)
    if ref_logp is None and ref_hidden is not None:
        ref_logp = _reference_token_logps(ref_hidden, labels, weight=weight, ref_weight=ref_weight, ref_bias=ref_bias,
                                          head=head, ignore_index=ignore_index)  # fmt: skip
    return grpo_loss(logp, old_logp, ref_logp, advantages, completion_mask, entropy=entropy, **grpo_kwargs)


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_labels: bool | None = None,
    lora=None,
    **dpo_kwargs,
):
    """DPO-family loss straight from the policy's last hidden states of a concatenated batch.

    Layout (TRL's ``concatenated_forward``): the first half of the batch is the chosen
    completions, the second half the rejected ones, same ``T``.

    Args:
        hidden: ``[2B, T, H]`` hidden states aligned with ``labels`` (position t predicts
            ``labels[:, t]``, i.e. already shifted).
        weight: ``[V, H]`` lm_head weight (``bias`` optional).
        labels: ``[2B, T]`` next-token ids, ``ignore_index`` on prompt and padding.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference sums (TRL's
            ``precompute_ref_log_probs``), or ``[B, T]`` per-token. Or give ``ref_hidden``
            (``[2B, T, H]``; ``ref_weight``/``ref_bias`` default to the policy head) and they are
            computed here without gradient.
        lora: ``(lora_A, lora_B, scaling)``, a LoRA adapter on the policy's head (see
            ``linear_logprobs``; never applied to ``ref_hidden``'s reference head).
        **dpo_kwargs: ``beta``, ``loss_type`` (one or a list), ``loss_weights``,
            ``label_smoothing``, ``f_divergence_type``, ``ld_alpha``, ``use_weighting`` (WPO; the
            per-token ``log Σp²`` it needs comes from the same pass), ... exactly as
            :func:`alignkernels.losses.dpo.dpo_loss_from_token_logps` / :func:`alignkernels.dpo_loss`.

    Returns:
        ``(loss, metrics)``: TRL's ``rewards/*``, ``logps/*`` plus ``entropy``, ``logits/chosen``,
        ``logits/rejected`` and ``mean_token_accuracy`` from the fused pass.
    """
    if labels.dim() != 2 or labels.shape[0] % 2:
        raise ValueError(f"labels must be [2B, T] (chosen rows then rejected rows), got {tuple(labels.shape)}")
    head = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                chunk_size=chunk_size, backend=backend, check_labels=check_labels, lora=lora)  # fmt: skip
    out = linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, return_stats=True, **head)
    B = labels.shape[0] // 2
    mask = labels != ignore_index
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None:
        if ref_hidden is None:
            raise ValueError("fused_linear_dpo_loss needs ref_chosen_logps/ref_rejected_logps or ref_hidden")
        ref = _reference_token_logps(ref_hidden, labels, weight=weight, ref_weight=ref_weight, ref_bias=ref_bias,
                                          head=head, ignore_index=ignore_index)  # fmt: skip
        ref_chosen_logps, ref_rejected_logps = ref[:B], ref[B:]
    return dpo_loss_from_token_logps(
        out.logp[:B], out.logp[B:], ref_chosen_logps, ref_rejected_logps, mask[:B], mask[B:],
        chosen_log_sum_sq_probs=out.log_sum_sq_probs[:B], rejected_log_sum_sq_probs=out.log_sum_sq_probs[B:],
        chosen_entropy=out.entropy[:B], rejected_entropy=out.entropy[B:],
        chosen_mean_logits=out.mean_logit[:B], rejected_mean_logits=out.mean_logit[B:],
        chosen_is_top1=out.is_top1[:B],
        **dpo_kwargs,
    )  # fmt: skip


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    response_ids: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_labels: bool | None = None,
    lora=None,
    **ppo_kwargs,
):
    """PPO policy (+ value) loss straight from the policy's last hidden states.

    ``logp, entropy = linear_logprobs(hidden, weight, response_ids)`` over the valid response
    tokens, then :func:`alignkernels.ppo_loss` (``cliprange``, ``cliprange_value``, ``vf_coef``,
    ``entropy_coef``, ...). ``hidden`` is ``[B, T, H]`` aligned with ``response_ids`` ``[B, T]``;
    ``values``/``old_values``/``returns`` are the value head's ``[B, T]`` tensors (the value head
    itself is cheap and stays in the caller's model). ``lora=(lora_A, lora_B, scaling)``: a LoRA
    adapter on the head (see ``linear_logprobs``).
    """
    head = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                chunk_size=chunk_size, backend=backend, check_labels=check_labels, lora=lora)  # fmt: skip
    labels = _masked_labels(response_ids, mask, ignore_index)
    logp, entropy = linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, return_entropy=True, **head)
    return ppo_loss(logp, old_logp, advantages, mask, values, old_values, returns, entropy=entropy, **ppo_kwargs)
