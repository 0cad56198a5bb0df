"""``alignkernels.integrations.trl.apply(fused_loss=True)``: TRL's SFT loss on the three-GEMM head.

SFTTrainer's loss (TRL 1.16, ``compute_loss``, ``loss_type="nll"``) is ``−Σ log_probs / D`` over
the head's log-probs, with ``D`` = ``num_items_in_batch`` or the valid-token count (times the
process count with ``average_tokens_across_devices``): every token's log-prob gets the same
gradient ``c = −1/D``. So the head can form the gradient of ``L₁ = −Σ logp`` in its forward pass
(``alignkernels.ops.three_gemm``: logits GEMM, dz in place, ``grad_hidden`` and ``grad_weight``
GEMMs -- the engine of :func:`alignkernels.fused_linear_cross_entropy`) and scale it by ``−c``
when autograd brings the actual ``∂L/∂logp``. The backward *checks* that this gradient is uniform
(and that nothing flowed into the entropy); if not -- anything TRL or a user did with the log-probs
that is not a plain sum -- it recomputes the exact gradient through ``linear_logprobs`` (four
GEMMs more), so the result is always exact.

Where it applies (one log line per trainer says which path it took, and why):

* ``SFTTrainer`` with ``loss_type="nll"``, no ``compute_loss_func``, no label smoothing, training
  with gradients, no autocast, a head that is not ZeRO-3 partitioned: **fused loss** (three GEMMs).
* everything else, and the DPO / GRPO / RLOO / KTO trainers: the **head-only drop-in**
  (``LinearLogprobsAdapter``: ``linear_logprobs``, four GEMMs with autograd). GRPO's fused loss
  (``fused_linear_grpo_loss``) needs TRL's loss inputs (advantages, old/ref log-probs, the mask)
  at the head; the seam for that in ``GRPOTrainer._compute_loss`` is not wired yet.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch

from ..ops.linear_logprobs import linear_logprobs
from ..ops.three_gemm import (
    HeadGradients,
    LogitTransform,
    TokenGrad,
    make_plan,
    three_gemm_head,
)

logger = logging.getLogger("alignkernels.integrations.trl")

_STATE = threading.local()


def active() -> bool:
    """True inside a ``compute_loss`` whose loss may take the three-GEMM head."""
    return getattr(_STATE, "sft_nll", False)


@contextlib.contextmanager
def _sft_nll_scope(enabled: bool):
    previous = active()
    _STATE.sft_nll = enabled
    try:
        yield
    finally:
        _STATE.sft_nll = previous


def sft_fused_loss_blocker(trainer) -> str | None:
    """Why this SFTTrainer's loss cannot take the fused path (None: it can)."""
    args = trainer.args
    if getattr(args, "loss_type", "nll") != "nll":
        return f"loss_type={args.loss_type!r} (per-token weights)"
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "a custom compute_loss_func"
    if getattr(trainer, "label_smoother", None) is not None:
        return "label smoothing (needs the full logits)"
    return None


def install(patcher, enabled) -> None:
    """Called by ``trl.apply()``: wrap ``SFTTrainer.compute_loss`` (``patcher.set``, undone by
    ``remove()``); ``enabled()`` reads ``apply(fused_loss=...)`` at each call."""
    from trl import SFTTrainer

    patcher.set(SFTTrainer, "compute_loss", wrap_sft_compute_loss(SFTTrainer.compute_loss, enabled))
    if enabled():
        logger.warning("alignkernels: fused_loss=True -- DPO/GRPO/RLOO/KTO trainers' loss -> head-only drop-in "
                       "(their fused losses are not wired at TRL's loss seam yet)")  # fmt: skip


def wrap_sft_compute_loss(original, enabled):
    """``SFTTrainer.compute_loss`` with the fused-loss scope on where the loss is exact."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not enabled():
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        reason = sft_fused_loss_blocker(self)
        if not getattr(self, "_alignkernels_logged_loss_path", False):
            self._alignkernels_logged_loss_path = True
            if reason is None:
                logger.warning("alignkernels: SFTTrainer loss -> fused three-GEMM cross-entropy")
            else:
                logger.warning("alignkernels: SFTTrainer loss -> head-only drop-in (%s)", reason)
        with _sft_nll_scope(reason is None and torch.is_grad_enabled() and model.training):
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    compute_loss.__wrapped__ = original
    return compute_loss


def usable_for(hidden, weight, bias, outputs, recompute_in_backward) -> bool:
    """Can this head call take the three-GEMM path (inside an SFT fused-loss scope)?"""
    wanted = set(outputs or ())
    return (
        active()
        and torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and not torch.is_autocast_enabled(hidden.device.type)
        and hidden.dtype == weight.dtype
        and (bias is None or bias.dtype == weight.dtype)
        and wanted <= {"log_probs", "entropy", "is_top1"}
        and not recompute_in_backward
    )


class _UniformLogprobGrad(torch.autograd.Function):
    """Per-token ``(logp, entropy, is_top1)``; the forward forms the gradient of ``−Σ logp`` and the
    backward scales it, after checking the upstream gradient is the same for every token (else
    it recomputes the exact gradient through ``linear_logprobs``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tr: LogitTransform, chunk_size):
        def token_grad(rows, stats):
            return TokenGrad(torch.full_like(stats.logp, -1.0))  # ∂(−Σ logp)/∂logp_t

        plan = make_plan("triton" if hidden.is_cuda else "torch", hidden.device, targets.numel(), weight.shape[0],
                         chunk_size)  # fmt: skip
        needs = tuple(ctx.needs_input_grad[:3])
        out = three_gemm_head(hidden, weight, bias, targets.long(), tr, token_grad, plan, needs)
        ctx.grads, ctx.tr, ctx.chunk_size = out.grads, tr, chunk_size
        ctx.save_for_backward(hidden, weight, bias, targets)
        logp = out.logp.float()
        ctx.mark_non_differentiable(out.is_top1)
        return logp, out.entropy.float(), out.is_top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, _grad_top1):
        hidden, weight, bias, targets = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        n = targets.numel()
        uniform = grads is not None and (grad_entropy is None or not bool(grad_entropy.any()))
        if uniform and grad_logp is not None and n:
            c = grad_logp[0]
            uniform = bool((grad_logp == c).all())
        if grad_logp is None or n == 0:
            return None, None, None, None, None, None
        if uniform:  # ∂L/∂θ = (∂L/∂logp) / (∂L₁/∂logp) · ∂L₁/∂θ = −c · grads
            scale = -c
            out = [g.mul_(scale.to(g.dtype)) if g is not None else None for g in HeadGradients(*grads)]
            return out[0], out[1], out[2], None, None, None
        # not a plain sum of the log-probs: the exact gradient, recomputed (four GEMMs)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) if x is not None else None
                      for x, need in zip((hidden, weight, bias), ctx.needs_input_grad[:3])]  # fmt: skip
            logp, entropy = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=ctx.tr.temperature,
                                            logit_scale=ctx.tr.logit_scale, softcap=ctx.tr.softcap,
                                            return_entropy=True, chunk_size=ctx.chunk_size, check_labels=False)
            total = (logp * grad_logp).sum()
            if grad_entropy is not None:
                total = total + (entropy * grad_entropy).sum()
            wanted = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(total, wanted))
        out = [next(got) if (x is not None and x.requires_grad) else None for x in leaves]
        return out[0], out[1], out[2], None, None, None


def sft_logprobs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs,
                 chunk_size=None):  # fmt: skip
    """``ChunkedLogProbFunction``'s outputs ``(log_probs, entropy, None, None, is_top1)`` from the
    three-GEMM head (see the module docstring)."""
    tr = LogitTransform(
        logit_scale=1.0 if logit_scale is None else float(logit_scale),
        softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
        temperature=float(temperature),
    )
    logp, entropy, is_top1 = _UniformLogprobGrad.apply(hidden, weight, bias, targets, tr, chunk_size)
    wanted = set(outputs or ())
    return logp, entropy if "entropy" in wanted else None, None, None, is_top1 if "is_top1" in wanted else None
