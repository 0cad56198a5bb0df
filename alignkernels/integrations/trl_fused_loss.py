"""``alignkernels.integrations.trl.apply(fused_loss=True)``: TRL's SFT and GRPO losses on the
three-GEMM head.

The seam is the same as the head-only drop-in (``LinearLogprobsAdapter`` in place of TRL's
``ChunkedLogProbFunction``), plus a *scope* that the patched trainer method opens around its loss:

* ``SFTTrainer.compute_loss`` (``loss_type="nll"``): the loss is ``−Σ log_probs / D``, so every
  scored token's log-prob gets the same gradient ``c = −1/D``. The head forms the gradient of
  ``L₁ = −Σ logp`` in its forward pass (``alignkernels.ops.three_gemm``: logits GEMM, dz in place,
  ``grad_hidden`` and ``grad_weight`` GEMMs -- the engine of ``fused_linear_cross_entropy``) and the
  backward scales it by ``−c``.
* ``GRPOTrainer._compute_loss`` (token-separable configurations, ``grpo_non_separable_reason``):
  the head forms the gradient of :func:`alignkernels.grpo_loss` with TRL's configuration for this
  batch (advantages, old/ref log-probs, mask, ``num_items_in_batch``, accumulation, entropy
  bonus), chunk by chunk (``LossProbe``), and TRL's own loss code then runs on the returned
  log-probs as before (its value and metrics are TRL's).

The backward *checks* the prediction: the upstream ``∂L/∂logp`` (and ``∂L/∂H``) autograd brings
must be uniform (SFT) or match the probed gradient to 1e-6 relative (GRPO: same formulas, other
op order), and zero on rows TRL discards; otherwise it recomputes the exact gradient through
``linear_logprobs`` (and logs it). So the result is always autograd's gradient of TRL's loss.

``apply(head_precision=, batch_invariant=)`` reach the three-GEMM head's plan
(``ops/three_gemm.make_plan``) and the recompute's ``linear_logprobs``.
``apply(backend=...)`` picks the head's fold (``torch`` / ``triton``) and the recompute's backend;
``reference`` has no three-GEMM head and takes the head-only drop-in. A PEFT LoRA ``lm_head``
allowed by ``apply(allow_lora_lm_head=True)`` (routed to the call by
``integrations.lora_head.routed_lora``) is fused into the three GEMMs (``ops/_lora.py``
``LoraConcat``) and gets its gradients there, or in the recompute.

Where it applies -- one log line per trainer says which path it took, and why:

* SFTTrainer, ``loss_type="nll"``, no ``compute_loss_func``, no label smoothing; GRPOTrainer with
  token-level ratios and no entropy-quantile / off-policy mask, no ``vespo``, no MoE aux loss, not
  a subclass overriding ``_compute_loss``; training with gradients, no autocast, a head that is
  not ZeRO-3 partitioned: **fused loss** (three GEMMs).
* everything else, and the DPO / RLOO / KTO trainers: the **head-only drop-in** (four GEMMs).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import NamedTuple

import torch

from .._utils import refuse_double_backward
from ..losses.fused import LossProbe, grpo_non_separable_reason
from ..losses.grpo import grpo_loss
from ..ops.linear_logprobs import LINEAR_LOGPROBS, linear_logprobs
from ..ops._lmhead_engine import Transform
from ..ops._lora import LoraHead, validate_lora
from ..ops.three_gemm import HEAD_FOLDS, HeadGradients, TokenGrad, make_plan, three_gemm_head
from .lora_head import HeadLora, lora_operands

logger = logging.getLogger("alignkernels.integrations.trl")

_STATE = threading.local()


class HeadOptions(NamedTuple):
    """What ``apply()`` says about each head call: token rows per chunk (None: the head's default),
    the ``apply(backend=...)`` choice, the LoRA adapter routed for this call's weight (None:
    no adapter), ``apply(head_precision=)`` and ``apply(batch_invariant=)``."""

    chunk_size: int | None = None
    backend: str = "auto"
    lora: HeadLora | None = None
    head_precision: str = "input"
    batch_invariant: bool = False


class SFTScope(NamedTuple):
    """SFTTrainer's nll: every scored token's log-prob gets the same gradient."""

    head_mask: torch.Tensor  # [B, T-1] bool: the shifted labels that are not -100


class GRPOScope(NamedTuple):
    """What the head needs to form GRPOTrainer's loss gradient: the loss on ``[B, C]`` log-probs
    and entropies of the completions, where the head's rows sit, and the probe's fill values."""

    head_mask: torch.Tensor  # [B, P + C - 1] bool: the shifted labels that are not -100
    loss_fn: object  # (logp [B, C], entropy [B, C]) -> (loss, metrics)
    completion_mask: torch.Tensor  # [B, C] bool
    fill_logp: torch.Tensor  # [B, C]
    uses_entropy: bool


def _scope():
    return getattr(_STATE, "scope", None)


def active() -> bool:
    """True inside a trainer ``compute_loss`` whose loss may take the three-GEMM head."""
    return _scope() is not None


@contextlib.contextmanager
def loss_scope(scope):
    """An :class:`SFTScope`, a :class:`GRPOScope`, or None (head-only) for the head calls inside."""
    previous = _scope()
    _STATE.scope = scope
    try:
        yield
    finally:
        _STATE.scope = previous


def _log_once(trainer, message, *args):
    if not getattr(trainer, "_alignkernels_logged_loss_path", False):
        trainer._alignkernels_logged_loss_path = True
        logger.warning(message, *args)


# --------------------------------------------------------------------------------------------
# SFTTrainer
# --------------------------------------------------------------------------------------------
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


def wrap_sft_compute_loss(original, enabled):
    """``SFTTrainer.compute_loss`` with the fused-loss scope on where the loss is exact."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not enabled():
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        reason = sft_fused_loss_blocker(self)
        if reason is None:
            _log_once(self, "alignkernels: SFTTrainer loss -> fused three-GEMM cross-entropy")
        else:
            _log_once(self, "alignkernels: SFTTrainer loss -> head-only drop-in (%s)", reason)
        labels = inputs.get("shift_labels")
        if labels is None and inputs.get("labels") is not None:
            labels = inputs["labels"][:, 1:]
        use = reason is None and labels is not None and torch.is_grad_enabled() and model.training
        with loss_scope(SFTScope(labels != -100) if use else None):
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    compute_loss.__wrapped__ = original
    return compute_loss


# --------------------------------------------------------------------------------------------
# GRPOTrainer
# --------------------------------------------------------------------------------------------
def grpo_loss_config(trainer, inputs) -> tuple[dict | None, str | None]:
    """``grpo_loss`` keyword arguments reproducing ``GRPOTrainer._compute_loss`` (TRL 1.16) for this
    batch, or ``(None, reason)`` where the fused loss does not apply."""
    args = trainer.args
    if type(trainer)._compute_loss is not _PATCHED_GRPO_COMPUTE_LOSS.get("fn"):
        return None, "a GRPOTrainer subclass with its own _compute_loss"
    if getattr(trainer, "aux_loss_enabled", False):
        return None, "an MoE aux loss"
    training = trainer.model.training
    entropy_coef = 0.0
    if trainer._entropy_bonus_enabled:
        entropy_coef = trainer.entropy_coef
        if trainer.use_adaptive_entropy and trainer._last_world_entropy > args.entropy_target:
            entropy_coef = 0.0
    kw = dict(
        beta=trainer.beta, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high, delta=args.delta,
        loss_type=trainer.loss_type, importance_sampling_level=trainer.importance_sampling_level,
        max_completion_length=trainer.max_completion_length, num_items_in_batch=inputs.get("num_items_in_batch"),
        use_bias_correction_kl=args.use_bias_correction_kl, sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, top_entropy_quantile=trainer.top_entropy_quantile,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold, entropy_coef=entropy_coef,
        gradient_accumulation_steps=trainer.current_gradient_accumulation_steps if training else 1,
        steps_per_generation=args.steps_per_generation, num_processes=trainer.accelerator.num_processes,
        training=training,
    )  # fmt: skip
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        kw["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
    reason = grpo_non_separable_reason(kw)
    return (kw, None) if reason is None else (None, reason)


_PATCHED_GRPO_COMPUTE_LOSS: dict = {}


def wrap_grpo_compute_loss(original, enabled):
    """``GRPOTrainer._compute_loss`` with a :class:`GRPOScope` where the loss is token-separable."""

    def _compute_loss(self, model, inputs):
        if not enabled():
            return original(self, model, inputs)
        kw, reason = grpo_loss_config(self, inputs)
        if kw is None:
            _log_once(self, "alignkernels: GRPOTrainer loss -> head-only drop-in (%s)", reason)
            return original(self, model, inputs)
        _log_once(self, "alignkernels: GRPOTrainer loss -> fused three-GEMM %s loss", self.loss_type)
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        advantages = inputs["advantages"]

        def loss_fn(logp, entropy):
            return grpo_loss(logp, old, ref, advantages, mask, entropy=entropy, **kw)

        cd = torch.float32
        fill = (old.detach().to(cd) if old is not None else torch.zeros(mask.shape, dtype=cd, device=mask.device))
        prompt_len = inputs["prompt_ids"].shape[1]
        completion = completion_mask != 0
        head_mask = torch.cat([completion.new_zeros(completion.shape[0], prompt_len - 1), completion], dim=1)
        scope = GRPOScope(head_mask, loss_fn, completion, fill.masked_fill(~completion, 0.0),
                          kw["entropy_coef"] != 0.0)  # fmt: skip
        with loss_scope(scope if torch.is_grad_enabled() else None):
            return original(self, model, inputs)

    _compute_loss.__wrapped__ = original
    _PATCHED_GRPO_COMPUTE_LOSS["fn"] = _compute_loss
    return _compute_loss


def install(patcher, enabled) -> None:
    """Called by ``trl.apply()``: wrap ``SFTTrainer.compute_loss`` and ``GRPOTrainer._compute_loss``
    (``patcher.set``, undone by ``remove()``); ``enabled()`` reads ``apply(fused_loss=...)``."""
    from trl import GRPOTrainer, SFTTrainer

    patcher.set(SFTTrainer, "compute_loss", wrap_sft_compute_loss(SFTTrainer.compute_loss, enabled))
    patcher.set(GRPOTrainer, "_compute_loss", wrap_grpo_compute_loss(GRPOTrainer._compute_loss, enabled))
    if enabled():
        logger.warning("alignkernels: fused_loss=True -- DPO/RLOO/KTO trainers' loss -> head-only drop-in")


# --------------------------------------------------------------------------------------------
# The head call
# --------------------------------------------------------------------------------------------
def usable_for(hidden, weight, bias, outputs, recompute_in_backward, lora=None) -> bool:
    """Can this head call take the three-GEMM path (inside a fused-loss scope)? ``lora``: the
    adapter routed for this call (``HeadLora``), or None."""
    wanted = set(outputs or ())
    adapter = () if lora is None else (lora.lora_A, lora.lora_B)
    return (
        active()
        and torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad or any(t.requires_grad for t in adapter))
        and not torch.is_autocast_enabled(hidden.device.type)
        and hidden.dtype == weight.dtype
        and (bias is None or bias.dtype == weight.dtype)
        and wanted <= {"log_probs", "entropy", "is_top1"}
        and not recompute_in_backward
    )


def _policy_for(targets):
    """``(policy, scored_rows)`` for the current scope, or None when the head's rows do not line up
    with the loss's positions (then the head-only drop-in runs). TRL scores only the valid rows on
    Triton devices and every row elsewhere (the CPU: ignored rows get label 0 and are zeroed
    afterwards); ``scored_rows`` (None: all) picks the valid ones, so no FLOPs go to the others."""
    scope = _scope()
    head_mask = scope.head_mask.reshape(-1)
    n_valid = int(head_mask.sum())
    if targets.numel() == n_valid:
        scored_rows = None
    elif targets.numel() == head_mask.numel():
        scored_rows = head_mask.nonzero().squeeze(1)
    else:
        return None
    if isinstance(scope, SFTScope):
        return _UniformGradient(), scored_rows
    positions = scope.completion_mask.reshape(-1).nonzero().squeeze(1)
    if positions.numel() != n_valid:
        return None
    probe = LossProbe(scope.loss_fn, positions, scope.completion_mask.shape, scope.fill_logp, scope.uses_entropy)
    return _ProbedGradient(probe), scored_rows


class _UniformGradient:
    """SFT: the head forms the gradient of ``L₁ = −Σ logp``; TRL's ``∂L/∂logp`` must be the same
    number ``c`` for every token (then ``∂L/∂θ = −c · ∂L₁/∂θ``)."""

    def token_grad(self, rows, stats):
        return TokenGrad(torch.full_like(stats.logp, -1.0))

    def scale(self, grad_logp, grad_entropy):
        if grad_entropy is not None and bool(grad_entropy.any()):
            return None
        c = grad_logp[0]
        return -c if bool((grad_logp == c).all()) else None


class _ProbedGradient:
    """GRPO: the head forms the gradient of :func:`alignkernels.grpo_loss` (TRL's configuration,
    through ``LossProbe``); TRL's own ``∂L/∂logp`` (and ``∂L/∂H``) must match it to ~1e-6 relative
    (same formulas, different op order), else the backward recomputes exactly."""

    def __init__(self, probe):
        self.probe = probe
        self.g_logp, self.g_entropy = [], []

    def token_grad(self, rows, stats):
        grad = self.probe(rows, stats)
        self.g_logp.append(grad.logp)
        self.g_entropy.append(grad.entropy if grad.entropy is not None else torch.zeros_like(grad.logp))
        return grad

    def scale(self, grad_logp, grad_entropy):
        mine_logp, mine_entropy = torch.cat(self.g_logp), torch.cat(self.g_entropy)
        theirs_entropy = grad_entropy if grad_entropy is not None else torch.zeros_like(mine_entropy)
        for mine, theirs in ((mine_logp, grad_logp), (mine_entropy, theirs_entropy)):
            tol = 1e-6 * float(mine.abs().max()) + 1e-12
            if mine.shape != theirs.shape or float((mine - theirs.to(mine.dtype)).abs().max()) > tol:
                logger.warning("alignkernels: the fused loss's gradient differs from TRL's by more than 1e-6 "
                               "relative; this step's head gradient is recomputed exactly")  # fmt: skip
                return None
        return torch.ones((), dtype=grad_logp.dtype, device=grad_logp.device)


class CheckedHeadCall(NamedTuple):
    """The non-tensor inputs of :class:`_CheckedHeadGradient`: the logit transform, token rows per
    chunk, the resolved backend (its fold, and the recompute's ``linear_logprobs`` backend), the
    adapter's scaling (None: no adapter), the gradient policy and the scored rows (None: all)."""

    tr: Transform
    chunk_size: int | None
    backend: str
    lora_scaling: float | None
    policy: object
    scored_rows: torch.Tensor | None
    head_precision: str = "input"
    batch_invariant: bool = False  # the three-GEMM head on its fixed plan (ops/three_gemm.batch_invariant_plan)


class _CheckedHeadGradient(torch.autograd.Function):
    """Per-token ``(logp, entropy, is_top1)`` from the three-GEMM head (with a LoRA adapter: its
    term in the same GEMMs, ``ops/_lora.py`` ``LoraConcat``); the forward forms the gradient the
    ``policy`` predicts, the backward uses it only if the upstream gradient is what the policy
    predicted (``policy.scale``), and otherwise recomputes the exact gradient through
    ``linear_logprobs`` on the same backend (four GEMMs more). Either way the result is autograd's."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_A, lora_B, targets, call: CheckedHeadCall):
        h, t = hidden, targets.long()
        rows = call.scored_rows
        if rows is not None:  # rows TRL zeroes afterwards: never projected
            h, t = hidden.index_select(0, rows), t.index_select(0, rows)
        fold = HEAD_FOLDS[call.backend]
        plan = make_plan(fold, hidden.device, t.numel(), weight.shape[0], call.chunk_size, call.head_precision,
                         call.batch_invariant)  # fmt: skip
        lora = LoraHead(lora_A, lora_B, call.lora_scaling) if lora_A is not None else None
        needs = tuple(ctx.needs_input_grad[:5] if lora is not None else ctx.needs_input_grad[:3])
        out = three_gemm_head(h, weight, bias, t, call.tr, call.policy.token_grad, plan, fold, needs, lora=lora)
        grads = out.grads
        outputs = (out.logp.float(), out.entropy.float(), out.is_top1)
        if rows is not None:
            n = targets.numel()
            outputs = tuple(torch.zeros(n, dtype=x.dtype, device=x.device).index_copy_(0, rows, x) for x in outputs)
            if grads.hidden is not None:
                full = torch.zeros(hidden.shape, dtype=grads.hidden.dtype, device=hidden.device)
                grads = grads._replace(hidden=full.index_copy_(0, rows, grads.hidden))
        ctx.grads, ctx.call = grads, call
        ctx.save_for_backward(hidden, weight, bias, lora_A, lora_B, targets)
        ctx.mark_non_differentiable(outputs[2])
        return outputs

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_top1):
        refuse_double_backward("apply(fused_loss=True)", ctx.call.backend)
        hidden, weight, bias, lora_A, lora_B, targets = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        call = ctx.call
        none = (None, None)
        if grad_logp is None or targets.numel() == 0:
            return (None,) * 5 + none
        scale = None
        rows = call.scored_rows
        if grads is not None:
            g_logp, g_entropy = grad_logp, grad_entropy
            if rows is not None:  # the unscored rows must get no gradient (TRL zeroes their outputs)
                unscored = torch.ones(targets.numel(), dtype=torch.bool, device=targets.device).index_fill_(0, rows, False)
                clean = not bool(grad_logp[unscored].any()) and (grad_entropy is None or not bool(grad_entropy[unscored].any()))
                g_logp = grad_logp.index_select(0, rows)
                g_entropy = grad_entropy.index_select(0, rows) if grad_entropy is not None else None
            else:
                clean = True
            scale = call.policy.scale(g_logp, g_entropy) if clean and g_logp.numel() else None
        if scale is not None:
            return tuple(g.mul_(scale.to(g.dtype)) if g is not None else None for g in HeadGradients(*grads)) + none
        # not what the policy predicted: the exact gradient, recomputed (same backend, same adapter)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) if x is not None else None
                      for x, need in zip((hidden, weight, bias, lora_A, lora_B), ctx.needs_input_grad[:5])]  # fmt: skip
            lora = (leaves[3], leaves[4], call.lora_scaling) if lora_A is not None else None
            tr = call.tr
            logp, entropy = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=tr.temperature,
                                            logit_scale=tr.logit_scale, softcap=tr.softcap, return_entropy=True,
                                            chunk_size=call.chunk_size, backend=call.backend, check_labels=False,
                                            lora=lora, head_precision=call.head_precision,
                                            batch_invariant=call.batch_invariant)  # fmt: skip
            total = (logp * grad_logp).sum()
            if grad_entropy is not None:
                total = total + (entropy * grad_entropy).sum()
            wanted = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(total, wanted))
        return tuple(next(got) if (x is not None and x.requires_grad) else None for x in leaves) + none


def fused_head_outputs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs,
                       recompute_in_backward, options: HeadOptions = HeadOptions()):  # fmt: skip
    """The adapter's hook: ``ChunkedLogProbFunction``'s outputs from the three-GEMM head inside a
    fused-loss scope, or None (then the head-only drop-in runs). ``options``: ``apply()``'s chunk
    size and backend, and the LoRA adapter routed for this call."""
    if not usable_for(hidden, weight, bias, outputs, recompute_in_backward, options.lora):
        return None
    return sft_logprobs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs,
                        options=options)


def sft_logprobs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs,
                 options: HeadOptions = HeadOptions()):  # fmt: skip
    """``ChunkedLogProbFunction``'s outputs ``(log_probs, entropy, None, None, is_top1)`` from the
    three-GEMM head with the current scope's gradient policy (None where it does not apply, and for
    ``backend="reference"``, which has no three-GEMM head: the head-only drop-in runs it)."""
    tr = Transform(
        logit_scale=1.0 if logit_scale is None else float(logit_scale),
        softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
        temperature=float(temperature),
    )
    backend = LINEAR_LOGPROBS.resolve(options.backend, hidden.device, hidden.dtype)
    if backend not in HEAD_FOLDS:
        return None
    # the adapter gathered (FSDP2) and in the head's dtype, differentiably (as the head-only drop-in)
    lora = validate_lora(lora_operands(options.lora, weight.dtype), hidden, weight)
    plan = _policy_for(targets)
    if plan is None:
        return None
    policy, scored_rows = plan
    call = CheckedHeadCall(tr, options.chunk_size, backend, lora.scaling if lora is not None else None, policy,
                           scored_rows, options.head_precision, options.batch_invariant)  # fmt: skip
    lora_A, lora_B = (lora.lora_A, lora.lora_B) if lora is not None else (None, None)
    logp, entropy, is_top1 = _CheckedHeadGradient.apply(hidden, weight, bias, lora_A, lora_B, targets, call)
    wanted = set(outputs or ())
    return logp, entropy if "entropy" in wanted else None, None, None, is_top1 if "is_top1" in wanted else None
