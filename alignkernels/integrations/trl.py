"""TRL drop-in: one line and TRL's trainers run their LM head through alignkernels.

    import alignkernels.integrations.trl as ak_trl
    ak_trl.apply()                 # before (or after) building any TRL trainer
    trainer = GRPOTrainer(...)     # or DPOTrainer, RLOOTrainer, KTOTrainer, SFTTrainer, RewardTrainer
    trainer.train()

This module is the seam and nothing else. TRL >= 1.16: the SFT, DPO, GRPO, RLOO and KTO trainers
all call ``trl.trainer.utils.add_fused_lm_head(model, ...)``; its forward
(``model(..., labels=labels, fused_lm_head=True)``) runs the backbone and hands the hidden states of
the scored positions to ``trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets,
temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)``, which returns
``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``. :func:`apply` rebinds that name,
in every loaded ``trl`` module that holds it, to :class:`LinearLogprobsAdapter`: same signature,
same outputs and masking, computed by :func:`alignkernels.linear_logprobs` (``return_stats=True``).
Everything TRL does around it (label shifting, ``logits_to_keep`` slicing, completion/tool masks,
temperature, reference and old-policy passes, precomputed reference log-probs, PEFT adapters, its
loss code and its metrics) is TRL's own code, unchanged. ``add_fused_lm_head`` itself is wrapped to
check each model it is given (:func:`alignkernels.integrations.transformers.check_supported`), so an
unsupported configuration (an adapter on ``lm_head`` other than a plain LoRA allowed by
``apply(allow_lora_lm_head=True)``, an unknown model family, a quantized head) raises
:class:`UnsupportedModelError` when the trainer is built, not after silently training wrong. A LoRA
``lm_head`` under ``allow_lora_lm_head=True`` is fused: ``linear_logprobs(..., lora=)``
(:mod:`alignkernels.integrations.lora_head`).

``RewardTrainer`` does not use the fused head; :func:`apply` also installs the reward-model
drop-in of :mod:`alignkernels.integrations.trl_reward` (gather the last token, then score;
:func:`alignkernels.bradley_terry_loss`). :func:`remove` (or leaving ``with apply(): ...``) restores
every name it rebound and every model it patched.

Numerics: in fp32 the patched trainers log the same losses and metrics and reach the same
parameters as stock TRL (1e-5). Under bf16 autocast TRL rounds each logits tile to bf16 before its
fp32 softmax while ``linear_logprobs`` keeps the tile in fp32, so the two differ by the size of that
rounding, and alignkernels is the one closer to an fp64 computation (``docs/INTEGRATION.md``,
"bf16").

ZeRO-3 / FSDP: TRL's fused forward gathers the head around the call (DeepSpeed ZeRO-3
``GatheredParameters``; FSDP2 ``DTensor.full_tensor()``, needed only when the head is its own
``fully_shard`` unit — inside the model's forward the root unit's parameters are plain tensors).
The adapter receives what TRL's Function receives; when the head is ZeRO-3 partitioned it recomputes
in backward inside TRL's gather context again, as TRL's Function does
(``transformers.head_logprobs(recompute_in_backward=True)``). TRL's bare ``full_tensor()`` leaves each
rank its own, unaveraged lm_head gradient, so under ``apply()`` a fused-head model's forward is wrapped
by :class:`GatherShardedHeadForward`, which gathers an FSDP2 head with ``gather_lm_head(grad_reduce="avg")``
first (2-rank gloo test: ``tests/integrations/test_sharded.py``).

TRL 1.16 ships no PPO trainer (``trl.experimental`` has none); use :func:`alignkernels.ppo_loss`
directly.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import weakref

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None

from alignkernels._utils import BACKENDS, check_batch_invariant
from alignkernels.integrations import trl_fused_loss
from alignkernels.integrations.forward_patch import InstanceForward
from alignkernels.integrations.lora_head import base_layer, is_lora_linear, lora_for_weight, lora_of_head, routed_lora
from alignkernels.integrations.transformers import (
    LogitTransform,
    UnsupportedModelError,
    check_supported,
    head_logprobs,
    is_zero3_partitioned,
)
from alignkernels.integrations.trl_reward import (
    check_reward_model,
    patch_reward_model,
    reward_compute_loss,
    unpatch_reward_model,
    wrap_reward_trainer_init,
)
from alignkernels.ops._lmhead_engine import head_precision as check_head_precision
from alignkernels.ops.vocab_parallel import gather_lm_head

__all__ = [
    "apply",
    "remove",
    "is_applied",
    "adapter_calls",
    "Patch",
    "LinearLogprobsAdapter",
    "GatherShardedHeadForward",
    "UnsupportedModelError",
    "patch_reward_model",
    "unpatch_reward_model",
    "TRL_TOKEN_ROWS",
]

# the per-token fields TRL's ChunkedLogProbFunction can return, in its output order
TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# token rows of TRL's logits tile (``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE`` in TRL 1.16)
TRL_TOKEN_ROWS = 4096
# widest CPU tile the adapter asks for (the fused CPU softmax sums a row in fp32 lanes: 1e-6 up to ~16k columns)
CPU_MAX_TILE_COLUMNS = 1 << 14

# trl modules that bind the seam's names; imported by `apply` so their references exist to rebind
_TRL_MODULES = (
    "trl.kernels",
    "trl.kernels.chunked_logprob",
    "trl.trainer.utils",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.kto_trainer",
    "trl.trainer.reward_trainer",
)

# trainers whose every lm_head use is the fused head: apply(allow_lora_lm_head=True) lifts their LoRA refusal
# (not e.g. the distillation trainer, which reads lm_head.weight itself)
_FUSED_HEAD_TRAINER_MODULES = (
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.kto_trainer",
)


class _Options:
    allow_unknown_models = False
    backend = "auto"
    chunk_size = None  # token rows per tile (apply(chunk_size=)); None: TRL_TOKEN_ROWS on CUDA, the op default on CPU
    vocab_block_size = None  # vocabulary columns per tile; None: from TRL's chunk_size
    fused_loss = False  # apply(fused_loss=True): see trl_fused_loss
    allow_lora_lm_head = False  # apply(allow_lora_lm_head=True): fuse a PEFT LoRA lm_head instead of TRL's refusal
    head_precision = "input"  # apply(head_precision=): the head GEMMs' operands, on every head call
    batch_invariant = False  # apply(batch_invariant=True): every head call on its fixed, padded plan
    calls = 0  # adapter calls since apply()


def adapter_calls() -> int:
    """How many times TRL called :class:`LinearLogprobsAdapter` since the last :func:`apply` that
    patched TRL: a check that a trainer really runs alignkernels."""
    return _Options.calls


def _tile_for_trl_chunk(chunk_size, compute_dtype, device):
    """``(token rows, vocabulary columns)`` of our logits tile for TRL's ``chunk_size`` (``None``:
    ``linear_logprobs``' default).

    TRL's tile is ``TRL_TOKEN_ROWS x chunk_size`` in the compute dtype (bf16 under bf16 autocast);
    ours is fp32 (fp64 for fp64 inputs). On CUDA: the same rows, and the width scaled by the itemsize
    ratio, give a tile of the same bytes, so tuning TRL's chunk size tunes our memory the same way.
    On CPU the op's own row default (256) is kept and the width is capped at
    ``CPU_MAX_TILE_COLUMNS``: the fused CPU softmax sums a row in fp32 lanes and loses digits past
    ~16k columns (it sums a row in plain fp32 lanes); that tile is never larger than TRL's. ``apply``'s
    explicit ``chunk_size`` / ``vocab_block_size`` win over all of this.
    """
    on_cuda = device.type == "cuda"
    rows = _Options.chunk_size or (TRL_TOKEN_ROWS if on_cuda else None)
    block = _Options.vocab_block_size
    if block is None and chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size (TRL's vocabulary tile width) must be a positive int, got {chunk_size!r}")
        tile_itemsize = max(4, compute_dtype.itemsize)
        block = max(1, chunk_size * compute_dtype.itemsize // tile_itemsize)
        if _Options.chunk_size is not None:  # the same bytes at apply's row count
            block = max(1, block * TRL_TOKEN_ROWS // _Options.chunk_size)
        if not on_cuda:
            block = min(block, CPU_MAX_TILE_COLUMNS)
    return rows, block


class LinearLogprobsAdapter:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction`` built on :func:`alignkernels.linear_logprobs`.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` returns ``(log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]``, a field ``None`` unless named in
    ``outputs`` (``log_probs`` always), with TRL's definitions: ``log_sum_sq_probs = log Σ p²``,
    ``mean_logits`` = mean of the transformed logits over the vocabulary, ``is_top1`` = the target
    is the first argmax. Log-probs and entropy are differentiable w.r.t. hidden, weight and bias.
    The logits are ``z = logit_scale * (hidden @ weight.T + bias)``, softcapped, divided by
    ``temperature``; the matmul takes its operands in the autocast dtype when autocast is on (else
    hidden's dtype), as TRL's does, and writes an fp32 tile (TRL rounds its tile to that dtype).

    ``chunk_size`` (TRL: the vocabulary width of its ``4096 x chunk_size`` tile, TRL's module
    constant ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``, 32768 by default) sets our tile:
    on CUDA 4096 token rows and ``chunk_size x itemsize(compute dtype) / 4`` vocabulary columns, i.e.
    a tile of the same bytes as TRL's (ours is fp32: half TRL's columns under bf16); on CPU the same
    width capped at 16384 columns, with the op's own 256 rows. ``apply(chunk_size=,
    vocab_block_size=)`` override rows and columns.
    """

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size=None,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=TRL_OPTIONAL_OUTPUTS,
    ):
        _Options.calls += 1
        lora = lora_for_weight(weight)  # a LoRA lm_head routed by GatherShardedHeadForward for this call
        fused = trl_fused_loss.fused_head_outputs(
            hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs,
            is_zero3_partitioned(weight, bias),
            trl_fused_loss.HeadOptions(chunk_size=_Options.chunk_size, backend=_Options.backend, lora=lora,
                                       head_precision=_Options.head_precision,
                                       batch_invariant=_Options.batch_invariant),
        ) if _Options.fused_loss else None  # fmt: skip
        if fused is not None:  # apply(fused_loss=True): the loss's gradient formed in the head (trl_fused_loss)
            return fused
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = hidden.dtype
        rows, block = _tile_for_trl_chunk(chunk_size, compute_dtype, hidden.device)
        if hidden.dtype == compute_dtype and weight.dtype == compute_dtype and (bias is None or bias.dtype == compute_dtype):
            compute_dtype = None  # no cast needed
        wanted = set(outputs or ())
        want_stats = bool(wanted & {"log_sum_sq_probs", "mean_logits", "is_top1"})
        result = head_logprobs(
            hidden,
            weight,
            bias,
            targets,
            temperature=temperature,
            transform=LogitTransform(
                logit_scale=1.0 if logit_scale is None else float(logit_scale),
                softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
            ),
            return_entropy="entropy" in wanted,
            return_stats=want_stats,
            chunk_size=rows,
            vocab_block_size=block,
            backend=_Options.backend,
            compute_dtype=compute_dtype,
            gather_params=(weight, bias),
            recompute_in_backward=is_zero3_partitioned(weight, bias),
            lora=lora,
            head_precision=_Options.head_precision,
            batch_invariant=_Options.batch_invariant,
            check_labels=False,  # TRL passes only valid labels (compacted, or clamped to 0): skip the host sync
        )
        if not want_stats:  # (logp, entropy or None): the statistics are not computed at all
            return result[0], result[1], None, None, None
        stats = result
        return (
            stats.logp,
            stats.entropy if "entropy" in wanted else None,
            stats.log_sum_sq_probs if "log_sum_sq_probs" in wanted else None,
            stats.mean_logit if "mean_logits" in wanted else None,
            stats.is_top1 if "is_top1" in wanted else None,
        )


class GatherShardedHeadForward(InstanceForward):
    """Wraps the forward ``add_fused_lm_head`` installs: with ``fused_lm_head=True`` and an lm_head
    whose parameters are FSDP2 DTensors during the model's forward (the head sharded as its own
    ``fully_shard`` unit), the head is gathered first with
    :func:`alignkernels.ops.vocab_parallel.gather_lm_head` (``grad_reduce="avg"``) and TRL's forward
    sees plain tensors for the duration of the call. TRL 1.16 would gather it with a bare
    ``full_tensor()``, whose backward leaves each rank its own gradient slice, unaveraged (wrong for
    data-parallel training; ``tests/integrations/test_sharded.py``). A PEFT LoRA lm_head (allowed by
    ``apply(allow_lora_lm_head=True)``) has its active adapter routed to :class:`LinearLogprobsAdapter`
    for the call (TRL hands the Function only ``lm_head.weight``: the base layer's). Anything else
    passes through."""

    def __call__(self, *args, fused_lm_head=False, **kwargs):
        head = self.module.get_output_embeddings() if fused_lm_head else None
        base = base_layer(head) if head is not None else None
        weight = getattr(base, "weight", None)
        if head is None or not _is_dtensor(weight):
            with routed_lora(head, UnsupportedModelError) if head is not None else _no_routing():
                return self.original(*args, fused_lm_head=fused_lm_head, **kwargs)
        params = base._parameters
        saved = {name: params[name] for name in ("weight", "bias") if params.get(name) is not None}
        gathered_weight, gathered_bias = gather_lm_head(saved["weight"], saved.get("bias"), grad_reduce="avg")
        try:
            # nn.Module reads parameters from _parameters: swap in the gathered tensors for this call
            params["weight"] = gathered_weight
            if "bias" in saved:
                params["bias"] = gathered_bias
            with routed_lora(head, UnsupportedModelError):
                return self.original(*args, fused_lm_head=fused_lm_head, **kwargs)
        finally:
            params.update(saved)


@contextlib.contextmanager
def _no_routing():
    yield


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


class _Patcher:
    """Rebinds names and remembers how to put them back."""

    def __init__(self):
        self.saved = []  # (owner, attribute, original value, had_own_attribute)
        self.reward_models = weakref.WeakSet()
        self.fused_head_models = weakref.WeakSet()

    def set(self, owner, name, value):
        had = name in vars(owner)
        self.saved.append((owner, name, vars(owner).get(name), had))
        setattr(owner, name, value)

    def undo(self):
        for owner, name, original, had in reversed(self.saved):
            if had:
                setattr(owner, name, original)
            else:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
        self.saved.clear()
        for model in list(self.reward_models):
            unpatch_reward_model(model)
        for model in list(self.fused_head_models):
            GatherShardedHeadForward.uninstall(model)
        self.reward_models = weakref.WeakSet()
        self.fused_head_models = weakref.WeakSet()


class Patch:
    """What :func:`apply` returns: ``.remove()`` undoes it; also a context manager."""

    def remove(self):
        remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        remove()
        return False


_ACTIVE: _Patcher | None = None
_HANDLE = Patch()


def is_applied() -> bool:
    """Whether :func:`apply` is in effect."""
    return _ACTIVE is not None


def _trl_modules():
    for name in _TRL_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # a trainer module whose optional dependency is missing
            pass
    return [m for n, m in list(sys.modules.items()) if (n == "trl" or n.startswith("trl.")) and m is not None]


def _check_trl_version():
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installed TRL
        import trl

        raise UnsupportedModelError(
            f"alignkernels.integrations.trl needs TRL >= 1.16 (trl.kernels.ChunkedLogProbFunction and "
            f"trl.trainer.utils.add_fused_lm_head); installed trl {getattr(trl, '__version__', '?')}: {e}"
        ) from e


def _check_trainer(trainer):
    from trl.trainer.reward_trainer import RewardTrainer

    args = getattr(trainer, "args", None)
    if args is not None and getattr(args, "use_liger_kernel", False):
        cfg = getattr(args, "liger_kernel_config", None) or {}
        if cfg.get("fused_linear_cross_entropy"):
            raise UnsupportedModelError(
                "trainer.args.use_liger_kernel with liger_kernel_config['fused_linear_cross_entropy']: Liger's fused "
                "linear cross-entropy replaces the forward alignkernels patches; turn one of them off"
            )
    if isinstance(trainer, RewardTrainer):
        check_reward_model(trainer.model, allow_unknown_models=_Options.allow_unknown_models)
        return
    for model in (getattr(trainer, "model", None), getattr(trainer, "ref_model", None)):
        if isinstance(model, torch.nn.Module):
            check_supported(model, allow_unknown_models=_Options.allow_unknown_models,
                            allow_lora_lm_head=_Options.allow_lora_lm_head)  # fmt: skip


def _check_optional_positive_int(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"apply(): {name} must be a positive int or None, got {value!r}")


def apply(
    trainer=None,
    *,
    allow_unknown_models: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    fused_loss: bool = False,
    allow_lora_lm_head: bool = False,
    head_precision: str = "input",
    batch_invariant: bool = False,
) -> Patch:
    """Make TRL's trainers compute their LM head (and the reward head) with alignkernels.

    Call once, before or after building trainers (``apply(trainer)`` also checks that trainer's
    policy/reference models right away). Rebinds ``ChunkedLogProbFunction`` to
    :class:`LinearLogprobsAdapter` in every loaded ``trl`` module, wraps ``add_fused_lm_head`` so
    each model a trainer patches is checked, and installs the ``RewardTrainer`` drop-in
    (:mod:`alignkernels.integrations.trl_reward`). Idempotent; the options of the last call win.

    Args:
        trainer: an already built TRL trainer to check (and, for ``RewardTrainer``, patch) now.
        allow_unknown_models: accept model families outside ``SUPPORTED_MODEL_TYPES``.
        backend: :func:`alignkernels.linear_logprobs` backend (also the fused loss's three-GEMM
            head and its exact recompute; ``"reference"`` runs the fused loss on the head-only drop-in).
        chunk_size, vocab_block_size: token rows and vocabulary columns of the logits tile. By
            default both follow TRL: 4096 rows and TRL's own ``chunk_size`` scaled to the same tile
            bytes (see :class:`LinearLogprobsAdapter`).
        fused_loss: the trainers' loss itself on the three-GEMM head where exact (SFTTrainer's
            ``nll``, GRPOTrainer's token-separable losses), the head-only drop-in elsewhere; one
            log line per trainer says which (:mod:`alignkernels.integrations.trl_fused_loss`).
        allow_lora_lm_head: fuse a PEFT LoRA adapter on ``lm_head`` (``target_modules`` including
            ``"lm_head"``) through ``linear_logprobs(..., lora=)`` instead of TRL 1.16's refusal
            ("Applying a PEFT adapter to `lm_head` is not supported", raised by the SFT, DPO, GRPO,
            RLOO and KTO trainers because their fused head reads ``lm_head.weight`` only). Under it the
            trainers' check sees a plain LoRA head as allowed, and each fused-head call adds the
            active adapter's ``scaling·(h·Aᵀ)·Bᵀ`` in the tiles (with ``fused_loss=True``: in the
            three-GEMM head's GEMMs), so the adapter is trained. Still
            refused (:class:`UnsupportedModelError`): dropout > 0, several active adapters, DoRA,
            LoRA bias, merged adapters, non-LoRA tuners, ``cast_lm_head_to_fp32=True``, ZeRO-3.
        head_precision: ``"input"`` / ``"fp32"`` / ``"tf32"``, the head GEMMs' operands
            (``linear_logprobs(head_precision=)``), on every head call: the head-only drop-in, the
            fused loss's three GEMMs and its recompute.
        batch_invariant: every head call with ``batch_invariant=True`` (``linear_logprobs``; the
            fused loss's three-GEMM head on its fixed plan): a token's log-prob, entropy and
            ``grad_hidden`` row are bitwise independent of the batch, the micro-batch split and the
            padding around it -- so TRL's ``old_per_token_logps`` and the training pass agree bit for
            bit when they see the token in different batches. Refused (``ValueError``, here) with
            ``backend="reference"`` / ``"cuda"``; with ``allow_lora_lm_head=True`` the adapter's GEMMs
            run on the same fixed plan (``ops/_lora.py``). The reward-model drop-in runs no head op (the model's own
            ``score`` layer): nothing there to pass it to.

    Raises :class:`UnsupportedModelError` (a ``ValueError``) for a configuration the fused head
    cannot reproduce: a PEFT adapter on ``lm_head`` (unless ``allow_lora_lm_head=True`` and a plain
    LoRA adapter), a model family outside
    :data:`alignkernels.integrations.transformers.SUPPORTED_MODEL_TYPES` (unless
    ``allow_unknown_models=True``), a quantized head, Liger's fused linear cross-entropy, or a TRL
    older than 1.16; ``ValueError`` naming the argument for a bad option. A failed call leaves TRL
    as it was. Returns a :class:`Patch` (``.remove()``, context manager).
    """
    global _ACTIVE
    if backend not in BACKENDS:
        raise ValueError(f"apply(): backend must be one of {BACKENDS}, got {backend!r}")
    _check_optional_positive_int("chunk_size", chunk_size)
    _check_optional_positive_int("vocab_block_size", vocab_block_size)
    check_head_precision(head_precision)
    check_batch_invariant(batch_invariant)
    if batch_invariant and backend not in ("auto", "torch", "triton"):
        raise ValueError("apply(): batch_invariant=True is implemented on the backends ('auto', 'torch', 'triton'), "
                         f"got backend={backend!r}")  # fmt: skip
    _check_trl_version()
    _Options.allow_unknown_models = bool(allow_unknown_models)
    _Options.backend = backend
    _Options.chunk_size = chunk_size
    _Options.vocab_block_size = vocab_block_size
    _Options.fused_loss = bool(fused_loss)
    _Options.allow_lora_lm_head = bool(allow_lora_lm_head)
    _Options.head_precision = head_precision
    _Options.batch_invariant = batch_invariant
    if trainer is not None:
        _check_trainer(trainer)  # before patching anything: a failed apply(trainer) leaves TRL as it was
    if _ACTIVE is None:
        _ACTIVE = _install()
        _Options.calls = 0
    if trainer is not None:
        from trl.trainer.reward_trainer import RewardTrainer

        if isinstance(trainer, RewardTrainer):
            patch_reward_model(trainer.model, allow_unknown_models=_Options.allow_unknown_models)
            _ACTIVE.reward_models.add(trainer.model)
    return _HANDLE


class _TunerLayerCheck(type):
    """``isinstance(x, TunerLayerUnlessFusedLora)``: ``isinstance(x, peft's BaseTunerLayer)``, except
    that under ``apply(allow_lora_lm_head=True)`` a plain LoRA ``Linear`` is not (its unsupported
    forms raise here, at trainer build time, with the reason). TRL 1.16's trainers use the name only
    for the lm_head checks ("Applying a PEFT adapter to `lm_head` is not supported";
    ``cast_lm_head_to_fp32``, which :func:`_refuse_replaced_lora_head_forward` then refuses)."""

    def __instancecheck__(cls, obj):
        if _Options.allow_lora_lm_head and is_lora_linear(obj):
            lora_of_head(obj, UnsupportedModelError)
            return False
        return isinstance(obj, cls.wrapped)


def _tuner_layer_check():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters, nothing to allow
        return None
    return _TunerLayerCheck("TunerLayerUnlessFusedLora", (), {"wrapped": BaseTunerLayer})


def _refuse_replaced_lora_head_forward(model):
    """A LoRA lm_head whose forward was replaced on the instance (TRL's ``cast_lm_head_to_fp32``
    swaps in ``F.linear(h, lm_head.weight)``, dropping the adapter outside the fused head) is refused."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and is_lora_linear(head) and "forward" in vars(head):
        raise UnsupportedModelError(
            "the LoRA lm_head's forward was replaced (cast_lm_head_to_fp32=True?): generation would drop the "
            "adapter. cast_lm_head_to_fp32 is not supported with LoRA on lm_head; set it to False"
        )


def _install() -> _Patcher:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils
    from trl.trainer.reward_trainer import RewardTrainer

    patcher = _Patcher()
    original_add = trl_utils.add_fused_lm_head

    def add_fused_lm_head(model, *args, **kwargs):
        check_supported(model, allow_unknown_models=_Options.allow_unknown_models,
                        allow_lora_lm_head=_Options.allow_lora_lm_head)  # fmt: skip
        _refuse_replaced_lora_head_forward(model)
        result = original_add(model, *args, **kwargs)
        GatherShardedHeadForward.install(model)
        patcher.fused_head_models.add(model)
        return result

    add_fused_lm_head.__doc__ = original_add.__doc__
    add_fused_lm_head.__wrapped__ = original_add
    for module in _trl_modules():
        for name, value in list(vars(module).items()):
            if value is ChunkedLogProbFunction:
                patcher.set(module, name, LinearLogprobsAdapter)
            elif value is original_add:
                patcher.set(module, name, add_fused_lm_head)
    tuner_check = _tuner_layer_check()
    if tuner_check is not None:  # TRL's trainers refuse `isinstance(lm_head, BaseTunerLayer)`: see apply()
        for name in _FUSED_HEAD_TRAINER_MODULES:  # only trainers whose lm_head goes through the fused head
            module = sys.modules.get(name)
            if module is not None and vars(module).get("BaseTunerLayer") is tuner_check.wrapped:
                patcher.set(module, "BaseTunerLayer", tuner_check)
    patched_init = wrap_reward_trainer_init(
        RewardTrainer.__init__, patcher.reward_models.add, allow_unknown_models=lambda: _Options.allow_unknown_models
    )
    patcher.set(RewardTrainer, "__init__", patched_init)
    patcher.set(RewardTrainer, "compute_loss", reward_compute_loss)
    trl_fused_loss.install(patcher, lambda: _Options.fused_loss)
    return patcher


def remove() -> None:
    """Undo :func:`apply`: every rebound name and every reward model it patched is restored."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.undo()
        _ACTIVE = None
