"""TRL drop-in: one line and TRL's trainers run their LM head through alignkernels.

    import alignkernels.integrations.trl as ak_trl
    ak_trl.apply()                 # before (or after) building any TRL trainer
    trainer = GRPOTrainer(...)     # or DPOTrainer, RLOOTrainer, KTOTrainer, SFTTrainer, RewardTrainer
    trainer.train()

The seam (TRL >= 1.16): the SFT, DPO, GRPO, RLOO and KTO trainers all call
``trl.trainer.utils.add_fused_lm_head(model, ...)``; its forward
(``model(..., labels=labels, fused_lm_head=True)``) runs the backbone and hands the hidden states of
the scored positions to ``trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets,
temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)``, which returns
``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``. :func:`apply` rebinds that name,
in every loaded ``trl`` module that holds it, to :class:`LinearLogprobsAdapter`: same signature,
same outputs and masking, computed by :func:`alignkernels.linear_logprobs` (``return_stats=True``).
Everything TRL does around it (label shifting, ``logits_to_keep`` slicing, completion/tool masks,
temperature, reference and old-policy passes, precomputed reference log-probs, its loss code and its
metrics) is TRL's own code, unchanged. ``add_fused_lm_head`` itself is wrapped to check each model
it is given (:func:`alignkernels.integrations.transformers.check_supported`), so an unsupported
configuration (LoRA on ``lm_head``, an unknown model family, a quantized head) raises
:class:`UnsupportedModelError` when the trainer is built, not after silently training wrong.

``RewardTrainer`` does not use the fused head: its sequence-classification model scores every
position (``[B, T, num_labels]``) and then keeps the last non-pad one. Patched, the model gathers the
last non-pad hidden state first (:func:`alignkernels.gather_last`, same position rule as
``transformers``) and scores ``[B, H]`` only, and the loss is :func:`alignkernels.bradley_terry_loss`
(margin and ``center_rewards_coefficient`` as in TRL); TRL's metrics are logged as before.

:func:`remove` (or leaving ``with apply(): ...``) restores every name it rebound.

ZeRO-3 / FSDP: TRL's fused forward already gathers the head around the call (DeepSpeed ZeRO-3
``GatheredParameters``, FSDP2 ``DTensor.full_tensor()``). The adapter receives exactly what TRL's
Function receives; when the head is ZeRO-3 partitioned it recomputes in backward inside TRL's gather
context again, as TRL's Function does (see ``transformers._RegatherHeadInBackward``). Tested here: the
recompute path on CPU; not tested: a real DeepSpeed/FSDP run (no multi-GPU CI).

TRL 1.16 ships no PPO trainer (``trl.experimental`` has none); use :func:`alignkernels.ppo_loss`
directly.
"""
from __future__ import annotations

import importlib
import sys
import weakref

import torch

from alignkernels.integrations.transformers import (
    LogitTransform,
    UnsupportedModelError,
    _is_zero3_partitioned,
    _unwrap,
    check_supported,
    head_logprobs,
)

__all__ = [
    "apply",
    "remove",
    "is_applied",
    "LinearLogprobsAdapter",
    "UnsupportedModelError",
    "patch_reward_model",
    "unpatch_reward_model",
]

# the per-token fields TRL's ChunkedLogProbFunction can return, in its output order
TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

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

_REWARD_PATCH_ATTR = "_alignkernels_original_reward_forward"


class _Options:
    allow_unknown_models = False
    backend = "auto"
    chunk_size = None
    calls = 0  # adapter calls since apply(); lets tests and users check the patched path runs


class LinearLogprobsAdapter:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction`` built on :func:`alignkernels.linear_logprobs`.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` returns ``(log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]``, a field ``None`` unless named in
    ``outputs`` (``log_probs`` always), with TRL's definitions: ``log_sum_sq_probs = log Σ p²``,
    ``mean_logits`` = mean of the transformed logits over the vocabulary, ``is_top1`` = the target
    is the first argmax. Log-probs and entropy are differentiable w.r.t. hidden, weight and bias.
    The logits are ``z = logit_scale * (hidden @ weight.T + bias)``, softcapped, divided by
    ``temperature``; the matmul runs in the autocast dtype when autocast is on (else in hidden's
    dtype), as TRL's does. TRL's ``chunk_size`` (vocabulary tile width of its cuBLAS path) is ignored:
    ``linear_logprobs`` picks its own tiling (token rows per tile: ``apply(chunk_size=...)``).
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
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = hidden.dtype
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
            chunk_size=_Options.chunk_size,
            backend=_Options.backend,
            compute_dtype=compute_dtype,
            gather_params=(weight, bias),
            recompute_in_backward=_is_zero3_partitioned(weight, bias),
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


class _Patcher:
    """Rebinds names and remembers how to put them back."""

    def __init__(self):
        self.saved = []  # (owner, attribute, original value, had_own_attribute)
        self.reward_models = weakref.WeakSet()
        self.validated_add_fused_lm_head = None

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
        self.reward_models = weakref.WeakSet()


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
            raise UnsupportedModelError("Liger's fused_linear_cross_entropy replaces the forward alignkernels patches")
    models = [getattr(trainer, "model", None), getattr(trainer, "ref_model", None)]
    for model in models:
        if model is None or not isinstance(model, torch.nn.Module):
            continue
        if isinstance(trainer, RewardTrainer):
            if model is models[0]:
                _check_reward_model(model)
        else:
            check_supported(model, allow_unknown_models=_Options.allow_unknown_models)


def apply(
    trainer=None, *, allow_unknown_models: bool = False, backend: str = "auto", chunk_size: int | None = None
) -> Patch:
    """Make TRL's trainers compute their LM head (and the reward head) with alignkernels.

    Call once, before or after building trainers (``apply(trainer)`` also checks that trainer's
    policy/reference models right away). Rebinds ``ChunkedLogProbFunction`` to
    :class:`LinearLogprobsAdapter` in every loaded ``trl`` module, wraps ``add_fused_lm_head`` so
    each model a trainer patches is checked, and patches ``RewardTrainer`` (gather-then-score
    forward, :func:`alignkernels.bradley_terry_loss`). Idempotent; the options of the last call win.
    ``backend`` and ``chunk_size`` (token rows per logits tile) go to :func:`linear_logprobs`.

    Raises :class:`UnsupportedModelError` (a ``ValueError``) for a configuration the fused head
    cannot reproduce: LoRA (any PEFT adapter) on ``lm_head``, a model family outside
    :data:`alignkernels.integrations.transformers.SUPPORTED_MODEL_TYPES` (unless
    ``allow_unknown_models=True``), a quantized head, Liger's fused linear cross-entropy, or a TRL
    older than 1.16. Returns a :class:`Patch` (``.remove()``, context manager).
    """
    global _ACTIVE
    from alignkernels._utils import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_trl_version()
    _Options.allow_unknown_models = bool(allow_unknown_models)
    _Options.backend = backend
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _Options.chunk_size = chunk_size
    if trainer is not None:
        _check_trainer(trainer)  # before patching anything: a failed apply(trainer) leaves TRL as it was
    if _ACTIVE is None:
        patcher = _Patcher()
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer import utils as trl_utils
        from trl.trainer.reward_trainer import RewardTrainer

        original_add = trl_utils.add_fused_lm_head

        def add_fused_lm_head(model, *args, **kwargs):
            check_supported(model, allow_unknown_models=_Options.allow_unknown_models)
            return original_add(model, *args, **kwargs)

        add_fused_lm_head.__doc__ = original_add.__doc__
        add_fused_lm_head.__wrapped__ = original_add
        for module in _trl_modules():
            for name, value in list(vars(module).items()):
                if value is ChunkedLogProbFunction:
                    patcher.set(module, name, LinearLogprobsAdapter)
                elif value is original_add:
                    patcher.set(module, name, add_fused_lm_head)
        patcher.set(RewardTrainer, "__init__", _reward_trainer_init(RewardTrainer.__init__))
        patcher.set(RewardTrainer, "compute_loss", _reward_compute_loss)
        _ACTIVE = patcher
        _Options.calls = 0
    if trainer is not None:
        from trl.trainer.reward_trainer import RewardTrainer

        if isinstance(trainer, RewardTrainer):
            patch_reward_model(trainer.model)
    return _HANDLE


def remove() -> None:
    """Undo :func:`apply`: every rebound name and every patched reward model is restored."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.undo()
        _ACTIVE = None


# ---------------------------------------------------------------------------------------------
# RewardTrainer: score only the last non-pad hidden state; Bradley-Terry loss
# ---------------------------------------------------------------------------------------------


def _check_reward_model(model):
    base = _unwrap(model)
    score = getattr(base, "score", None)
    if not type(base).__name__.endswith("ForSequenceClassification") or not isinstance(score, torch.nn.Linear):
        raise UnsupportedModelError(
            f"RewardTrainer drop-in needs a *ForSequenceClassification model with a Linear `score` head, got "
            f"{type(base).__name__}" + (" whose score head carries a PEFT adapter" if hasattr(score, "base_layer") else "")
        )
    check_supported(base, allow_unknown_models=_Options.allow_unknown_models, require_lm_head=False)


def patch_reward_model(model):
    """Make a ``*ForSequenceClassification`` model gather the last non-pad hidden state, then score it.

    Same outputs as the model's own forward (``logits`` ``[B, num_labels]`` at the rightmost token that
    is not ``pad_token_id``; the last position when there is no pad token), without the
    ``[B, T, num_labels]`` scores of every position. Falls back to the original forward when called
    with ``labels`` or ``inputs_embeds``. Returns ``model``.
    """
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    _check_reward_model(model)
    base = _unwrap(model)
    if _REWARD_PATCH_ATTR in vars(base):
        return model
    original = base.forward
    setattr(base, _REWARD_PATCH_ATTR, original)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or kwargs.get("labels") is not None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from alignkernels import gather_last

        outputs = self.base_model(input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state
        pad_token_id = self.config.get_text_config().pad_token_id
        if pad_token_id is None:
            if input_ids.shape[0] != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last_hidden = hidden[:, -1]
        else:
            # transformers' rule: the rightmost token that is not the pad token (left or right padding)
            last_hidden = gather_last(hidden, input_ids=input_ids.to(hidden.device), pad_token_id=pad_token_id)
        return SequenceClassifierOutputWithPast(
            logits=self.score(last_hidden),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    import types

    base.forward = types.MethodType(forward, base)
    if _ACTIVE is not None:
        _ACTIVE.reward_models.add(base)
    return model


def unpatch_reward_model(model):
    base = _unwrap(model)
    original = vars(base).pop(_REWARD_PATCH_ATTR, None)
    if original is not None:
        vars(base).pop("forward", None)
        if getattr(original, "__func__", None) is not type(base).forward:
            base.forward = original
    return model


def _reward_trainer_init(original_init):
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        patch_reward_model(self.model)

    __init__.__wrapped__ = original_init
    return __init__


def _reward_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``RewardTrainer.compute_loss`` with :func:`alignkernels.bradley_terry_loss`; TRL's metrics."""
    from alignkernels import bradley_terry_loss

    mode = "train" if self.model.training else "eval"
    inputs["use_cache"] = False
    outputs = model(**inputs)
    rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
    loss, _ = bradley_terry_loss(
        rewards_chosen,
        rewards_rejected,
        margin=inputs.get("margin"),
        center_rewards_coefficient=self.args.center_rewards_coefficient,
    )
    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    with torch.no_grad():
        all_rewards = self.accelerator.gather(outputs.logits)
        self._metrics[mode]["min_reward"].append(all_rewards.min().item())
        self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
        self._metrics[mode]["max_reward"].append(all_rewards.max().item())
        accuracy = (rewards_chosen > rewards_rejected).float().mean()
        self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
        margin = (rewards_chosen - rewards_rejected).mean()
        self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
    return (loss, outputs) if return_outputs else loss
