"""Eager PyTorch references: the ground truth of the tests and the "eager" baseline of bench.

These materialise everything (full softmax / log-softmax, full logits) in fp32 (fp64 for fp64
inputs), exactly the way most training code does it today. They are deliberately simple:
read them to know what every fast backend must return.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs_reference(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log_softmax(logits / T) gathered at ``labels`` (+ entropy of softmax(logits / T)).

    Ignored positions (``labels == ignore_index``) give 0 in both outputs.
    """
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    logsm = F.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


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
    cd = _compute_dtype(hidden.dtype)
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
    ``log Σ p²``, ``Σ_v z_v / V``, ``argmax(z) == label`` with first-argmax ties, ``logsumexp(z)``).
    Ignored positions give 0 (``False`` for ``is_top1``); ``logp`` and ``entropy`` carry autograd."""
    cd = _compute_dtype(hidden.dtype)
    logits = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        logits = logits + bias.to(cd)
    z = transform_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    lse = torch.logsumexp(z, dim=-1)
    logsm = z - lse.unsqueeze(-1)
    p = logsm.exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    entropy = torch.where(valid, -(p * logsm).sum(-1), zero)
    log_sum_sq_probs = torch.where(valid, (p * p).sum(-1).log(), zero).detach()
    mean_logit = torch.where(valid, z.mean(-1), zero).detach()
    is_top1 = (z.argmax(-1) == safe) & valid
    return logp, entropy, log_sum_sq_probs, mean_logit, is_top1, torch.where(valid, lse, zero).detach()
