"""Fixtures that import the installed verl / OpenRLHF loss modules (skipped where not installed;
an error instead under ``ALIGNKERNELS_REQUIRE_FRAMEWORKS=1``, which ``.ci/run`` sets).

OpenRLHF's ``openrlhf.models`` package imports its ring-attention helpers, which import the
GPU-only ``flash_attn`` at module level, and its experience maker imports the Ray launcher, which
imports ``vllm``; none of the functions pinned here touches them. Minimal stand-ins (names only,
each raising if called) are put in ``sys.modules`` just for those imports and removed again, after
``transformers`` has cached "flash_attn is not installed".
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest


# Set by .ci/run, which installs both frameworks: there a missing import is an error, not a skip.
REQUIRED = os.environ.get("ALIGNKERNELS_REQUIRE_FRAMEWORKS") == "1"


def _import_or_skip(name: str):
    return importlib.import_module(name) if REQUIRED else pytest.importorskip(name)


@pytest.fixture(scope="session")
def verl_core():
    return _import_or_skip("verl.trainer.ppo.core_algos")


def _unavailable(*args, **kwargs):
    raise RuntimeError("stand-in of a GPU-only package that is not installed")


# GPU-only packages OpenRLHF imports at module level, and the names it takes from them
GPU_ONLY = {
    "flash_attn": {},
    "flash_attn.bert_padding": dict.fromkeys(
        ("index_first_axis", "pad_input", "rearrange", "unpad_input"), _unavailable
    ),
    "flash_attn.utils": {},
    "flash_attn.utils.distributed": {"all_gather": _unavailable},
    "vllm": {},
    "vllm.inputs": {"TokensPrompt": _unavailable},
    "vllm.utils": {"random_uuid": _unavailable},
}


def _stand_ins() -> dict[str, types.ModuleType]:
    modules = {}
    for name, attrs in GPU_ONLY.items():
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            continue  # the real package is installed
        is_package = any(other.startswith(name + ".") for other in GPU_ONLY)
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
        if is_package:
            module.__path__ = []
        module.__dict__.update(attrs)
        modules[name] = module
    return modules


def _import_openrlhf(*names):
    for dependency in ("openrlhf", "deepspeed", "peft", "ray", "torchdata", "aiohttp", "pylatexenc"):
        _import_or_skip(dependency)
    importlib.import_module("transformers.modeling_flash_attention_utils")  # caches: no flash_attn
    with pytest.MonkeyPatch.context() as mp:
        for name, module in _stand_ins().items():
            mp.setitem(sys.modules, name, module)
        return tuple(importlib.import_module(name) for name in names)


@pytest.fixture(scope="session")
def openrlhf_models():
    """``(openrlhf.models.loss, openrlhf.models.utils)``."""
    return _import_openrlhf("openrlhf.models.loss", "openrlhf.models.utils")


@pytest.fixture(scope="session")
def openrlhf_experience_maker():
    """``openrlhf.trainer.ppo_utils.experience_maker`` (advantages, returns, whitening)."""
    return _import_openrlhf("openrlhf.trainer.ppo_utils.experience_maker")[0]


@pytest.fixture(scope="session")
def gpu_only_stand_ins():
    """The names of the modules that get stand-ins while OpenRLHF is imported."""
    return tuple(GPU_ONLY)
