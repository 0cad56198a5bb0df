"""The fixed public names of DESIGN.md resolve, and importing the package compiles nothing."""
import subprocess
import sys

import alignkernels

FIXED_NAMES = [
    "token_logprobs", "linear_logprobs", "gather_last", "last_token_index", "sequence_logprobs", "dpo_loss",
    "grpo_loss", "ppo_loss", "gae", "group_advantages", "bradley_terry_loss", "fused_linear_dpo_loss",
    "fused_linear_grpo_loss", "fused_linear_ppo_loss",
]  # fmt: skip


def test_every_export_resolves():
    for name in alignkernels.__all__:
        assert getattr(alignkernels, name) is not None, name
    assert set(FIXED_NAMES) <= set(alignkernels.__all__)


def test_import_is_lazy():
    code = "import sys, alignkernels; print(any(m.startswith('alignkernels.kernels') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_integrations_import():
    from alignkernels.integrations import transformers as hf_integration
    from alignkernels.integrations import trl as trl_integration

    assert callable(hf_integration.patch_causal_lm) and callable(trl_integration.apply)
