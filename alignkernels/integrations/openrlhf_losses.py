"""OpenRLHF's losses on alignkernels: the swaps of ``alignkernels.integrations.openrlhf.apply(losses=True)``.

The seams (OpenRLHF 0.11.2, ``openrlhf/models/loss.py``), rebound by
:mod:`alignkernels.integrations.rebind` in every loaded ``openrlhf`` module that binds them (the
package ``openrlhf.models``, ``openrlhf/trainer/ray/ppo_actor.py``, ``openrlhf/trainer/ray/ppo_critic.py``,
``openrlhf/trainer/dpo_trainer.py``; a module imported later copies ours from the package):

- ``PolicyLoss`` → a subclass of OpenRLHF's class (its constructor, arguments and checks unchanged)
  whose ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
  dp_size=1, batch_num_tokens=None, global_batch_size=None)`` returns OpenRLHF's
  ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` from
  :func:`alignkernels.losses.openrlhf_policy.openrlhf_policy_loss` (``ppo`` and ``gspo``, every
  ``is_correction_*`` gate; ``vllm_kl`` / ``is_filter_ratio`` are ``None`` where OpenRLHF's are).
- ``ValueLoss`` → a subclass whose ``forward(values, old_values, returns, action_mask=None, dp_size=1,
  batch_num_tokens=None, global_batch_size=None)`` is :func:`alignkernels.losses.value.value_loss`
  with ``semantics="openrlhf"``: ``cliprange_value=clip_eps`` (``None``: no clip), ``"token-mean"``
  (``token_level_loss=True``) or ``"seq-mean-token-mean"``, the global-batch arguments as
  :class:`alignkernels.losses.aggregation.GlobalBatch`.
- ``DPOLoss`` → a subclass whose ``forward(policy_chosen_logps, policy_rejected_logps,
  reference_chosen_logps, reference_rejected_logps)`` returns ``(loss, chosen_rewards,
  rejected_rewards)`` from :func:`alignkernels.losses.dpo.dpo_loss`: ``loss_type="sigmoid"`` with
  ``cdpo=True`` (cDPO, smoothed by ``label_smoothing``; 0: plain DPO), or ``"ipo"`` with unit
  lengths (OpenRLHF's IPO does not divide by the lengths, TRL's does; it ignores
  ``label_smoothing``). A ``label_smoothing`` outside ``[0, 1]`` (a flip probability) is a
  ``ValueError`` when the loss is built.
- ``aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
  global_batch_size=None)`` (bound by name in ``ppo_actor.py`` for the KL and entropy terms, and
  read by ``SFTLoss``) → :func:`alignkernels.losses.aggregation.aggregate` with
  ``semantics="openrlhf"`` (fp16 / bf16 losses reduced in fp32).

Left stock (named in the log line of :func:`alignkernels.integrations.openrlhf.apply`): the other
loss classes of ``openrlhf/models/loss.py`` (``GPTLMLoss``, ``SFTLoss``, ``PairWiseLoss``,
``LogExpLoss``), which alignkernels has no rows for.

Semantics: OpenRLHF's values, gradients and returned statistics (fp64: 1e-7 relative, from its
``+1e-8`` in sequence means), pinned in ``tests/frameworks_integration/test_openrlhf_losses.py``
against the stock classes. Differences, on purpose: a fully masked micro-batch gives 0, not NaN;
``action_mask=None`` counts every token (as OpenRLHF's plain mean, also with the global-batch
arguments, where OpenRLHF fails). Memory and numerics: eager
``[B, T]`` / ``[B]`` PyTorch, those of the loss modules.
"""
from __future__ import annotations

from typing import Callable

import torch

from alignkernels.integrations.rebind import Swap
from alignkernels.losses.aggregation import GlobalBatch, aggregate
from alignkernels.losses.dpo import dpo_loss
from alignkernels.losses.openrlhf_policy import ISCorrection, openrlhf_policy_loss
from alignkernels.losses.value import value_loss

__all__ = ["policy_loss_class", "value_loss_class", "dpo_loss_class", "make_aggregate_loss", "loss_swaps"]


def _mask_or_ones(mask, like: torch.Tensor):
    """OpenRLHF's ``action_mask=None``: every token counts."""
    if mask is None and isinstance(like, torch.Tensor):
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return mask


def _agg_mode(token_level_loss: bool) -> str:
    return "token-mean" if token_level_loss else "seq-mean-token-mean"


def policy_loss_class(stock: type, count: Callable[[], None]) -> type:
    """OpenRLHF's ``PolicyLoss`` class ``stock`` with the forward on :func:`openrlhf_policy_loss`."""

    class PolicyLoss(stock):
        __doc__ = f"OpenRLHF's ``PolicyLoss`` on alignkernels (see {__name__})."

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                    batch_num_tokens=None, global_batch_size=None):  # fmt: skip
            count()
            action_mask = _mask_or_ones(action_mask, log_probs)
            correction = ISCorrection(self.is_correction_level, self.is_correction_mode, self.is_correction_gating,
                                      tuple(self.is_correction_threshold))  # fmt: skip
            loss, metrics = openrlhf_policy_loss(
                log_probs, old_log_probs, advantages, action_mask, policy_loss_type=self.policy_loss_type,
                clip_eps_low=self.clip_eps_low, clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip,
                token_level_loss=self.token_level_loss, rollout_logp=rollout_log_probs, is_correction=correction,
                global_batch=GlobalBatch(dp_size, batch_num_tokens, global_batch_size),
            )  # fmt: skip
            return (loss, metrics["clip_ratio"], metrics["ppo_kl"], metrics.get("vllm_kl"),
                    metrics.get("is_filter_ratio"))  # fmt: skip

    return PolicyLoss


def value_loss_class(stock: type, count: Callable[[], None]) -> type:
    """OpenRLHF's ``ValueLoss`` class ``stock`` with the forward on :func:`value_loss`."""

    class ValueLoss(stock):
        __doc__ = f"OpenRLHF's ``ValueLoss`` on alignkernels (see {__name__})."

        def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                    global_batch_size=None):  # fmt: skip
            count()
            loss, _ = value_loss(values, old_values, returns, _mask_or_ones(action_mask, values),
                                 cliprange_value=self.clip_eps, loss_agg_mode=_agg_mode(self.token_level_loss),
                                 semantics="openrlhf",
                                 global_batch=GlobalBatch(dp_size, batch_num_tokens, global_batch_size))  # fmt: skip
            return loss

    return ValueLoss


def dpo_loss_class(stock: type, count: Callable[[], None]) -> type:
    """OpenRLHF's ``DPOLoss`` class ``stock`` with the forward on :func:`dpo_loss` (cDPO included)."""

    class DPOLoss(stock):
        __doc__ = f"OpenRLHF's ``DPOLoss`` on alignkernels (see {__name__})."

        def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
            super().__init__(beta, label_smoothing, ipo)
            if not ipo and not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
                raise ValueError(f"DPOLoss: label_smoothing (cDPO's label-flip probability) must be a number in "
                                 f"[0, 1], got {label_smoothing!r}")  # fmt: skip

        def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps):  # fmt: skip
            count()
            kw = dict(loss_type="sigmoid", label_smoothing=self.label_smoothing, cdpo=True)
            if self.ipo:  # OpenRLHF's IPO: the summed log-ratios, not divided by the lengths
                ones = torch.ones(policy_chosen_logps.shape, device=policy_chosen_logps.device)
                kw = dict(loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)
            loss, _ = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=self.beta, **kw)  # fmt: skip
            chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
            rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
            return loss, chosen_rewards, rejected_rewards

    return DPOLoss


def make_aggregate_loss(count: Callable[[], None]):
    """OpenRLHF's ``aggregate_loss`` (same signature) on :func:`alignkernels.losses.aggregation.aggregate`,
    ``semantics="openrlhf"``."""

    def aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None):  # fmt: skip
        count()
        if isinstance(loss, torch.Tensor) and loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        return aggregate(loss, _mask_or_ones(loss_mask, loss), _agg_mode(token_level_loss), semantics="openrlhf",
                         global_batch=GlobalBatch(dp_size, batch_num_tokens, global_batch_size))  # fmt: skip

    aggregate_loss.__qualname__, aggregate_loss.__doc__ = "aggregate_loss", make_aggregate_loss.__doc__
    return aggregate_loss


def loss_swaps(loss_module, count: Callable[[], None]) -> tuple[list[Swap], list[str], list[str]]:
    """The swaps of ``apply(losses=True)`` on the loaded ``openrlhf.models.loss`` module:
    ``(swaps, swapped names, loss classes left stock)``."""
    swaps, swapped = [], []
    for name, make in (("PolicyLoss", policy_loss_class), ("ValueLoss", value_loss_class),
                       ("DPOLoss", dpo_loss_class)):  # fmt: skip
        stock = vars(loss_module).get(name)
        if not isinstance(stock, type):
            raise ImportError(f"alignkernels.integrations.openrlhf: openrlhf.models.loss.{name} not found "
                              "(OpenRLHF 0.11.2 has it)")  # fmt: skip
        replacement = make(stock, count)
        replacement.__qualname__ = replacement.__name__ = name
        swaps.append(Swap(stock, replacement))
        swapped.append(name)
    stock = vars(loss_module).get("aggregate_loss")
    if not callable(stock):
        raise ImportError("alignkernels.integrations.openrlhf: openrlhf.models.loss.aggregate_loss not found "
                          "(OpenRLHF 0.11.2 has it)")  # fmt: skip
    swaps.append(Swap(stock, make_aggregate_loss(count)))
    swapped.append("aggregate_loss")
    left = [name for name, value in vars(loss_module).items() if isinstance(value, type)
            and issubclass(value, torch.nn.Module) and value.__module__ == loss_module.__name__
            and name not in swapped]  # fmt: skip
    return swaps, swapped, left
