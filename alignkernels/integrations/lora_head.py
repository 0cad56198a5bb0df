"""A PEFT LoRA adapter on ``lm_head``, routed through ``linear_logprobs(..., lora=(A, B, scaling))``.

PEFT replaces a targeted ``lm_head`` by ``peft.tuners.lora.Linear``: ``base_layer`` (the original
``nn.Linear``) plus, per adapter, ``lora_A`` / ``lora_B`` linears, ``lora_dropout`` and ``scaling``; its
forward is ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` for each active adapter. That is
exactly the fused op's LoRA form when:

- the layer is a LoRA ``Linear`` (not IA3, LoHa, ... and not a quantized LoRA layer),
- exactly one adapter is active and it is a plain LoRA adapter of this layer (no DoRA, no LoRA bias,
  no other variant, not ``fan_in_fan_out``),
- its dropout is 0 (``nn.Identity``: dropout would make the logits random, unlike a deterministic
  tile recompute in backward),
- it is not merged into the base weight (then ``base_layer.weight`` already holds ``W + s·B·A``;
  unmerge it, or drop the adapter from ``target_modules`` after merging).

Anything else raises :class:`UnsupportedModelError` naming what to change. With the adapters
disabled (PEFT's ``disable_adapter()`` context, as TRL's reference pass of a PEFT policy) the head is
the base layer alone and no LoRA term is added.

:func:`lora_of_head` reads the adapter at call time (so ``disable_adapter`` / ``set_adapter`` are
honoured on every call); :func:`routed_lora` hands it to TRL's fused-head call, whose
``ChunkedLogProbFunction`` receives only ``lm_head.weight`` (see ``integrations.trl``).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch

from alignkernels.ops.vocab_parallel import gather_lm_head

__all__ = ["HeadLora", "is_peft_tuner_layer", "is_lora_linear", "base_layer", "lora_of_head", "routed_lora",
           "lora_for_weight", "lora_operands"]  # fmt: skip


class HeadLora(NamedTuple):
    """The active adapter of a LoRA lm_head: ``lora_A [r, H]``, ``lora_B [V, r]`` (parameters as the
    module holds them) and PEFT's ``scaling``; ``name`` is the adapter's name."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    name: str


def _lora_linear_class():
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # peft is an optional dependency: without it no head carries an adapter
        return None
    return Linear


def is_peft_tuner_layer(module) -> bool:
    """Whether ``module`` is wrapped by any PEFT tuner (LoRA, DoRA, IA3, ...)."""
    return hasattr(module, "base_layer") or hasattr(module, "lora_A") or hasattr(module, "ia3_l")


def is_lora_linear(module) -> bool:
    """Whether ``module`` is a PEFT LoRA ``Linear`` (``peft.tuners.lora.Linear``, exactly that class)."""
    cls = _lora_linear_class()
    return cls is not None and type(module) is cls


def base_layer(head):
    """The ``nn.Linear`` under a PEFT tuner layer; ``head`` itself when it is not wrapped."""
    get = getattr(head, "get_base_layer", None)
    return get() if callable(get) else head


def lora_of_head(head, error=ValueError) -> HeadLora | None:
    """The adapter to fuse for a PEFT-wrapped ``head`` (``None``: adapters disabled, or no tuner at
    all). Raises ``error`` (the integrations pass their ``UnsupportedModelError``) for a tuner layer
    the fused LoRA form does not reproduce exactly."""
    if not is_peft_tuner_layer(head):
        return None
    if not is_lora_linear(head):
        raise error(
            f"the lm_head carries a PEFT adapter of type {type(head).__module__}.{type(head).__name__}; only a plain "
            "LoRA adapter on an nn.Linear lm_head (peft.tuners.lora.Linear) is fused. Use LoRA on lm_head, or leave "
            "lm_head out of target_modules (modules_to_save=['lm_head'] trains it fully)"
        )
    if getattr(head, "disable_adapters", False):
        return None
    if getattr(head, "merged", False):
        raise error(
            f"the lm_head LoRA adapter(s) {list(getattr(head, 'merged_adapters', []))} are merged into "
            "lm_head.weight; the fused head would add them twice. Unmerge (model.unmerge_adapter()) before training"
        )
    active = list(getattr(head, "active_adapters", []))
    if len(active) != 1:
        raise error(
            f"the lm_head has {len(active)} active LoRA adapters {active}; the fused head supports exactly one "
            "(model.set_adapter(name))"
        )
    name = active[0]
    if name not in head.lora_A:
        raise error(f"the lm_head's active adapter {name!r} is not a LoRA adapter of this layer")
    refusals = (
        (head.use_dora.get(name, False), "uses DoRA (use_dora=True); the magnitude vector is not fused"),
        (getattr(head, "lora_bias", {}).get(name, False), "has a bias on lora_B (lora_bias=True)"),
        (getattr(head, "lora_variant", {}).get(name) is not None, "is a LoRA variant (aLoRA, ...)"),
        (getattr(head, "fan_in_fan_out", False), "is fan_in_fan_out (a Conv1D-style head)"),
        (not isinstance(head.lora_dropout[name], torch.nn.Identity),
         f"has dropout ({head.lora_dropout[name]}); set lora_dropout=0.0 (or exclude lm_head)"),
    )  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise error(f"the lm_head LoRA adapter {name!r} {why}: the fused head cannot reproduce it")
    lora_A, lora_B = head.lora_A[name], head.lora_B[name]
    if not (isinstance(lora_A, torch.nn.Linear) and isinstance(lora_B, torch.nn.Linear)):
        raise error(f"the lm_head LoRA adapter {name!r} has non-Linear lora_A/lora_B ({type(lora_A).__name__})")
    return HeadLora(lora_A.weight, lora_B.weight, float(head.scaling[name]), name)


# --------------------------------------------------------------------------------------------
# Routing through TRL's fused-head call, which hands ChunkedLogProbFunction only lm_head.weight
# --------------------------------------------------------------------------------------------
class _Routed(NamedTuple):
    weight: torch.Tensor  # the base weight TRL will pass (identity-checked)
    lora: HeadLora


_ROUTED: contextvars.ContextVar = contextvars.ContextVar("alignkernels_routed_lora", default=None)


@contextlib.contextmanager
def routed_lora(head, error=ValueError):
    """For the duration of one fused-head forward: remember ``head``'s active adapter keyed by its base
    weight (as it is at this moment: after any FSDP2 gather), so :func:`lora_for_weight` finds it."""
    lora = lora_of_head(head, error)
    if lora is None:
        yield
        return
    token = _ROUTED.set(_Routed(base_layer(head).weight, lora))
    try:
        yield
    finally:
        _ROUTED.reset(token)


def lora_operands(lora: HeadLora | None, dtype: torch.dtype):
    """``lora=`` for the fused ops from a module's adapter: ``(lora_A, lora_B, scaling)`` as plain
    tensors (FSDP2 DTensor shards gathered, gradients averaged back) in the head's compute ``dtype``
    (cast differentiably: PEFT keeps adapters in fp32 next to a half base weight); None passes through."""
    if lora is None:
        return None
    lora_A, lora_B = gather_lm_head(lora.lora_A, lora.lora_B, grad_reduce="avg")
    return lora_A.to(dtype), lora_B.to(dtype), lora.scaling


def lora_for_weight(weight) -> HeadLora | None:
    """The adapter routed for exactly this base ``weight`` tensor, if any."""
    routed = _ROUTED.get()
    return routed.lora if routed is not None and routed.weight is weight else None
