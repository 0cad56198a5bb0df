"""The public names (README, ``alignkernels/__init__.py``) resolve, and importing the package compiles nothing."""
import importlib
import pkgutil
import subprocess
import sys

import pytest
import torch

import alignkernels
from alignkernels._utils import BACKENDS, OpBackends

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


# ----------------------------------------------------------------------------------------------
# One dispatch rule: a backend an op lacks is the same clear ValueError on every op
# ----------------------------------------------------------------------------------------------

for _pkg in ("alignkernels.ops", "alignkernels.losses"):  # every op module declares its backends on import
    for _info in pkgutil.iter_modules(importlib.import_module(_pkg).__path__):
        importlib.import_module(f"{_pkg}.{_info.name}")

MISSING = [(op, b) for op, spec in sorted(OpBackends.registry.items()) for b in BACKENDS[1:] if b not in spec.backends]


def _lacks_message(op, backend):
    return rf"{op} has no backend='{backend}'; its backends are"


def test_every_op_declares_backends():
    assert {"token_logprobs", "linear_logprobs", "gather_last", "gather_steps"} <= set(OpBackends.registry)
    assert ("linear_logprobs", "cuda") in MISSING  # GEMM-bound: no hand-written CUDA kernel, never a silent triton


@pytest.mark.parametrize("op,backend", MISSING, ids=[f"{o}-{b}" for o, b in MISSING])
def test_missing_backend_is_one_clear_error(op, backend):
    with pytest.raises(ValueError, match=_lacks_message(op, backend)):
        OpBackends.registry[op].resolve(backend, torch.device("cpu"), torch.float32)


def _public_calls():
    """The public entry point of each op this file can call with valid inputs, keyed by op name."""
    import alignkernels

    logits, labels = torch.randn(2, 5), torch.tensor([1, 3])
    hidden, weight = torch.randn(2, 4), torch.randn(5, 4)
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    return {
        "token_logprobs": lambda b: alignkernels.token_logprobs(logits, labels, backend=b),
        "linear_logprobs": lambda b: alignkernels.linear_logprobs(hidden, weight, labels, backend=b),
        "gather_last": lambda b: alignkernels.gather_last(x, mask, backend=b),
        "gather_steps": lambda b: alignkernels.gather_steps(x, mask, backend=b),
    }


@pytest.mark.parametrize("op,backend", [m for m in MISSING if m[0] in _public_calls()])
def test_public_op_raises_the_dispatch_error(op, backend):
    with pytest.raises(ValueError, match=_lacks_message(op, backend)):
        _public_calls()[op](backend)


@pytest.mark.parametrize("op", sorted(_public_calls()))
def test_unknown_backend_names_the_op(op):
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of"):
        _public_calls()[op]("nope")


CUDA_OPS = sorted(op for op, spec in OpBackends.registry.items() if "cuda" in spec.backends)


@pytest.mark.parametrize("op", CUDA_OPS)
def test_rocm_refuses_the_cuda_extension_and_auto_is_triton(op, monkeypatch):
    """Under a ROCm build of torch (AMD GPUs are ``cuda`` devices), ``backend='cuda'`` names the CUDA C++
    extension and refuses; ``auto`` (also with ``ALIGNKERNELS_BACKEND=cuda``) picks Triton."""
    spec, amd_gpu = OpBackends.registry[op], torch.device("cuda", 0)  # a device object: no GPU touched
    assert spec.resolve("cuda", amd_gpu, torch.float32) == "cuda"  # NVIDIA build: the extension
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    with pytest.raises(ValueError, match=rf"{op}: backend='cuda' is the CUDA C\+\+ extension .*ROCm build of torch"):
        spec.resolve("cuda", amd_gpu, torch.float32)
    want = "triton" if "triton" in spec.backends else spec.auto_choice("cuda", torch.bfloat16)
    assert spec.resolve("auto", amd_gpu, torch.bfloat16) == want
    monkeypatch.setenv("ALIGNKERNELS_BACKEND", "cuda")
    assert spec.resolve("auto", amd_gpu, torch.bfloat16) == want
