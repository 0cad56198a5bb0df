"""Every test here starts and ends with the verl / OpenRLHF drop-ins removed: a failing test never leaves
a framework patched for the next one. Only the drop-ins a test file imported are touched (nothing here
imports verl or OpenRLHF, which the files import or skip themselves)."""
from __future__ import annotations

import sys

import pytest

DROP_INS = ("alignkernels.integrations.verl", "alignkernels.integrations.openrlhf")


def _remove_loaded_drop_ins():
    for name in DROP_INS:
        module = sys.modules.get(name)
        if module is not None:
            module.remove()


@pytest.fixture(autouse=True)
def _drop_ins_removed():
    _remove_loaded_drop_ins()
    yield
    _remove_loaded_drop_ins()
