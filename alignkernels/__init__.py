"""alignkernels: fused Triton and CUDA kernels for LLM alignment training.

Public names are imported lazily (``alignkernels.token_logprobs`` imports only its own op),
so ``import alignkernels`` stays cheap and never compiles a kernel.

``alignkernels.kernels`` is the checkout's top-level ``kernels/`` folder, mapped by the install
(``[tool.setuptools.package-dir]`` in ``pyproject.toml``). Imported straight from a checkout with no
install at all (a machine where ``pip install -e .`` failed, see ``bench/gpu_session.sh``), this
module maps that folder itself: only when nothing else on the import path provides the name.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

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
    "verl_policy_loss": "alignkernels.losses.verl_policy",
    "VerlPolicyConfig": "alignkernels.losses.verl_policy",
    "RolloutCorrection": "alignkernels.losses.verl_policy",
    "verl_rollout_correction": "alignkernels.losses.verl_policy",
    "value_loss": "alignkernels.losses.value",
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
    "fused_linear_verl_policy_loss": "alignkernels.losses.fused",
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


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds ``alignkernels.kernels`` in the checkout's ``kernels/`` folder (uninstalled checkout)."""

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.folder, "__init__.py"), submodule_search_locations=[self.folder])


def _map_checkout_kernels() -> None:
    name = __name__ + ".kernels"
    if name in sys.modules or any(isinstance(f, _CheckoutKernels) for f in sys.meta_path):
        return
    try:
        if importlib.util.find_spec(name) is not None:  # an install (editable or not) maps it
            return
    except (ImportError, ValueError):
        pass
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.meta_path.append(_CheckoutKernels(folder))


_map_checkout_kernels()


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
