"""Hugging Face ``transformers`` drop-in: per-token log-probs of a causal LM without ``[B, T, V]`` logits.

``patch_causal_lm(model)`` gives a causal LM (plain or PEFT-wrapped) a second forward mode::

    patch_causal_lm(model, temperature=0.7)
    out = model(input_ids, attention_mask=mask, labels=labels, return_token_logprobs=True)
    out.logprobs, out.entropy      # [B, T-1] fp32, 0 where the shifted label is -100

The backbone runs as usual; its last hidden state goes straight into
:func:`alignkernels.linear_logprobs` together with the model's own ``lm_head`` weight (and bias),
so the ``[B, T, V]`` logits, their softmax and their gradient never exist in full. The logit
transform the model applies after its ``lm_head`` (Cohere's ``logit_scale``, Granite's
``logits_scaling``, Gemma's ``final_logit_softcapping``) is read from the config exactly like
TRL's ``add_fused_lm_head`` reads it, and checked against an allow-list of model families whose
``forward`` is known to compute ``transform(lm_head(hidden))`` and nothing else. A family outside
the list, an ``lm_head`` carrying a PEFT adapter other than one plain LoRA adapter, or a quantized
head raises :class:`UnsupportedModelError` when the model is patched, never later. A PEFT LoRA
adapter on ``lm_head`` (one active adapter, dropout 0, no DoRA, not merged:
:mod:`alignkernels.integrations.lora_head`) is fused: ``linear_logprobs(..., lora=(A, B, scaling))``.

Without ``return_token_logprobs=True`` the forward is the original one, so ``generate`` and
ordinary training are unchanged. ``unpatch_causal_lm(model)`` restores it. The patch is an object
on the instance (:class:`CausalLMForward`), not a closure: a ``copy.deepcopy`` or a pickled copy
of a patched model is patched too and runs its own weights on every path
(:mod:`alignkernels.integrations.forward_patch`).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ModelOutput

from alignkernels._utils import BACKENDS, check_temperature
from alignkernels.ops.linear_logprobs import LinearLogprobsOutput, linear_logprobs
from alignkernels.integrations.forward_patch import InstanceForward
from alignkernels.integrations.lora_head import HeadLora, base_layer, is_peft_tuner_layer, lora_of_head, lora_operands
from alignkernels.ops.vocab_parallel import gather_lm_head

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "LogitTransform",
    "TokenLogprobsOutput",
    "logit_transform",
    "check_supported",
    "causal_lm_logprobs",
    "head_logprobs",
    "patch_causal_lm",
    "unpatch_causal_lm",
    "unwrap_model",
    "is_zero3_partitioned",
    "CausalLMForward",
]

# Model families whose causal-LM forward is `transform(lm_head(last_hidden_state))` with the
# transform read by `logit_transform`; every one is checked against the model's own logits by a
# tiny random model in tests/test_integration_transformers.py.
SUPPORTED_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",  # final_logit_softcapping
        "gemma3_text",  # final_logit_softcapping, tied embeddings
        "gpt2",  # tied embeddings, base_model_prefix "transformer"
        "phi",  # lm_head bias
        "phi3",
        "olmo2",
        "cohere",  # logit_scale, tied embeddings
        "granite",  # logits_scaling (divides)
        "starcoder2",
    }
)

class UnsupportedModelError(ValueError):
    """The model's logits cannot be reproduced from ``lm_head.weight`` by :func:`linear_logprobs`."""


@dataclass(frozen=True)
class LogitTransform:
    """``z = logit_scale * (h @ W.T + b)``; ``z = softcap * tanh(z / softcap)`` if softcap; ``z / T``."""

    logit_scale: float = 1.0
    softcap: float | None = None


@dataclass
class TokenLogprobsOutput(ModelOutput):
    """What the patched forward returns with ``return_token_logprobs=True``.

    ``logprobs`` / ``entropy``: fp32 ``[B, T-1]`` (``[B, T]`` with ``shift_labels``), 0 where the
    label is ``ignore_index``. ``label_mask``: where the label is scored. ``loss``: the mean
    negative log-likelihood over scored tokens (``sum / num_items_in_batch`` when given), i.e. the
    model's own ``loss`` at temperature 1. A transformers ``ModelOutput`` (like every model output):
    wrappers that look for the tensors a forward returns find them — DeepSpeed ZeRO-3 arms its
    backward hooks from them, and without them the lm_head gradient meets an already re-partitioned
    parameter.
    """

    loss: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


def unwrap_model(model):
    """The ``PreTrainedModel`` under PEFT (``get_base_model``) and DDP/accelerate (``.module``) wrappers."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a transformers PreTrainedModel, possibly PEFT- or DDP-wrapped), "
            f"got {type(model).__name__}"
        )
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is not model:
                model = inner
                continue
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module")
        ):
            model = model.module
            continue
        break
    return model


def logit_transform(config) -> LogitTransform:
    """The post-``lm_head`` logit transform of a model config, read the way TRL's fused head reads it.

    ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) multiply;
    ``logits_scaling`` (Granite) divides, except for HyperCLOVA X where it multiplies;
    ``final_logit_softcapping`` (Gemma 2/3) caps. Multimodal configs are read through
    ``get_text_config()``.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    scale = 1.0 if scale is None else float(scale)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LogitTransform(logit_scale=scale, softcap=None if softcap is None else float(softcap))


def _model_type(model) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "model_type", None)


def _lm_head(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "patch a *ForCausalLM model"
        )
    return head


def check_supported(model, *, allow_unknown_models: bool = False, require_lm_head: bool = True,
                    allow_lora_lm_head: bool = False) -> None:  # fmt: skip
    """Raise :class:`UnsupportedModelError` unless the fused head reproduces ``model``'s logits exactly.

    Checked: the model family is in :data:`SUPPORTED_MODEL_TYPES` (skip with
    ``allow_unknown_models=True`` once you have checked that the family's ``forward`` computes
    ``transform(lm_head(hidden))``); the ``lm_head`` carries no PEFT adapter (LoRA / DoRA / IA3 on
    the head: its update would be ignored); the head weight is a floating ``[V, H]`` matrix (not a
    quantized one) and the bias, if any, is ``[V]``. ``require_lm_head=False`` checks the family
    only (sequence-classification models). ``allow_lora_lm_head=True`` accepts a plain PEFT LoRA
    adapter on the head (:func:`alignkernels.integrations.lora_head.lora_of_head` lists what is
    refused) and checks its base layer.
    """
    base = unwrap_model(model)
    model_type = _model_type(base)
    if not allow_unknown_models and model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model family {model_type!r} ({type(base).__name__}) is not in alignkernels' supported list "
            f"{sorted(SUPPORTED_MODEL_TYPES)}; if its forward computes logits as "
            "transform(lm_head(last_hidden_state)) with the transform read from the config "
            "(logit_scale / logits_scaling / final_logit_softcapping), pass allow_unknown_models=True"
        )
    if not require_lm_head:
        return
    head = _lm_head(base)
    if is_peft_tuner_layer(head):
        if not allow_lora_lm_head:
            raise UnsupportedModelError(
                "the lm_head carries a PEFT adapter (e.g. LoRA with target_modules including 'lm_head'); "
                "a fused head that reads lm_head.weight directly would silently ignore the adapter. "
                "A plain LoRA adapter (one active, dropout 0, no DoRA, not merged) is fused by patch_causal_lm "
                "and by alignkernels.integrations.trl.apply(allow_lora_lm_head=True); otherwise leave lm_head "
                "out of target_modules (use modules_to_save=['lm_head'] to train it fully)"
            )
        lora_of_head(head, UnsupportedModelError)  # refuses dropout, DoRA, several adapters, merged, ...
        head = base_layer(head)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise UnsupportedModelError(
            f"lm_head ({type(head).__name__}) has no floating-point weight tensor "
            f"(got {None if weight is None else weight.dtype}); quantized heads are not supported"
        )
    shape = tuple(weight.ds_shape) if is_zero3_partitioned(weight) else tuple(weight.shape)
    if len(shape) != 2:
        raise UnsupportedModelError(f"lm_head weight must be [vocab, hidden], got shape {shape}")
    bias = getattr(head, "bias", None)
    if bias is not None:
        bshape = tuple(bias.ds_shape) if hasattr(bias, "ds_shape") else tuple(bias.shape)
        if bshape != (shape[0],):
            raise UnsupportedModelError(f"lm_head bias must be [vocab]={shape[0]}, got shape {bshape}")


def _head_tensors(head):
    """The head's ``(weight, bias)`` as plain tensors: an FSDP2 DTensor (the head sharded as its own
    unit, so its parameters stay sharded in the model's forward) is all-gathered once, with its
    gradient reduce-scattered back averaged over ranks as FSDP2 reduces every other gradient
    (:func:`alignkernels.ops.vocab_parallel.gather_lm_head`). Inside the head's own FSDP unit the
    parameters are already plain tensors and pass through."""
    bias = head.bias if isinstance(getattr(head, "bias", None), torch.Tensor) else None
    return gather_lm_head(head.weight, bias, grad_reduce="avg")


def is_zero3_partitioned(*params) -> bool:
    """Whether any of ``params`` is a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_shape``)."""
    return any(p is not None and hasattr(p, "ds_shape") for p in params)


def _zero3_gather(*params):
    """DeepSpeed ZeRO-3: gather the partitioned head for a direct read (TRL's helper), else a no-op."""
    if not is_zero3_partitioned(*params):
        return nullcontext()
    from trl.trainer.utils import maybe_gather_lm_head_ctx  # trl is optional: only ZeRO-3 runs reach this

    return maybe_gather_lm_head_ctx(*params)


class _RegatherHeadInBackward(torch.autograd.Function):
    """Run ``compute(hidden, weight, bias)`` without keeping its graph; redo it in backward.

    Under DeepSpeed ZeRO-3 the ``lm_head`` parameters are partitioned again as soon as the forward
    leaves the gather context, so a backward that reads the saved weight would see an empty
    tensor. Like TRL's ``ChunkedLogProbFunction``, this re-enters the gather in backward and
    recomputes (the fused op saves nothing bigger than ``[N]`` anyway, so the cost is one more
    head pass). ``compute`` returns a tuple whose first two entries (log-probs, entropy) are
    differentiable and the rest are statistics without gradient.
    """

    @staticmethod
    def forward(ctx, compute, gather_params, hidden, weight, bias):
        with torch.no_grad():
            outputs = tuple(compute(hidden, weight, bias))
        ctx.compute, ctx.gather_params = compute, gather_params
        # parameters are kept by reference (not save_for_backward): ZeRO-3 swaps their .data
        ctx.hidden, ctx.weight, ctx.bias = hidden, weight, bias
        ctx.mark_non_differentiable(*(o for o in outputs[2:] if isinstance(o, torch.Tensor)))
        return outputs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        needs = ctx.needs_input_grad[2:5]
        with _zero3_gather(*ctx.gather_params), torch.enable_grad():
            leaves = [
                None if t is None else t.detach().requires_grad_(need)
                for t, need in zip((ctx.hidden, ctx.weight, ctx.bias), needs)
            ]
            outputs = ctx.compute(*leaves)
            pairs = [
                (o, g)
                for o, g in zip(outputs[:2], (grad_logprobs, grad_entropy))
                if o is not None and g is not None and o.requires_grad
            ]
            wanted = [t for t, need in zip(leaves, needs) if t is not None and need]
            grads = iter(
                torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                if pairs and wanted
                else [None] * len(wanted)
            )
        result = [next(grads) if (t is not None and need) else None for t, need in zip(leaves, needs)]
        return (None, None, *result)


def head_logprobs(
    hidden,
    weight,
    bias,
    targets,
    *,
    temperature=1.0,
    transform: LogitTransform = LogitTransform(),
    ignore_index=-100,
    return_entropy=True,
    return_stats=False,
    chunk_size=None,
    vocab_block_size=None,
    backend="auto",
    compute_dtype=None,
    gather_params=(),
    recompute_in_backward=None,
    check_labels=None,
    lora: HeadLora | None = None,
    head_precision="input",
    batch_invariant=False,
):
    """``linear_logprobs`` of an ``lm_head``: ``(logp, entropy)`` or the full ``LinearLogprobsOutput``.

    The one call both drop-ins make. ``entropy`` is ``None`` when neither ``return_entropy`` nor
    ``return_stats`` asks for it (it is then not computed). ``compute_dtype`` (the autocast dtype) casts hidden, weight
    and bias before the matmul, differentiably. ``chunk_size`` / ``vocab_block_size``: token rows /
    vocabulary columns of the logits tile. ``gather_params`` are the head's parameters as
    modules hold them; when they are ZeRO-3 partitioned (or ``recompute_in_backward=True``) the
    call goes through :class:`_RegatherHeadInBackward` so backward gathers them again.
    """
    def compute(h, w, b):
        if compute_dtype is not None:
            h, w = h.to(compute_dtype), w.to(compute_dtype)
            b = None if b is None else b.to(compute_dtype)
        lora_arg = lora_operands(lora, w.dtype)  # gathered (FSDP2), in the head's compute dtype, differentiably
        out = linear_logprobs(
            h,
            w,
            targets,
            bias=b,
            temperature=temperature,
            logit_scale=transform.logit_scale,
            softcap=transform.softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            return_stats=return_stats,
            chunk_size=chunk_size,
            vocab_block_size=vocab_block_size,
            backend=backend,
            check_labels=check_labels,
            lora=lora_arg,
            head_precision=head_precision,
            batch_invariant=batch_invariant,
        )
        if return_stats:
            return tuple(out)
        return tuple(out) if return_entropy else (out, None)

    if recompute_in_backward is None:
        recompute_in_backward = is_zero3_partitioned(*gather_params)
    if recompute_in_backward and lora is not None:
        raise UnsupportedModelError(
            "LoRA on a DeepSpeed ZeRO-3 partitioned lm_head is not supported by the fused head (the regather-in-"
            "backward path has no adapter gradients); leave lm_head out of target_modules under ZeRO-3"
        )
    if recompute_in_backward:
        with _zero3_gather(*gather_params):
            outputs = _RegatherHeadInBackward.apply(compute, tuple(gather_params), hidden, weight, bias)
    else:
        with _zero3_gather(*gather_params):
            outputs = compute(hidden, weight, bias)
    if return_stats:
        return LinearLogprobsOutput(*outputs)
    return outputs[0], outputs[1]


def causal_lm_logprobs(
    model,
    input_ids=None,
    labels=None,
    *,
    shift_labels=None,
    logits_to_keep: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    num_items_in_batch=None,
    chunk_size=None,
    backend: str = "auto",
    **backbone_kwargs,
) -> TokenLogprobsOutput:
    """Per-token log-probs (and entropy) of ``labels`` under ``model``, from its last hidden state.

    ``labels`` ``[B, T]`` are next-token shifted here (``hidden[:, :-1]`` scores ``labels[:, 1:]``)
    as in Hugging Face's causal-LM loss; pass pre-shifted ``shift_labels`` ``[B, T]`` instead to
    score every position. ``logits_to_keep=k`` (with ``labels``) scores only the last ``k`` tokens
    (``labels[:, -k:]``, e.g. a GRPO completion) and returns ``[B, k]``. ``temperature`` divides the
    transformed logits. ``backbone_kwargs``
    (``attention_mask``, ``position_ids``, ``inputs_embeds``, ...) go to the backbone. The head runs
    through :func:`alignkernels.linear_logprobs`: ``[B, T, V]`` logits are never materialised, and
    only scored positions cost FLOPs. Call it on the unwrapped model only outside DDP/FSDP; under
    those wrappers call the patched ``model(..., return_token_logprobs=True)`` so their hooks run.
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels (unshifted, [B, T]) or shift_labels ([B, T], pre-shifted)")
    base = unwrap_model(model)
    transform = logit_transform(base.config)
    backbone_kwargs["use_cache"] = False
    backbone_kwargs.pop("return_dict", None)
    backbone = base.base_model
    outputs = backbone(input_ids, **backbone_kwargs) if input_ids is not None else backbone(**backbone_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if shift_labels is None:
        if logits_to_keep:
            k = int(logits_to_keep)
            if not 0 < k < labels.shape[1]:
                raise ValueError(f"logits_to_keep must be in [1, T-1]={labels.shape[1] - 1}, got {k}")
            hidden, targets = hidden[:, -(k + 1) : -1], labels[:, -k:]
        else:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        if logits_to_keep:
            raise ValueError("logits_to_keep applies to labels, not shift_labels")
        hidden, targets = hidden, shift_labels
    head = _lm_head(base)
    lora = lora_of_head(head, UnsupportedModelError)  # read per call: disable_adapter() / set_adapter() honoured
    head = base_layer(head)
    weight, bias = _head_tensors(head)
    hidden = hidden.to(weight.device)
    targets = targets.to(weight.device)
    # under autocast the head matmul runs in the autocast dtype, as lm_head(hidden) would
    compute_dtype = None
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    logprobs, entropy = head_logprobs(
        hidden,
        weight,
        bias,
        targets,
        temperature=temperature,
        transform=transform,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        backend=backend,
        compute_dtype=compute_dtype,
        gather_params=(head.weight, getattr(head, "bias", None)),
        lora=lora,
    )
    mask = targets != ignore_index
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -logprobs.sum() / denom
    return TokenLogprobsOutput(loss=loss, logprobs=logprobs, entropy=entropy, label_mask=mask)


class CausalLMForward(InstanceForward):
    """The forward :func:`patch_causal_lm` sets on a model instance (survives ``copy.deepcopy`` and ``pickle``).

    ``return_token_logprobs=True`` runs :func:`causal_lm_logprobs` on the instance it belongs to;
    anything else runs the forward it replaced, unchanged.
    """

    def __init__(self, module, previous=None, temperature: float = 1.0, backend: str = "auto"):
        super().__init__(module, previous)
        self.temperature = temperature
        self.backend = backend

    def __call__(self, *args, return_token_logprobs=False, temperature=None, **kwargs):
        if not return_token_logprobs:
            return self.original(*args, **kwargs)
        labels = kwargs.pop("labels", None)
        input_ids = kwargs.pop("input_ids", None)
        if args:
            if input_ids is not None:
                raise TypeError("input_ids was passed both positionally and by keyword")
            input_ids, args = args[0], args[1:]
            if args:
                raise TypeError("pass everything but input_ids by keyword with return_token_logprobs=True")
        return causal_lm_logprobs(
            self.module,
            input_ids,
            labels,
            temperature=self.temperature if temperature is None else check_temperature(temperature),
            backend=self.backend,
            **kwargs,
        )


def patch_causal_lm(model, *, temperature: float = 1.0, allow_unknown_models: bool = False, backend: str = "auto"):
    """Let ``model(..., labels=labels, return_token_logprobs=True)`` return a :class:`TokenLogprobsOutput`.

    ``model`` is a ``*ForCausalLM`` (or a PEFT model around one: the base model is patched, so the
    PEFT wrapper's forward reaches it). ``temperature`` is the default; a call may override it with
    ``temperature=...``. The forward is patched on the instance (not the class), so DDP/FSDP
    wrappers applied afterwards still run their hooks around it; without
    ``return_token_logprobs=True`` the original forward runs unchanged. The patch is a
    :class:`CausalLMForward` object, so ``copy.deepcopy(model)`` (e.g. TRL's
    ``create_reference_model``) and ``pickle`` give a patched copy that runs *its own* weights on
    every path; ``save_pretrained`` stores weights only (a reloaded model is unpatched). Raises
    :class:`UnsupportedModelError` (a ``ValueError``) for configurations listed in
    :func:`check_supported`. Returns ``model``. Patching twice keeps one patch and updates
    ``temperature`` and ``backend``.
    """
    default_temperature = check_temperature(temperature)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_supported(model, allow_unknown_models=allow_unknown_models, allow_lora_lm_head=True)
    patched = CausalLMForward.install(unwrap_model(model), temperature=default_temperature, backend=backend)
    patched.temperature, patched.backend = default_temperature, backend
    return model


def unpatch_causal_lm(model):
    """Undo :func:`patch_causal_lm` (restores the forward it found). Returns ``model``."""
    CausalLMForward.uninstall(unwrap_model(model))
    return model
