"""Fixtures that import the installed verl / OpenRLHF loss modules (skipped where not installed).

OpenRLHF's ``openrlhf.models`` package imports its ring-attention helpers, which import the
GPU-only ``flash_attn`` at module level; none of the functions pinned here touches them. A
minimal stand-in (names only, each raising if called) is put in ``sys.modules`` just for that
import and removed again, after ``transformers`` has cached "flash_attn is not installed".
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest


@pytest.fixture(scope="session")
def verl_core():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def _flash_attn_stand_in() -> dict[str, types.ModuleType]:
    def unavailable(*args, **kwargs):
        raise RuntimeError("flash_attn stand-in: the GPU-only package is not installed")

    modules = {}
    for name, attrs in (
        ("flash_attn", {}),
        ("flash_attn.bert_padding", dict.fromkeys(("index_first_axis", "pad_input", "rearrange", "unpad_input"),
                                                  unavailable)),  # fmt: skip
        ("flash_attn.utils", {}),
        ("flash_attn.utils.distributed", {"all_gather": unavailable}),
    ):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name.count(".") < 1)
        module.__dict__.update(attrs)
        if not name.endswith(("bert_padding", "distributed")):
            module.__path__ = []
        modules[name] = module
    return modules


@pytest.fixture(scope="session")
def openrlhf_models():
    """``(openrlhf.models.loss, openrlhf.models.utils)``."""
    pytest.importorskip("openrlhf")
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    importlib.import_module("transformers.modeling_flash_attention_utils")  # caches: no flash_attn
    stand_in = {} if importlib.util.find_spec("flash_attn") is not None else _flash_attn_stand_in()
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stand_in.items():
            mp.setitem(sys.modules, name, module)
        loss = importlib.import_module("openrlhf.models.loss")
        utils = importlib.import_module("openrlhf.models.utils")
    return loss, utils
