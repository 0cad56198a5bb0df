"""alignkernels: fused Triton and CUDA kernels for LLM alignment training.

Public names are imported lazily (``alignkernels.token_logprobs`` imports only its own op),
so ``import alignkernels`` stays cheap and never compiles a kernel.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "token_logprobs": "alignkernels.ops.token_logprobs",
    "linear_logprobs": "alignkernels.ops.linear_logprobs",
    "gather_last": "alignkernels.ops.gather",
    "last_token_index": "alignkernels.ops.gather",
    "sequence_logprobs": "alignkernels.ops.gather",
    "dpo_loss": "alignkernels.losses.dpo",
    "DPOLoss": "alignkernels.losses.dpo",
    "grpo_loss": "alignkernels.losses.grpo",
    "GRPOLoss": "alignkernels.losses.grpo",
    "group_advantages": "alignkernels.losses.grpo",
    "ppo_loss": "alignkernels.losses.ppo",
    "PPOLoss": "alignkernels.losses.ppo",
    "gae": "alignkernels.losses.ppo",
    "agg_loss": "alignkernels.losses.ppo",
    "masked_whiten": "alignkernels.losses.ppo",
    "GlobalBatch": "alignkernels.losses.aggregation",
    "AGGREGATION_MODES": "alignkernels.losses.aggregation",
    "kl_estimate": "alignkernels.losses.kl",
    "KL_ESTIMATORS": "alignkernels.losses.kl",
    "estimate_advantages": "alignkernels.losses.advantages",
    "AdvantageConfig": "alignkernels.losses.advantages",
    "ADVANTAGE_ESTIMATORS": "alignkernels.losses.advantages",
    "bradley_terry_loss": "alignkernels.losses.reward",
    "BradleyTerryLoss": "alignkernels.losses.reward",
    "fused_linear_dpo_loss": "alignkernels.losses.fused",
    "fused_linear_grpo_loss": "alignkernels.losses.fused",
    "fused_linear_ppo_loss": "alignkernels.losses.fused",
    "fused_linear_cross_entropy": "alignkernels.losses.fused",
    "gather_steps": "alignkernels.ops.steps",
    "step_positions": "alignkernels.ops.steps",
    "StepPositions": "alignkernels.ops.steps",
    "prm_loss": "alignkernels.losses.prm",
    "fused_linear_prm_loss": "alignkernels.losses.prm",
    "prm_step_scores": "alignkernels.losses.prm",
    "aggregate_step_scores": "alignkernels.losses.prm",
    "fused_linear_bradley_terry_loss": "alignkernels.losses.prm",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
