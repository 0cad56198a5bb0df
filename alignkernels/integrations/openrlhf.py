"""OpenRLHF drop-in: one call (or one environment variable in the Ray workers) and OpenRLHF's actor
computes its log-probs and entropies with alignkernels.

    import alignkernels.integrations.openrlhf as ak_openrlhf
    ak_openrlhf.apply()      # in the process that runs the actor (a Ray worker: see below)

The seams (OpenRLHF 0.11.2), rebound by :mod:`alignkernels.integrations.rebind` in every loaded
``openrlhf`` module that binds them (``openrlhf.models.actor`` imports both by name) and in the
defining module ``openrlhf.models.utils`` (so later imports get ours):

- ``log_probs_from_logits(logits, labels, temperature=1.0)`` → :func:`alignkernels.token_logprobs`:
  ``log softmax(logits / T)[label]``, fp32, one pass over the logits, O(chunk x V) extra memory.
  OpenRLHF's divides ``logits`` **in place** when ``T != 1``; ours leaves ``logits`` unchanged
  (``Actor.forward`` divides before calling it and passes ``T = 1``).
- ``compute_entropy(logits)`` → ``token_logprobs(..., return_entropy=True)``: the entropy without
  the ``[N, V]`` softmax OpenRLHF builds (and keeps for backward).

Semantics: OpenRLHF's values and gradients (fp32: ~1e-6 relative, pinned in
``tests/frameworks_integration/test_openrlhf.py`` against OpenRLHF's own functions); outputs are
fp32 whatever the logits dtype (OpenRLHF returns bf16 for bf16 logits).

``apply(fused_forward=True)`` also replaces ``openrlhf.models.actor.Actor.forward`` by
:func:`fused_actor_forward`: the backbone's last hidden state goes straight into
:func:`alignkernels.linear_logprobs` (through
:func:`alignkernels.integrations.transformers.causal_lm_logprobs`, the model's own lm_head and logit
transform), so ``[B, T, V]`` logits never exist; without ``return_entropy`` only the action positions
are scored (the other rows cost no FLOPs). The call still goes through ``actor.model`` — in OpenRLHF
the ``DeepSpeedEngine`` around the model, whose forward registers ZeRO's backward prologue on its
outputs — with the model's forward patched (:func:`~alignkernels.integrations.transformers.patch_causal_lm`)
for that call only. Same outputs as the stock forward: action log-probs
(or all log-probs with ``return_logprobs``), and with ``return_output`` an output carrying ``entropy``
(``[B, T-1]``) but no ``logits``. Calls that ask for the logits (no ``action_mask`` and no
``return_logprobs``: OpenRLHF's generation-side callers) run the stock forward. Refused with
``NotImplementedError`` naming the cause, at the call: packed samples / ring attention
(``packing_samples``), VLM inputs, MoE models that return router logits (their aux loss comes from the
causal-LM forward); a model family outside
:data:`alignkernels.integrations.transformers.SUPPORTED_MODEL_TYPES` raises ``UnsupportedModelError``.

``apply(losses=True)`` also swaps ``PolicyLoss``, ``ValueLoss``, ``DPOLoss`` and ``aggregate_loss``
(:mod:`alignkernels.integrations.openrlhf_losses`; the INFO log line names them and the loss classes left
stock). ``apply(batch_invariant=True)`` reaches the
logits seams (``token_logprobs(batch_invariant=True)``) and the fused ``Actor.forward``
(``linear_logprobs(batch_invariant=True)``); ``head_precision`` other than ``"input"`` needs the
fused ``Actor.forward`` (the logits seams get logits that exist already: ``ValueError`` naming the
seam, see :func:`apply`).

``import openrlhf.models`` needs ``flash_attn`` (``openrlhf/models/ring_attn_utils.py`` imports it
at module level); where it is missing :func:`apply` raises an ``ImportError`` saying so.

Worker processes: :func:`worker_setup` is a Ray ``worker_process_setup_hook`` (applies unless
``ALIGNKERNELS_OPENRLHF=0``); options from ``ALIGNKERNELS_OPENRLHF_BACKEND``,
``ALIGNKERNELS_OPENRLHF_FUSED_FORWARD``, ``ALIGNKERNELS_OPENRLHF_LOSSES``,
``ALIGNKERNELS_OPENRLHF_BATCH_INVARIANT`` and ``ALIGNKERNELS_OPENRLHF_HEAD_PRECISION``
(``docs/INTEGRATION.md``, "OpenRLHF").
"""
from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ModelOutput

from alignkernels.integrations.activation import env_choice, env_positive_int, env_switch
from alignkernels.integrations.openrlhf_losses import loss_swaps
from alignkernels.integrations.rebind import DropIn, Patch, Swap
from alignkernels.integrations.transformers import (
    CausalLMForward,
    check_supported,
    patch_causal_lm,
    unpatch_causal_lm,
    unwrap_model,
)
from alignkernels.ops._lmhead_engine import HEAD_PRECISIONS
from alignkernels.ops.token_logprobs import token_logprobs

__all__ = [
    "apply",
    "remove",
    "is_applied",
    "adapter_calls",
    "options",
    "worker_setup",
    "apply_from_env",
    "Patch",
    "Options",
    "log_probs_from_logits",
    "compute_entropy",
    "fused_actor_forward",
    "FusedActorOutput",
    "ENV_SWITCH",
]

# backends of token_logprobs an apply() may name
LOGITS_BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
ENV_SWITCH = "ALIGNKERNELS_OPENRLHF"
# backends of token_logprobs(batch_invariant=True)
BATCH_INVARIANT_BACKENDS = ("auto", "triton", "torch")
logger = logging.getLogger("alignkernels.integrations.openrlhf")


@dataclass(frozen=True)
class Options:
    """What :func:`apply` was asked for (the last call wins)."""

    backend: str = "auto"
    fused_forward: bool = False
    chunk_size: int | None = None  # token rows per logits tile of the fused forward (None: the op default)
    losses: bool = False  # swap PolicyLoss, ValueLoss, DPOLoss, aggregate_loss (openrlhf_losses.py)
    batch_invariant: bool = False  # token_logprobs / linear_logprobs(batch_invariant=True) at every seam
    head_precision: str = "input"  # the fused Actor.forward's linear_logprobs(head_precision=)


_STATE = DropIn("openrlhf", Options())
_HANDLE = Patch(_STATE)


def adapter_calls() -> int:
    """How many times OpenRLHF called one of this module's replacements since the last :func:`apply`
    that patched it: a check that a run really uses alignkernels."""
    return _STATE.calls


def options() -> Options:
    """The options in effect (those of the last :func:`apply`)."""
    return _STATE.options


def is_applied() -> bool:
    """Whether :func:`apply` is in effect."""
    return _STATE.applied


def _refuse_head_precision(seam: str) -> Options:
    """The options in effect; a ``ValueError`` where ``head_precision`` asks what a logits seam cannot do."""
    opts = _STATE.options
    if opts.head_precision != "input":
        raise ValueError(f"apply(head_precision={opts.head_precision!r}) cannot reach {seam}: its logits were computed "
                         "by the model's lm_head already; only the fused Actor.forward (fused_forward=True) honours it")
    return opts


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``openrlhf.models.utils.log_probs_from_logits`` on :func:`alignkernels.token_logprobs`:
    ``log softmax(logits / temperature)[label]``, fp32, shape of ``labels``; ``logits`` is not
    modified (OpenRLHF's divides it in place when ``temperature != 1``)."""
    _STATE.count()
    opts = _refuse_head_precision("log_probs_from_logits")
    return token_logprobs(logits, labels, temperature=temperature, backend=opts.backend,
                          batch_invariant=opts.batch_invariant)  # fmt: skip


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``openrlhf.models.utils.compute_entropy``: entropy of ``softmax(logits)`` over the last
    dimension, fp32, differentiable, without materialising the softmax."""
    _STATE.count()
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    opts = _refuse_head_precision("compute_entropy")
    return token_logprobs(logits, labels, return_entropy=True, backend=opts.backend,
                          batch_invariant=opts.batch_invariant)[1]  # fmt: skip


@dataclass
class FusedActorOutput(ModelOutput):
    """The ``output`` :func:`fused_actor_forward` returns with ``return_output=True``: ``entropy``
    ``[B, T-1]`` fp32 when asked for (as the stock forward sets it), no ``logits``."""

    entropy: torch.Tensor | None = None


_STOCK_ACTOR_FORWARD = {}  # "forward": openrlhf's Actor.forward, set when fused_forward=True is installed


def _hf_model(actor) -> torch.nn.Module:
    """The Hugging Face model under ``actor.model``: OpenRLHF's DeepSpeed strategy replaces
    ``actor.model`` by the ``DeepSpeedEngine`` around it (``_ds_init_train_model`` in
    ``openrlhf/utils/deepspeed/deepspeed.py``), whose ``.module`` is the model."""
    engine = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)  # loaded if in use
    model = actor.model.module if engine is not None and isinstance(actor.model, engine) else actor.model
    return unwrap_model(model)


def _fused_forward_refusal(actor, mm_inputs) -> str | None:
    if getattr(actor, "packing_samples", False):
        return "packed samples / ring attention (packing_samples=True)"
    if mm_inputs or getattr(actor, "is_vlm", False):
        return "VLM inputs"
    if getattr(getattr(_hf_model(actor), "config", None), "output_router_logits", False):
        return "an MoE model with output_router_logits (its aux loss comes from the causal-LM forward)"
    return None


def fused_actor_forward(
    self,
    sequences,
    action_mask=None,
    attention_mask=None,
    return_output=False,
    allgather_logits=False,
    return_logprobs=False,
    ring_attn_group=None,
    packed_seq_lens=None,
    return_entropy=False,
    **mm_inputs,
):
    """``openrlhf.models.actor.Actor.forward`` (OpenRLHF 0.11.2's signature and outputs) without the
    ``[B, T, V]`` logits: see the module docstring."""
    stock = _STOCK_ACTOR_FORWARD["forward"]
    if action_mask is None and not return_logprobs:  # the caller wants the logits
        return stock(self, sequences, action_mask, attention_mask, return_output, allgather_logits, return_logprobs,
                     ring_attn_group, packed_seq_lens, return_entropy, **mm_inputs)  # fmt: skip
    reason = _fused_forward_refusal(self, mm_inputs)
    if reason is not None:
        raise NotImplementedError(
            f"alignkernels.integrations.openrlhf.apply(fused_forward=True) does not support {reason}; "
            "apply() without fused_forward keeps the stock Actor.forward (with the log-prob swap)"
        )
    if return_entropy and not return_output:
        raise ValueError("Actor.forward: return_entropy=True needs return_output=True (as OpenRLHF asserts)")
    model = _hf_model(self)
    check_supported(model)
    _STATE.count()
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    labels = torch.roll(sequences, shifts=-1, dims=1)
    if not (return_entropy or return_logprobs):  # only the action positions of log_probs[:, :-1] are read
        scored = torch.zeros_like(labels, dtype=torch.bool)
        scored[:, -action_mask.shape[1] - 1 : -1] = True
        labels = labels.masked_fill(~scored, -100)
    # through self.model's own call, so that a wrapper's forward runs (DeepSpeed's engine registers the
    # ZeRO backward prologue on its outputs there): the model's forward is patched for this call only
    previous = CausalLMForward.installed(model)
    saved = None if previous is None else (previous.temperature, previous.backend)
    patch_causal_lm(model, backend=_STATE.options.backend, temperature=self.temperature)
    try:
        out = self.model(
            sequences, return_token_logprobs=True, shift_labels=labels, attention_mask=attention_mask,
            position_ids=position_ids, return_entropy=return_entropy, chunk_size=_STATE.options.chunk_size,
            head_precision=_STATE.options.head_precision, batch_invariant=_STATE.options.batch_invariant,
        )  # fmt: skip
    finally:
        if previous is None:
            unpatch_causal_lm(model)
        else:  # the caller's own patch_causal_lm: its options back
            previous.temperature, previous.backend = saved
    output = FusedActorOutput(entropy=out.entropy[:, :-1] if return_entropy else None)
    log_probs = out.logprobs[:, :-1]
    if action_mask is None:  # return_logprobs
        return (log_probs, output) if return_output else log_probs
    action_log_probs = log_probs[:, -action_mask.shape[1] :] * action_mask.float()
    return (action_log_probs, output) if return_output else action_log_probs


_LOSS_LOG = {}  # "swapped" / "stock": the names of the last losses=True swaps


def _swaps(fused_forward: bool, losses: bool = False) -> list[Swap]:
    try:
        utils = importlib.import_module("openrlhf.models.utils")
        actor = importlib.import_module("openrlhf.models.actor") if fused_forward else None
        loss_module = importlib.import_module("openrlhf.models.loss") if losses else None
    except ImportError as e:
        raise ImportError(
            f"alignkernels.integrations.openrlhf needs openrlhf.models importable (OpenRLHF 0.11.2 imports flash_attn "
            f"in openrlhf/models/ring_attn_utils.py): {e}"
        ) from e
    swaps = []
    for name, replacement in (("log_probs_from_logits", log_probs_from_logits), ("compute_entropy", compute_entropy)):
        original = vars(utils).get(name)
        if original is None:
            raise ImportError(f"alignkernels.integrations.openrlhf: openrlhf.models.utils.{name} not found")
        swaps.append(Swap(original, replacement))
    if fused_forward:
        original = vars(actor.Actor)["forward"]
        _STOCK_ACTOR_FORWARD["forward"] = original
        swaps.append(Swap(original, fused_actor_forward, owners=(actor.Actor,)))
    if losses:
        loss, swapped, stock = loss_swaps(loss_module, _STATE.count)
        swaps += loss
        _LOSS_LOG.update(swapped=swapped, stock=stock)
    return swaps


def _check_switches(backend, fused_forward, losses, batch_invariant, head_precision) -> None:
    """Check the switches: an option no seam of this apply() can honour is a ``ValueError`` naming
    the option and the seam."""
    for name, value in (("losses", losses), ("batch_invariant", batch_invariant)):
        if not isinstance(value, bool):
            raise TypeError(f"apply(): {name} must be a bool, got {value!r}")
    if not isinstance(head_precision, str) or head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"apply(): head_precision must be one of {tuple(HEAD_PRECISIONS)}, got {head_precision!r}")
    if head_precision != "input" and not fused_forward:
        raise ValueError(
            f"apply(head_precision={head_precision!r}): without fused_forward=True no OpenRLHF seam can honour it: "
            "log_probs_from_logits / compute_entropy get logits the model's lm_head already computed"
        )
    if batch_invariant and backend not in BATCH_INVARIANT_BACKENDS:
        raise ValueError(f"apply(batch_invariant=True) needs backend in {BATCH_INVARIANT_BACKENDS} "
                         f"(token_logprobs at log_probs_from_logits / compute_entropy), got {backend!r}")  # fmt: skip


def apply(
    *,
    backend: str = "auto",
    fused_forward: bool = False,
    chunk_size: int | None = None,
    losses: bool = False,
    batch_invariant: bool = False,
    head_precision: str = "input",
) -> Patch:
    """Make OpenRLHF compute its actor's log-probs and entropies with alignkernels (see the module
    docstring). Call in the process that runs the actor (a Ray worker: :func:`worker_setup`).
    Idempotent; the options of the last call win. A failed call leaves OpenRLHF as it was.

    Args:
        backend: :func:`alignkernels.token_logprobs` (and, with ``fused_forward``,
            :func:`alignkernels.linear_logprobs`) backend.
        fused_forward: also replace ``Actor.forward`` by :func:`fused_actor_forward` (no logits).
        chunk_size: token rows per logits tile of the fused forward (``None``: the op default).
        losses: also swap ``PolicyLoss``, ``ValueLoss``, ``DPOLoss`` and ``aggregate_loss``
            (:mod:`alignkernels.integrations.openrlhf_losses`). One INFO log line says what was swapped.
        batch_invariant: ``log_probs_from_logits`` / ``compute_entropy`` and the fused
            ``Actor.forward`` give each token's result bitwise independently of the batch around it
            (backends ``auto``, ``triton``, ``torch``; not with a LoRA ``lm_head`` in the fused forward).
        head_precision: ``"input"``, ``"fp32"`` or ``"tf32"``: the fused ``Actor.forward``'s head
            GEMM operands (``linear_logprobs(head_precision=)``); other values than ``"input"`` need
            ``fused_forward=True`` (``ValueError``), and the logits seams raise ``ValueError`` if called.

    Returns a :class:`Patch` (``.remove()``, context manager).
    """
    if not isinstance(backend, str) or backend not in LOGITS_BACKENDS:
        raise ValueError(f"apply(): backend must be one of {LOGITS_BACKENDS}, got {backend!r}")
    if not isinstance(fused_forward, bool):
        raise TypeError(f"apply(): fused_forward must be a bool, got {fused_forward!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"apply(): chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"apply(): chunk_size must be a positive int or None, got {chunk_size!r}")
    if fused_forward and backend == "cuda":
        raise ValueError("apply(): backend='cuda' has no fused head (linear_logprobs); use 'auto' or 'triton'")
    _check_switches(backend, fused_forward, losses, batch_invariant, head_precision)
    if _STATE.applied and (_STATE.options.fused_forward, _STATE.options.losses) != (fused_forward, losses):
        remove()  # the set of swaps changes: re-install
    before = _STATE.rebinding
    _STATE.install(lambda: _swaps(fused_forward, losses),
                   Options(backend, fused_forward, chunk_size, losses, batch_invariant, head_precision))  # fmt: skip
    if losses and _STATE.rebinding is not before:
        logger.info("alignkernels: OpenRLHF losses swapped: %s; left stock: %s", ", ".join(_LOSS_LOG["swapped"]),
                    ", ".join(_LOSS_LOG["stock"]) or "none")  # fmt: skip
    return _HANDLE


def remove() -> None:
    """Undo :func:`apply`: every OpenRLHF name bound to a replacement gets its original back
    (modules imported after :func:`apply` included)."""
    _STATE.remove()


def apply_from_env(*, required: bool = False) -> Patch | None:
    """Apply with the options of ``ALIGNKERNELS_OPENRLHF_BACKEND``, ``ALIGNKERNELS_OPENRLHF_FUSED_FORWARD``,
    ``ALIGNKERNELS_OPENRLHF_CHUNK_SIZE``, ``ALIGNKERNELS_OPENRLHF_LOSSES``, ``ALIGNKERNELS_OPENRLHF_BATCH_INVARIANT``
    and ``ALIGNKERNELS_OPENRLHF_HEAD_PRECISION``
    when ``ALIGNKERNELS_OPENRLHF`` is on, or when ``required`` and it is not explicitly off; ``None`` when
    nothing was applied. A bad value is a ``ValueError`` naming the variable."""
    switch = env_switch(ENV_SWITCH)
    if not (switch or (required and switch is None)):
        return None
    return apply(
        backend=env_choice(ENV_SWITCH + "_BACKEND", LOGITS_BACKENDS, "auto"),
        fused_forward=bool(env_switch(ENV_SWITCH + "_FUSED_FORWARD")),
        chunk_size=env_positive_int(ENV_SWITCH + "_CHUNK_SIZE"),
        losses=bool(env_switch(ENV_SWITCH + "_LOSSES")),
        batch_invariant=bool(env_switch(ENV_SWITCH + "_BATCH_INVARIANT")),
        head_precision=env_choice(ENV_SWITCH + "_HEAD_PRECISION", tuple(HEAD_PRECISIONS), "input"),
    )


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: ``runtime_env={"worker_process_setup_hook":
    "alignkernels.integrations.openrlhf.worker_setup"}``. Applies in each worker unless
    ``ALIGNKERNELS_OPENRLHF=0``."""
    apply_from_env(required=True)
