"""TRL ``RewardTrainer`` drop-in: score only the last non-pad hidden state; Bradley-Terry loss.

A ``*ForSequenceClassification`` model scores every position (``score(hidden)``: ``[B, T,
num_labels]``) and then keeps the rightmost token that is not ``pad_token_id``. The score head
acts on each position independently, so gathering first is exact:
:func:`patch_reward_model` makes the model's forward gather the last non-pad hidden state
(:func:`alignkernels.gather_last`, transformers' position rule) and score ``[B, H]`` only. The
head may be PEFT-wrapped (``task_type="SEQ_CLS"`` wraps ``score`` in a ``ModulesToSaveWrapper``;
LoRA on ``score`` wraps it in a ``lora.Linear``): the wrapper's own forward runs, on fewer rows.

``RewardTrainer.compute_loss`` is replaced by :func:`reward_compute_loss`: the loss and TRL's
logged metrics (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``) come
from :func:`alignkernels.bradley_terry_loss` (margin and ``center_rewards_coefficient`` as in
TRL 1.16), reduced over processes the way TRL reduces them.

:func:`alignkernels.integrations.trl.apply` installs both (and undoes them on ``remove()``);
:func:`patch_reward_model` can also be used alone. The patch is an
:class:`~alignkernels.integrations.forward_patch.InstanceForward`, so copies and pickles of a
patched model run their own weights.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from alignkernels.integrations.forward_patch import InstanceForward
from alignkernels.integrations.transformers import UnsupportedModelError, check_supported, unwrap_model
from alignkernels.losses.reward import bradley_terry_loss
from alignkernels.ops.gather import gather_last

__all__ = [
    "RewardModelForward",
    "check_reward_model",
    "patch_reward_model",
    "unpatch_reward_model",
    "reward_compute_loss",
    "wrap_reward_trainer_init",
]

# leaf modules a score head may be built from: each acts on every position independently
_POSITIONWISE_LEAVES = (torch.nn.Linear, torch.nn.Dropout, torch.nn.Identity)


def _is_positionwise_score(score) -> bool:
    """``score`` is a Linear, or a PEFT wrapper (ModulesToSaveWrapper, lora.Linear, ...) whose
    every leaf module is Linear / Dropout / Identity."""
    if isinstance(score, torch.nn.Linear):
        return True
    if not type(score).__module__.startswith("peft."):
        return False
    leaves = [m for m in score.modules() if not any(True for _ in m.children())]
    return any(isinstance(m, torch.nn.Linear) for m in leaves) and all(
        isinstance(m, _POSITIONWISE_LEAVES) for m in leaves
    )


def check_reward_model(model, *, allow_unknown_models: bool = False) -> None:
    """Raise :class:`UnsupportedModelError` unless gather-then-score reproduces ``model``'s scores.

    ``model`` (possibly PEFT / DDP wrapped) must be a ``*ForSequenceClassification`` of a family in
    ``SUPPORTED_MODEL_TYPES`` (or ``allow_unknown_models=True``) whose ``score`` head is a Linear
    layer, optionally wrapped by PEFT.
    """
    base = unwrap_model(model)
    score = getattr(base, "score", None)
    if not type(base).__name__.endswith("ForSequenceClassification"):
        raise UnsupportedModelError(
            f"model must be a *ForSequenceClassification model (a `score` head on the last hidden state) for the "
            f"RewardTrainer drop-in, got {type(base).__name__}"
        )
    if score is None or not _is_positionwise_score(score):
        raise UnsupportedModelError(
            f"model.score must be a torch.nn.Linear, optionally wrapped by PEFT (ModulesToSaveWrapper, LoRA), for the "
            f"RewardTrainer drop-in to score the last token only; {type(base).__name__}.score is "
            f"{type(score).__name__}"
        )
    check_supported(base, allow_unknown_models=allow_unknown_models, require_lm_head=False)


class RewardModelForward(InstanceForward):
    """The forward :func:`patch_reward_model` sets on a ``*ForSequenceClassification`` instance."""

    def __call__(self, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or kwargs.get("labels") is not None or kwargs.get("inputs_embeds") is not None:
            return self.original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("labels", None)
        kwargs.pop("inputs_embeds", None)
        model = self.module
        outputs = model.base_model(input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state
        pad_token_id = model.config.get_text_config().pad_token_id
        if pad_token_id is None:
            if input_ids.shape[0] != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")  # transformers' words
            last_hidden = hidden[:, -1]
        else:
            # transformers' rule: the rightmost token that is not the pad token (left or right padding)
            last_hidden = gather_last(hidden, input_ids=input_ids.to(hidden.device), pad_token_id=pad_token_id)
        return SequenceClassifierOutputWithPast(
            logits=model.score(last_hidden),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


def patch_reward_model(model, *, allow_unknown_models: bool = False):
    """Make a ``*ForSequenceClassification`` model gather the last non-pad hidden state, then score it.

    Same outputs as the model's own forward (``logits`` ``[B, num_labels]`` at the rightmost token that
    is not ``pad_token_id``; the last position when there is no pad token), without the
    ``[B, T, num_labels]`` scores of every position. Falls back to the original forward when called
    with ``labels`` or ``inputs_embeds``. Raises :class:`UnsupportedModelError` (see
    :func:`check_reward_model`). Idempotent. Returns ``model``.
    """
    check_reward_model(model, allow_unknown_models=allow_unknown_models)
    RewardModelForward.install(unwrap_model(model))
    return model


def unpatch_reward_model(model):
    """Undo :func:`patch_reward_model`. Returns ``model``."""
    RewardModelForward.uninstall(unwrap_model(model))
    return model


def wrap_reward_trainer_init(original_init, on_patched, allow_unknown_models=lambda: False):
    """``RewardTrainer.__init__`` that patches the trainer's model once it is built.

    ``on_patched(model)`` is called with each model it patches (``apply`` records them to undo on
    ``remove``); ``allow_unknown_models()`` reads ``apply``'s current option."""

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        patch_reward_model(self.model, allow_unknown_models=allow_unknown_models())
        on_patched(self.model)

    __init__.__wrapped__ = original_init
    return __init__


def reward_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``RewardTrainer.compute_loss`` (TRL 1.16) with :func:`alignkernels.bradley_terry_loss`.

    Loss and logged metrics are the function's (TRL's definitions); across processes they are
    reduced as TRL reduces them: ``accuracy`` and ``margin`` averaged over processes
    (``gather_for_metrics``), ``min_reward`` / ``max_reward`` the min / max of every process's,
    ``mean_reward`` the mean of every process's mean (TRL's mean of the gathered rewards: every
    process holds the same number of rewards).
    """
    mode = "train" if self.model.training else "eval"
    inputs["use_cache"] = False
    outputs = model(**inputs)
    rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
    loss, metrics = bradley_terry_loss(
        rewards_chosen,
        rewards_rejected,
        margin=inputs.get("margin"),
        center_rewards_coefficient=self.args.center_rewards_coefficient,
    )
    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    gather = self.accelerator.gather
    logged = self._metrics[mode]
    logged["min_reward"].append(gather(metrics["min_reward"]).min().item())
    logged["mean_reward"].append(gather(metrics["mean_reward"]).mean().item())
    logged["max_reward"].append(gather(metrics["max_reward"]).max().item())
    logged["accuracy"].append(self.accelerator.gather_for_metrics(metrics["accuracy"]).mean().item())
    logged["margin"].append(self.accelerator.gather_for_metrics(metrics["margin"]).mean().item())
    return (loss, outputs) if return_outputs else loss
