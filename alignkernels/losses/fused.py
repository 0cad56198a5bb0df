"""Fused-from-hidden-states losses: hidden states + lm_head in, loss + metrics out.

Two head paths, the loss math living only in this package's per-token losses
(``grpo_loss``, ``ppo_loss``, ``dpo_loss_from_token_logps``) either way:

* **three GEMMs** (``alignkernels.ops.three_gemm``) for token-separable losses -- the loss's
  gradient w.r.t. each token's log-prob and entropy depends only on that token (and on normalisers
  fixed by the mask), so it is formed per token chunk while the chunk's logits are at hand:
  logits GEMM, dz in place, ``grad_hidden`` and ``grad_weight`` GEMMs (6·n·H·V FLOPs). A LoRA
  adapter on the head (``lora=``) rides in the same GEMMs with K = H + r (``ops/_lora.py``).
  ``fused_linear_cross_entropy`` (SFT), and ``fused_linear_grpo_loss`` / ``fused_linear_ppo_loss``
  wherever their configuration is token-separable.
* **four GEMMs**: ``linear_logprobs`` (a differentiable log-prob head: logits forward, recompute,
  two gradient GEMMs; 8·n·H·V) followed by the loss and autograd -- for everything else
  (sequence-level ratios, entropy quantile masks, DPO, ...).

How GRPO/PPO get their per-token gradient on the three-GEMM path: the loss function itself is
evaluated, per chunk, on the full ``[B, T]`` log-probs (the chunk's fresh values, earlier chunks'
values, the sampling log-probs elsewhere) and differentiated with autograd; for a token-separable
configuration the gradient at the chunk's tokens is exact whatever the other tokens hold. The cost
is O(B·T) elementwise work per chunk, nothing next to a ``[chunk, V, H]`` GEMM. After the last
chunk the loss and its metrics are computed once more from the finished log-probs.

Every entry takes its lm-head options as one ``HeadOptions`` (``head=``) or its fields as keywords;
``_run_head`` (three GEMMs) and ``linear_logprobs`` (four) read the same value.

Validation does not depend on the path: the head's inputs (``validate_head``) and the loss's own
checks (the loss evaluated once on placeholder per-token tensors, ``PolicyLoss.validate``) run
before either head, and before the backend is resolved.

Masked positions are dropped before any matmul (no FLOPs) on both paths. Memory: see
``alignkernels.ops.three_gemm`` (one fp32 ``[chunk, V]`` buffer or two; the gradients exist from
the forward on) and ``linear_logprobs``; plus O(B x T) per-token tensors.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .._utils import (
    OpBackends,
    check_batch_invariant,
    check_label_range,
    check_tensor,
    labels_checking_enabled,
    output_dtype,
)
from ..ops._lmhead_engine import check_positive_int, compact_rows, validate_head
from ..ops._lmhead_engine import head_precision as check_head_precision
from ..ops._lora import effective_weight, validate_lora
from ..ops.linear_logprobs import linear_logprobs
from ..ops.three_gemm import (
    HEAD_FOLDS,
    HeadCall,
    HeadGradientFunction,
    TokenGrad,
    check_batch_invariant_head,
    make_plan,
    three_gemm_head,
)
from .dpo import dpo_loss_from_token_logps
from .grpo import PolicyConfig, grpo_loss
from .policy_rows import POLICY_LOSS_TYPES
from .verl_policy import VERL_POLICY_LOSSES, VerlPolicyConfig, verl_policy_loss
from .ppo import PPOConfig, ppo_loss
from .validation import check_num_items, no_other_keywords, typed_value

FUSED_LINEAR_CROSS_ENTROPY = OpBackends("fused_linear_cross_entropy", ("triton", "torch", "reference"))
FUSED_LINEAR_GRPO_LOSS = OpBackends("fused_linear_grpo_loss", ("triton", "torch", "reference"))
FUSED_LINEAR_PPO_LOSS = OpBackends("fused_linear_ppo_loss", ("triton", "torch", "reference"))
FUSED_LINEAR_VERL_POLICY_LOSS = OpBackends("fused_linear_verl_policy_loss", ("triton", "torch", "reference"))
HEAD_PATHS = ("auto", "three_gemm", "four_gemm")
SFT_LOSS_TYPES = ("nll", "dft")


@dataclasses.dataclass(frozen=True, eq=False)
class HeadOptions:
    """How a fused loss runs its lm head: ``linear_logprobs``' keywords besides the tensors, one field
    a line (a new head keyword is one field: every fused entry takes it as ``head=`` or as a keyword,
    and the four-GEMM path passes it to ``linear_logprobs``). Checked once, at construction, where a
    tensor is not needed (the logit transform is checked with the tensors by ``validate_head``, the
    adapter by ``validate_lora``). Every fused entry takes ``head=HeadOptions(...)`` or the fields as
    keywords (not both)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    chunk_size: int | None = None
    backend: str = "auto"
    check_labels: bool | None = None
    lora: tuple | None = None  # (lora_A [r, H], lora_B [V, r], scaling)
    head_precision: str = "input"
    batch_invariant: bool = False  # per-token outputs bitwise independent of the batch (``three_gemm.batch_invariant_plan``)

    def __post_init__(self):
        check_positive_int("chunk_size", self.chunk_size)
        check_head_precision(self.head_precision)
        check_batch_invariant(self.batch_invariant)

    def keywords(self, **replaced) -> dict:
        """The fields as ``linear_logprobs`` keywords (``replaced`` overriding some)."""
        return {**{name: getattr(self, name) for name in self._fields}, **replaced}

    @classmethod
    def of(cls, function: str, head, keywords: dict, *, only_head: bool = False) -> "HeadOptions":
        """``head``, or one built from the head fields popped off a fused entry's ``keywords``;
        ``only_head``: anything else in ``keywords`` is a ``TypeError`` naming it."""
        options = typed_value("head", cls, head, keywords)
        if only_head:
            no_other_keywords(function, keywords)
        return options


# the field names, as a NamedTuple lists them (``validation.typed_value``; plain data, which
# torch.compile traces where it does not trace ``dataclasses.fields``)
HeadOptions._fields = tuple(f.name for f in dataclasses.fields(HeadOptions))


class FusedCrossEntropyOutput(NamedTuple):
    """``fused_linear_cross_entropy(..., return_stats=True)``: the loss and TRL's SFT statistics,
    per token of ``labels.shape`` (0 / False where ignored; all but ``loss`` detached)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    num_tokens: torch.Tensor  # valid (non-ignored) labels, int64 0-d


def _reference_head_stats(compact, weight, bias, tr):
    """Eager baseline on the compact rows: materialised logits, autograd through log_softmax."""
    from ..reference import linear_logprobs_stats_reference

    logp, entropy, _, _, is_top1, _ = linear_logprobs_stats_reference(
        compact.hidden, weight, compact.labels, bias=bias, temperature=tr.temperature, logit_scale=tr.logit_scale,
        softcap=tr.softcap)  # fmt: skip
    return logp, entropy, is_top1


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_entropy: bool = False,
    return_stats: bool = False,
    num_items_in_batch=None,
    loss_type: str = "nll",
    head: HeadOptions | None = None,
    **head_keywords,
):
    """SFT cross-entropy straight from hidden states and the lm_head, in three GEMMs.

    ``loss = Σ_t ℓ_t / D`` over the tokens whose label is not ``ignore_index``, with
    ``ℓ_t = −log p(label_t)`` (``loss_type="nll"``) or DFT's ``−log p·p.detach()`` (``"dft"``),
    ``p = softmax(z)``, ``z = transform(hidden @ weight.T + bias)`` (``logit_scale``, Gemma's
    ``softcap``, ``temperature``; ``linear_logprobs``' order). ``D`` is TRL's SFTTrainer's
    (``compute_loss``, TRL 1.16): ``num_items_in_batch`` if given, else the number of valid labels,
    clamped to >= 1 (a fully ignored batch gives a finite 0 and zero gradients); ``reduction="sum"``
    has ``D = 1``.

    Labels are used as given (already shifted: ``hidden[..., t, :]`` predicts ``labels[..., t]``).
    The gradient w.r.t. each token's logits is ``−(onehot − p)/D`` (nll), known in the forward: the
    logits of a token chunk are produced once, turned into dz in place and consumed by the
    ``grad_hidden`` and ``grad_weight`` GEMMs (``alignkernels.ops.three_gemm``): 6·n·H·V matmul FLOPs
    for n valid tokens (a log-prob head + autograd needs 8·n·H·V). No ``[N, V]`` tensor.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 (float64 on torch / reference).
        weight: ``[V, H]``, hidden's dtype. ``bias``: optional ``[V]``.
        labels: ``hidden.shape[:-1]`` int, in ``[0, V)`` or ``ignore_index``.
        reduction: ``"mean"`` (over ``D`` above) or ``"sum"``. Per-token losses (``"none"``) have
            arbitrary upstream gradients: use ``linear_logprobs``.
        num_items_in_batch: token count of the whole (accumulated, all-rank) batch, as
            ``transformers.Trainer`` passes it: a positive int or finite numeric scalar tensor (one
            host sync), 0 only when no label here is valid; anything else is a ``TypeError`` /
            ``ValueError`` naming it (``losses.validation.check_num_items``). ``reduction="mean"`` only.
        return_entropy: also return the per-token entropy (detached, 0 where ignored).
        return_stats: return a :class:`FusedCrossEntropyOutput` (loss, logp, entropy, is_top1,
            num_tokens): what SFTTrainer logs, from the same pass.
        loss_type: ``"nll"`` or ``"dft"`` (TRL's ``SFTConfig.loss_type``).
        head: a :class:`HeadOptions`, or its fields as keywords (not both; another keyword is a
            ``TypeError``): ``temperature``, ``logit_scale``, ``softcap`` (the logit transform, see
            ``linear_logprobs``) and:
        backend: ``"auto"``, ``"triton"`` (cuBLAS + the ``alignkernels.kernels.linear_logprobs`` kernels; CUDA, or CPU
            under ``TRITON_INTERPRET=1``), ``"torch"`` (CPU / anywhere), ``"reference"`` (eager).
        chunk_size: token rows per logits buffer (default: a ~32 MB fp32 buffer on CPU, ~512 MB on GPU).
        check_labels: verify labels are in range (one sync); None follows ``ALIGNKERNELS_CHECK_LABELS``.
        head_precision: ``"input"`` / ``"fp32"`` / ``"tf32"``, the head GEMMs' operands (see
            ``linear_logprobs``; the weight widened block by block, never whole).
        batch_invariant: per-token outputs and ``grad_hidden`` rows bitwise independent of the batch
            (``alignkernels.ops.three_gemm.batch_invariant_plan``; the other fused losses: the same
            field, on either head path). ``chunk_size`` is then not used.
        lora: ``(lora_A [r, H], lora_B [V, r], scaling)``, a LoRA adapter on the head (see
            ``linear_logprobs``), fused into the same three GEMMs (contraction ``H + r``:
            ``alignkernels.ops._lora.LoraConcat``); ``lora_A`` and ``lora_B`` get gradients.

    Returns:
        0-d fp32 loss (fp64 for fp64 inputs), ``(loss, entropy)``, or a ``FusedCrossEntropyOutput``.
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Autograd: under ``torch.no_grad()`` / ``torch.inference_mode()`` (or when nothing requires grad)
    only the logits GEMM runs (2·n·H·V FLOPs, no gradient buffers). A second backward over one
    forward (``retain_graph=True``, or one ``torch.autograd.grad`` per input) runs the head again
    (6·n·H·V more) and gives the same gradients. Double backward (``create_graph=True``) is a
    ``RuntimeError`` (use ``backend="reference"``). Under ``torch.compile`` (``fullgraph=True``
    works) ignored rows stay in place, masked: same loss and gradients.

    Memory (besides inputs): one fp32 ``[chunk, V]`` logits buffer (two on the torch path, three
    with softcap; a ``[chunk, V]`` dz buffer in the weight dtype for half weights on triton), the
    gradients from the forward on (``[n, H]``, ``[V, H]`` -- fp32 for half weights -- and ``[V]``),
    and the valid rows of ``hidden`` (``[n, H]``) kept for a second backward until the graph is freed.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (per-token losses: use linear_logprobs), got {reduction!r}")
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {SFT_LOSS_TYPES}, got {loss_type!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch is the denominator of reduction='mean'; it makes no sense with 'sum'")
    head = HeadOptions.of("fused_linear_cross_entropy", head, head_keywords, only_head=True)
    tr, labels, adapter = _head_inputs(hidden, weight, labels, bias, head)
    if labels_checking_enabled(head.check_labels):
        check_label_range(labels, weight.shape[0], ignore_index)
    backend = FUSED_LINEAR_CROSS_ENTROPY.resolve(head.backend, hidden.device, hidden.dtype)
    check_batch_invariant_head(head.batch_invariant, backend)
    cd = output_dtype(hidden.dtype)
    compact = compact_rows(hidden, labels, ignore_index)
    num_tokens = compact.count()
    if reduction == "sum":
        denominator = torch.ones((), dtype=cd, device=hidden.device)
    elif num_items_in_batch is None:
        denominator = num_tokens.to(cd).clamp(min=1)
    else:  # 0 only for a batch with no valid label (TRL's fully masked batch), clamped at 1 as TRL
        denominator = check_num_items("num_items_in_batch", num_items_in_batch, device=hidden.device, dtype=cd,
                                      minimum=0, valid_tokens=num_tokens).clamp(min=1)  # fmt: skip

    if backend == "reference":  # the eager baseline: the adapted head materialised (W + s·B·A)
        with check_head_precision(head.head_precision).gemms(hidden.device):  # the reference widens: TF32 switch only
            logp, entropy, is_top1 = _reference_head_stats(compact, effective_weight(weight, adapter), bias, tr)
        logp = compact.mask(logp)
        loss = _sft_token_losses(logp, loss_type).sum() / denominator
        logp, entropy = logp.detach(), entropy.detach()
    else:

        def token_grad(rows, stats):
            # ℓ = −logp (nll) or −logp·p.detach() (dft):  ∂L/∂logp_t = −1/D or −p_t/D
            g = torch.full_like(stats.logp, -1.0) if loss_type == "nll" else -stats.logp.exp()
            return TokenGrad(g / denominator)

        out, call = _run_head("fused_linear_cross_entropy", compact, weight, bias, adapter, tr, token_grad, backend,
                              head)  # fmt: skip
        loss = _sft_token_losses(out.logp, loss_type).sum() / denominator
        logp, entropy, is_top1 = out.logp, out.entropy, out.is_top1
        if call is not None:
            loss = _attach(loss, compact, weight, bias, adapter, call)
    if return_stats:
        return FusedCrossEntropyOutput(loss, compact.expand(logp), compact.expand(entropy), compact.expand(is_top1),
                                       num_tokens)  # fmt: skip
    if return_entropy:
        return loss, compact.expand(entropy)
    return loss


def _sft_token_losses(logp, loss_type):
    """``ℓ_t = −logp_t`` (nll) or DFT's ``−logp_t·p_t`` (``p_t = e^logp_t`` detached), with
    ``p·log p := 0`` at ``p = 0``: a label on a masked (``-inf``) logit costs ``+inf`` under nll and
    nothing under DFT (its limit), never NaN; gradients flow through ``logp`` only."""
    if loss_type == "nll":
        return -logp
    p = logp.detach().exp()
    return torch.where(p > 0, -logp * p, torch.zeros((), dtype=logp.dtype, device=logp.device))


def _head_inputs(hidden, weight, labels, bias, head: HeadOptions):
    """The lm-head engine's checks (those of ``linear_logprobs``) of the tensors and the transform:
    ``(Transform, labels int64, the validated LoRA adapter or None)``. Run before the backend is
    resolved, so a bad tensor is named whatever the backend."""
    tr, labels = validate_head(hidden, weight, labels, bias, head.temperature, head.logit_scale, head.softcap)
    return tr, labels, validate_lora(head.lora, hidden, weight)


def _run_head(op, compact, weight, bias, adapter, tr, token_grad, backend, head: HeadOptions):
    """The three-GEMM head over the compact rows (``adapter``: a validated ``LoraHead`` or None):
    ``(HeadOutputs, HeadCall | None)`` -- the gradients formed for whichever of hidden / weight / bias
    (/ lora_A / lora_B) requires grad (none in ``no_grad`` / ``inference_mode``: then only the logits
    GEMM runs and the call is None), not yet attached."""
    fold = HEAD_FOLDS[backend]
    plan = make_plan(fold, compact.hidden.device, compact.labels.numel(), weight.shape[0], head.chunk_size,
                     head.head_precision, head.batch_invariant)  # fmt: skip
    grad_mode = torch.is_grad_enabled()
    inputs = (compact.hidden, weight, bias) + (() if adapter is None else (adapter.lora_A, adapter.lora_B))
    needs = tuple(grad_mode and x is not None and x.requires_grad for x in inputs)

    def run(hidden, weight, bias, lora_A=None, lora_B=None):
        lora = None if adapter is None else adapter._replace(lora_A=lora_A.detach(), lora_B=lora_B.detach())
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            return three_gemm_head(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                   compact.labels, tr, token_grad, plan, fold, needs, compact.valid, lora=lora)  # fmt: skip

    out = run(*inputs)
    if not any(needs):
        return out, None
    return out, HeadCall(op, backend, out.grads, lambda *saved: run(*saved).grads)


def _attach(loss, compact, weight, bias, adapter, call):
    """``loss`` with the head's formed gradients attached (hidden, weight, bias, the adapter)."""
    lora_A, lora_B = (adapter.lora_A, adapter.lora_B) if adapter is not None else (None, None)
    return HeadGradientFunction.apply(loss, compact.hidden, weight, bias, lora_A, lora_B, call)


def _masked_labels(labels, mask, ignore_index):
    """Labels with ``ignore_index`` wherever ``mask`` is 0: those rows are skipped by the kernel."""
    if mask is None:
        return labels
    if tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(f"mask must have the shape of labels {tuple(labels.shape)}, got {tuple(mask.shape)}")
    return labels.masked_fill(~mask.bool(), ignore_index)


def _reference_token_logps(ref_hidden, labels, *, weight, bias, ref_weight, ref_bias, head: HeadOptions,
                           ignore_index):  # fmt: skip
    """Per-token log-probs of the reference model from its hidden states (no gradient). Without
    ``ref_weight`` the reference shares the policy's head (weight and bias). A policy's ``lora=``
    adapter is never applied to the reference: it is the base head (PEFT's disabled adapter)."""
    check_tensor("ref_hidden", ref_hidden, floating=True, ndim_min=1)
    if tuple(ref_hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"ref_hidden must have shape {(*labels.shape, 'H')} (the policy's hidden states' leading "
                         f"dimensions), got {tuple(ref_hidden.shape)}")  # fmt: skip
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    with torch.no_grad():
        return linear_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, ignore_index=ignore_index,
                               **head.keywords(lora=None))  # fmt: skip

# --------------------------------------------------------------------------------------------
# GRPO / PPO on the three-GEMM head: the per-token gradient of the loss itself, chunk by chunk
# --------------------------------------------------------------------------------------------
class LossProbe:
    """``token_grad`` for a token-separable loss ``loss_fn(logp [B, T], entropy [B, T])``.

    Per chunk: the chunk's log-probs (and entropies) are written into the full ``[B, T]`` tensors
    (earlier chunks keep theirs, the rest hold ``fill_logp``), the loss is evaluated and
    differentiated. For a token-separable configuration ``∂L/∂logp_t`` depends only on token t, so
    the values elsewhere do not matter; the normalisers come from the mask the loss sees."""

    def __init__(self, loss_fn, positions, shape, fill_logp, uses_entropy):
        """``positions``: the flat ``[B·T]`` position of each compact row (None: row i is position i)."""
        self.loss_fn, self.uses_entropy = loss_fn, uses_entropy
        self.cd = fill_logp.dtype
        self.logp = fill_logp.detach().clone().reshape(-1)
        self.entropy = torch.zeros_like(self.logp)
        self.shape = shape
        self.positions = positions if positions is not None else torch.arange(self.logp.numel(), device=fill_logp.device)

    def __call__(self, rows, stats):
        pos = self.positions[rows]
        self.logp[pos] = stats.logp.to(self.cd)
        self.entropy[pos] = stats.entropy.to(self.cd)
        with torch.enable_grad():
            logp = self.logp.clone().requires_grad_(True)
            entropy = self.entropy.clone().requires_grad_(self.uses_entropy)
            loss, _ = self.loss_fn(logp.view(self.shape), entropy.view(self.shape))
            inputs = (logp, entropy) if self.uses_entropy else (logp,)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        g = [torch.zeros_like(self.logp) if x is None else x for x in grads]
        return TokenGrad(g[0][pos], g[1][pos] if self.uses_entropy else None)


class PolicyLoss(NamedTuple):
    """A GRPO/PPO loss for :func:`_policy_head_loss`: ``loss_fn(logp, entropy) -> (loss, metrics)``
    on ``[B, T]`` per-token tensors; ``probe_fn`` the same loss as the three-GEMM probe evaluates it
    (detached side inputs); ``old_logp`` / ``mask`` fill the probe; ``uses_entropy``: the loss
    depends on the entropy."""

    loss_fn: object
    probe_fn: object
    old_logp: torch.Tensor | None
    mask: torch.Tensor
    uses_entropy: bool

    def validate(self, shape, dtype, device):
        """The loss's own argument checks (shapes, devices, dtypes, counts, hyper-parameters -- each
        named), before any head runs and whichever head path follows: the loss evaluated once on
        placeholder per-token tensors, without gradient (O(B·T))."""
        placeholder = torch.zeros(shape, dtype=dtype, device=device)
        # the CPU generator is restored: a loss that draws random numbers (verl's clip_cov) draws
        # the same ones in the real evaluation as without this check
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            self.probe_fn(placeholder, placeholder)


def _policy_head_loss(backends: OpBackends, hidden, weight, token_ids, policy: PolicyLoss, *, reason, head_path,
                      bias, head: HeadOptions, ignore_index):  # fmt: skip
    """GRPO / PPO from hidden states: masked tokens become ``ignore_index`` (never projected), then
    the three-GEMM head (``reason`` None: token-separable) or ``linear_logprobs`` + autograd.
    Every input is checked first, the same way on both paths. Returns ``(loss, metrics)`` with
    ``metrics["head_path"]``."""
    path = _resolve_head_path(head_path, backends.op, reason)
    tr, labels, adapter = _head_inputs(hidden, weight, token_ids, bias, head)
    policy.validate(labels.shape, output_dtype(hidden.dtype), hidden.device)
    labels = _masked_labels(labels, policy.mask, ignore_index)
    if labels_checking_enabled(head.check_labels):
        check_label_range(labels, weight.shape[0], ignore_index)
    backend = backends.resolve(head.backend, hidden.device, hidden.dtype)
    check_batch_invariant_head(head.batch_invariant, backend)
    if path == "four_gemm" or backend == "reference":
        logp, entropy = linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, return_entropy=True,
                                        bias=bias, **head.keywords(check_labels=False))  # fmt: skip
        loss, metrics = policy.loss_fn(logp, entropy)
        metrics["head_path"] = "four_gemm"
        return loss, metrics
    compact = compact_rows(hidden, labels, ignore_index)
    fill = _fill_logp(policy.old_logp, policy.mask, hidden)
    probe = LossProbe(policy.probe_fn, compact.rows, labels.shape, fill, policy.uses_entropy)
    out, call = _run_head(backends.op, compact, weight, bias, adapter, tr, probe, backend, head)
    logp, entropy = compact.expand(out.logp.to(fill.dtype)), compact.expand(out.entropy.to(fill.dtype))
    loss, metrics = policy.loss_fn(logp, entropy)
    if call is not None:
        loss = _attach(loss, compact, weight, bias, adapter, call)
    metrics["head_path"] = "three_gemm"
    return loss, metrics


def _resolve_head_path(head_path, op, reason):
    """``reason``: why the configuration is not token-separable (None: it is)."""
    if head_path not in HEAD_PATHS:
        raise ValueError(f"head_path must be one of {HEAD_PATHS}, got {head_path!r}")
    if head_path == "three_gemm" and reason is not None:
        raise ValueError(f"{op}: head_path='three_gemm' needs a token-separable loss, but {reason}")
    if head_path == "auto":
        return "three_gemm" if reason is None else "four_gemm"
    return head_path


def grpo_non_separable_reason(config) -> str | None:
    """Why a ``grpo_loss`` configuration (a ``PolicyConfig``, or ``grpo_loss``'s keywords) makes the
    gradient w.r.t. a token's log-prob depend on other tokens (then the three-GEMM head cannot form
    it per chunk), or None."""
    if not isinstance(config, PolicyConfig):
        options = dict(config)
        config = typed_value("config", PolicyConfig, options.pop("config", None), options)
    if config.importance_sampling_level != "token":
        return "importance_sampling_level='sequence' (GSPO) has one ratio per sequence"
    loss_type = config.loss_type
    row = POLICY_LOSS_TYPES.get(loss_type) if isinstance(loss_type, str) else None
    if row is not None and not row.token_separable:  # an unknown name: grpo_loss's own error, later
        return f"loss_type={loss_type!r} {row.not_separable}"
    if config.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1 masks tokens by a quantile over all tokens' entropies"
    if config.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold masks sequences by their mean log-ratio"
    return None


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
    ignore_index: int = -100,
    head_path: str = "auto",
    head: HeadOptions | None = None,
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
        head: a :class:`HeadOptions` (``temperature``, ``logit_scale``, ``softcap``, ``chunk_size``,
            ``backend``, ``check_labels``, ``lora``, ``head_precision``; see ``linear_logprobs``), or
            its fields as keywords (not both). ``lora``: ``(lora_A [r, H], lora_B [V, r], scaling)``, a
            LoRA adapter on the policy's head, on either path (three GEMMs:
            ``alignkernels.ops._lora.LoraConcat``), never applied to ``ref_hidden``'s reference head.
        **grpo_kwargs: ``config`` or its fields (``beta``, ``epsilon_low``, ``epsilon_high``,
            ``delta``, ``loss_type``, ``importance_sampling_level``, ...), ``state`` or its fields
            (``max_completion_length``, ``num_items_in_batch``, ...), exactly as
            :func:`alignkernels.grpo_loss`.
        head_path: ``"auto"`` (the table below), ``"three_gemm"`` (an error where not exact) or
            ``"four_gemm"``.

    Head path (``metrics["head_path"]``), with ``"auto"``:

    ========================================================  ==============  =========================
    configuration                                             path            why
    ========================================================  ==============  =========================
    ``importance_sampling_level="token"`` with ``grpo``,      ``three_gemm``  ∂L/∂logp_t, ∂L/∂H_t depend
    ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,                     on token t only; the
    ``luspo``; any ``beta`` (k3 KL vs ``ref_logp`` /                          normalisers (count per
    ``ref_hidden``), ``delta``, ``entropy_coef``,                             row, Σ count, B·max len,
    ``importance_sampling_ratio``, ``num_items_in_batch``                     num_items) come from the
                                                                              mask
    ``importance_sampling_level="sequence"`` (GSPO)           ``four_gemm``   one ratio per sequence
    ``loss_type="vespo"``                                     ``four_gemm``   sequence weights φ(w)
    ``top_entropy_quantile < 1``                              ``four_gemm``   quantile over all tokens
    ``off_policy_mask_threshold``                             ``four_gemm``   sequence mean log-ratio
    ``backend="reference"``                                   ``four_gemm``   eager baseline
    ========================================================  ==============  =========================

    Every input (the head's and ``grpo_loss``'s) is checked before the head runs, the same way on
    both paths. The three-GEMM path under autograd modes: as :func:`fused_linear_cross_entropy`
    (forward only without grad, a second backward recomputes, ``create_graph=True`` an error;
    ``torch.compile`` works without ``fullgraph``: the per-chunk loss gradient breaks the graph).

    Returns:
        ``(loss, metrics)`` from ``grpo_loss`` (its ``entropy`` metric included) plus
        ``metrics["head_path"]`` (a string: ``"three_gemm"`` or ``"four_gemm"``).
    """
    head = HeadOptions.of("fused_linear_grpo_loss", head, grpo_kwargs)
    if ref_logp is None and ref_hidden is not None:
        ref_logp = _reference_token_logps(ref_hidden, _masked_labels(completion_ids, completion_mask, ignore_index),
                                          weight=weight, bias=bias, ref_weight=ref_weight, ref_bias=ref_bias, head=head,
                                          ignore_index=ignore_index)  # fmt: skip
    config = typed_value("config", PolicyConfig, grpo_kwargs.pop("config", None), grpo_kwargs)

    def loss_fn(logp, entropy):
        return grpo_loss(logp, old_logp, ref_logp, advantages, completion_mask, entropy=entropy, config=config,
                         **grpo_kwargs)  # fmt: skip

    policy = PolicyLoss(loss_fn, loss_fn, old_logp, completion_mask, config.entropy_coef != 0.0)
    return _policy_head_loss(FUSED_LINEAR_GRPO_LOSS, hidden, weight, completion_ids, policy,
                             reason=grpo_non_separable_reason(config), head_path=head_path, bias=bias, head=head,
                             ignore_index=ignore_index)  # fmt: skip


def _fill_logp(old_logp, mask, hidden):
    """What the probe's ``[B, T]`` log-probs hold before a token's chunk is done: the sampling
    log-probs where given (ratio 1), else 0."""
    cd = output_dtype(hidden.dtype)
    if old_logp is not None:
        return old_logp.detach().to(cd).masked_fill(mask == 0, 0.0)
    return torch.zeros(mask.shape, dtype=cd, device=hidden.device)


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
    ignore_index: int = -100,
    head: HeadOptions | None = None,
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
        head: a :class:`HeadOptions` or its fields as keywords (not both), as
            :func:`fused_linear_grpo_loss`.
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
    head = HeadOptions.of("fused_linear_dpo_loss", head, dpo_kwargs)
    out = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, return_stats=True,
                          **head.keywords())  # fmt: skip
    B = labels.shape[0] // 2
    mask = labels != ignore_index
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None:
        if ref_hidden is None:
            raise ValueError("fused_linear_dpo_loss needs ref_chosen_logps/ref_rejected_logps or ref_hidden")
        ref = _reference_token_logps(ref_hidden, labels, weight=weight, bias=bias, ref_weight=ref_weight,
                                     ref_bias=ref_bias, head=head, ignore_index=ignore_index)  # fmt: skip
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
    ignore_index: int = -100,
    head_path: str = "auto",
    head: HeadOptions | None = None,
    **ppo_kwargs,
):
    """PPO policy (+ value) loss straight from the policy's last hidden states.

    The per-token log-probs and entropies of the valid response tokens, then
    :func:`alignkernels.ppo_loss` (``config`` or its fields: ``cliprange``, ``cliprange_value``,
    ``vf_coef``, ``entropy_coef``, ``loss_agg_mode``, ...). Head options: ``head=HeadOptions(...)`` or
    its fields as keywords, as :func:`fused_linear_grpo_loss`. ``hidden`` is ``[B, T, H]`` aligned with ``response_ids`` ``[B, T]``;
    ``values``/``old_values``/``returns`` are the value head's ``[B, T]`` tensors (the value head
    itself is cheap and stays in the caller's model; it gets its gradient through autograd).

    Head path (``metrics["head_path"]``): every ``ppo_loss`` configuration is token-separable (the
    clipped policy term and the entropy bonus are per token, every ``loss_agg_mode`` normalises by
    mask counts), so ``"auto"`` takes ``"three_gemm"`` (``backend="reference"``: ``"four_gemm"``,
    the eager baseline); ``head_path="four_gemm"`` forces ``linear_logprobs`` + autograd. Inputs are
    checked, and autograd modes behave, as in :func:`fused_linear_grpo_loss`.
    """
    head = HeadOptions.of("fused_linear_ppo_loss", head, ppo_kwargs)
    detached_values = [None if v is None else v.detach() for v in (values, old_values, returns)]
    config = typed_value("config", PPOConfig, ppo_kwargs.pop("config", None), ppo_kwargs)

    def loss_fn(logp, entropy, value_tensors=(values, old_values, returns)):
        return ppo_loss(logp, old_logp, advantages, mask, *value_tensors, entropy=entropy, config=config,
                        **ppo_kwargs)  # fmt: skip

    def probe_fn(logp, entropy):  # the value head gets its gradient from the final loss only
        return loss_fn(logp, entropy, detached_values)

    policy = PolicyLoss(loss_fn, probe_fn, old_logp, mask, config.entropy_coef != 0.0)
    return _policy_head_loss(FUSED_LINEAR_PPO_LOSS, hidden, weight, response_ids, policy, reason=None,
                             head_path=head_path, bias=bias, head=head, ignore_index=ignore_index)


def fused_linear_verl_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    response_ids: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    head_path: str = "auto",
    head: HeadOptions | None = None,
    **verl_kwargs,
):
    """verl's policy loss (:func:`alignkernels.losses.verl_policy.verl_policy_loss`, ``loss_mode``,
    ``config`` / its fields, ``loss_agg_mode``, ``rollout_is_weights``, ``global_batch``) straight
    from the policy's last hidden states; head arguments as :func:`fused_linear_ppo_loss`.

    Head path (``metrics["head_path"]``): ``"auto"`` takes ``"three_gemm"`` for the rows of
    ``VERL_POLICY_LOSSES`` that are token-separable (``not_separable`` None: ``vanilla``, ``sapo``,
    ``gpg``, ``dro``, ``cispo``, ``dppo_tv``, ``dppo_kl``) and ``"four_gemm"`` for the others
    (``gspo``, ``geo_mean``: sequence ratios; ``clip_cov``, ``kl_cov``: batch covariances).

    Entropy bonus: with ``entropy_coeff != 0`` (a keyword or ``config.entropy_coeff``) the head's own
    per-token entropy, from the same pass, is ``verl_policy_loss(entropy=)`` (differentiable; on the
    three-GEMM head its gradient is formed per chunk with the log-prob's); ``entropy=`` is refused.
    """
    if "entropy" in verl_kwargs:
        raise ValueError("entropy: fused_linear_verl_policy_loss computes the entropy from the lm head; set "
                         "entropy_coeff (or config.entropy_coeff) instead of passing entropy=")  # fmt: skip
    config = verl_kwargs.get("config")
    coeff = config.entropy_coeff if isinstance(config, VerlPolicyConfig) else verl_kwargs.get("entropy_coeff", 0.0)
    with_entropy = coeff != 0.0  # a bad value reaches verl_policy_loss, which names it
    head = HeadOptions.of("fused_linear_verl_policy_loss", head, verl_kwargs)
    loss_mode = verl_kwargs.get("loss_mode", "vanilla")
    row = VERL_POLICY_LOSSES.get(loss_mode) if isinstance(loss_mode, str) else None
    reason = None if row is None or row.token_separable else f"loss_mode={loss_mode!r} {row.not_separable}"

    def loss_fn(logp, entropy):
        return verl_policy_loss(logp, old_logp, advantages, mask, entropy=entropy if with_entropy else None,
                                **verl_kwargs)  # fmt: skip

    policy = PolicyLoss(loss_fn, loss_fn, old_logp, mask, with_entropy)
    return _policy_head_loss(FUSED_LINEAR_VERL_POLICY_LOSS, hidden, weight, response_ids, policy, reason=reason,
                             head_path=head_path, bias=bias, head=head, ignore_index=ignore_index)  # fmt: skip
