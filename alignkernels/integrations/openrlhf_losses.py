"""OpenRLHF's losses on alignkernels: the swaps of ``alignkernels.integrations.openrlhf.apply(losses=True)``.

The seams (OpenRLHF 0.11.2, ``openrlhf/models/loss.py``), rebound by
:mod:`alignkernels.integrations.rebind` in every loaded ``openrlhf`` module that binds them (the
package ``openrlhf.models``, ``openrlhf/trainer/ray/ppo_actor.py``, ``openrlhf/trainer/dpo_trainer.py``;
a module imported later copies ours from the package):

- ``PolicyLoss`` → a subclass of OpenRLHF's class (its constructor, arguments and checks unchanged)
  whose ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
  dp_size=1, batch_num_tokens=None, global_batch_size=None)`` returns OpenRLHF's
  ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` from
  :func:`alignkernels.losses.openrlhf_policy.openrlhf_policy_loss` (``ppo`` and ``gspo``, every
  ``is_correction_*`` gate; ``vllm_kl`` / ``is_filter_ratio`` are ``None`` where OpenRLHF's are).
- ``DPOLoss`` → a subclass whose ``forward(policy_chosen_logps, policy_rejected_logps,
  reference_chosen_logps, reference_rejected_logps)`` returns ``(loss, chosen_rewards,
  rejected_rewards)`` from :func:`alignkernels.losses.dpo.dpo_loss`: ``loss_type="sigmoid"``
  (``label_smoothing=0``), or ``"ipo"`` with unit lengths (OpenRLHF's IPO does not divide by the
  lengths, TRL's does). cDPO (``label_smoothing > 0`` without ``ipo``) is not a row of
  ``losses/dpo.py``: such an instance runs OpenRLHF's own forward, said once at INFO when built.

Not swapped: ``ValueLoss`` (``losses/ppo.py`` has TRL's clipped value loss inside ``ppo_loss``
only, token-mean, without OpenRLHF's ``token_level_loss`` / global-batch aggregation); the log line
of :func:`alignkernels.integrations.openrlhf.apply` names it.

Semantics: OpenRLHF's values, gradients and returned statistics (fp64: 1e-7 relative, from its
``+1e-8`` in sequence means), pinned in ``tests/frameworks_integration/test_openrlhf_losses.py``
against the stock classes. Differences, on purpose: a fully masked micro-batch gives 0, not NaN;
``action_mask=None`` counts every token (as OpenRLHF's plain mean). Memory and numerics: eager
``[B, T]`` / ``[B]`` PyTorch, those of the loss modules.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from alignkernels.integrations.rebind import Swap
from alignkernels.losses.aggregation import GlobalBatch
from alignkernels.losses.dpo import dpo_loss
from alignkernels.losses.openrlhf_policy import ISCorrection, openrlhf_policy_loss

__all__ = ["policy_loss_class", "dpo_loss_class", "loss_swaps", "STOCK_CLASSES"]

logger = logging.getLogger("alignkernels.integrations.openrlhf")
STOCK_CLASSES = ("ValueLoss",)  # OpenRLHF loss classes apply(losses=True) leaves stock


def policy_loss_class(stock: type, count: Callable[[], None]) -> type:
    """OpenRLHF's ``PolicyLoss`` class ``stock`` with the forward on :func:`openrlhf_policy_loss`."""

    class PolicyLoss(stock):
        __doc__ = f"OpenRLHF's ``PolicyLoss`` on alignkernels (see {__name__})."

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                    batch_num_tokens=None, global_batch_size=None):  # fmt: skip
            count()
            if action_mask is None and isinstance(log_probs, torch.Tensor):
                action_mask = torch.ones(log_probs.shape, dtype=torch.bool, device=log_probs.device)
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


def dpo_loss_class(stock: type, count: Callable[[], None]) -> type:
    """OpenRLHF's ``DPOLoss`` class ``stock`` with the forward on :func:`dpo_loss` (cDPO: stock)."""

    class DPOLoss(stock):
        __doc__ = f"OpenRLHF's ``DPOLoss`` on alignkernels (see {__name__})."

        def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
            super().__init__(beta, label_smoothing, ipo)
            if label_smoothing and not ipo:
                logger.info("alignkernels: DPOLoss(label_smoothing=%s) is cDPO, not a row of alignkernels' dpo_loss: "
                            "this instance runs OpenRLHF's own forward", label_smoothing)  # fmt: skip

        def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps):  # fmt: skip
            if self.label_smoothing and not self.ipo:
                return super().forward(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                       reference_rejected_logps)  # fmt: skip
            count()
            lengths = {}
            if self.ipo:  # OpenRLHF's IPO: the summed log-ratios, not divided by the lengths
                ones = torch.ones(policy_chosen_logps.shape, device=policy_chosen_logps.device)
                lengths = dict(chosen_lengths=ones, rejected_lengths=ones)
            loss, _ = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=self.beta, loss_type="ipo" if self.ipo else "sigmoid",
                               **lengths)  # fmt: skip
            chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
            rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
            return loss, chosen_rewards, rejected_rewards

    return DPOLoss


def loss_swaps(loss_module, count: Callable[[], None]) -> list[Swap]:
    """The swaps of ``apply(losses=True)`` on the loaded ``openrlhf.models.loss`` module."""
    swaps = []
    for name, make in (("PolicyLoss", policy_loss_class), ("DPOLoss", dpo_loss_class)):
        stock = vars(loss_module).get(name)
        if not isinstance(stock, type):
            raise ImportError(f"alignkernels.integrations.openrlhf: openrlhf.models.loss.{name} not found "
                              "(OpenRLHF 0.11.2 has it)")  # fmt: skip
        replacement = make(stock, count)
        replacement.__qualname__ = replacement.__name__ = name
        swaps.append(Swap(stock, replacement))
    return swaps
