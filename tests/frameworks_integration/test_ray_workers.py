"""The one config line in a real Ray worker: ``runtime_env={"worker_process_setup_hook":
"alignkernels.integrations.<framework>.worker_setup"}`` patches the actor processes, not the driver.

Each case runs ``ray_worker_driver.py`` in a process of its own (a local Ray instance with one CPU,
no dashboard, a short ``_temp_dir``): a Ray actor under the job's ``runtime_env`` has the framework's
log-prob function rebound to ours, the backend option the job's ``env_vars`` set, and counts the call
it made; an actor whose ``runtime_env`` adds ``ALIGNKERNELS_<FRAMEWORK>=0`` is left stock; the driver
is left stock. About 40-60 s each on 2 busy cores (Ray start ~10 s, the actors' imports the rest).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

DRIVER = Path(__file__).with_name("ray_worker_driver.py")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["openrlhf", "verl"])
def test_setup_hook_patches_the_ray_worker_processes(framework, tmp_path):
    pytest.importorskip(framework)
    out = tmp_path / "record.json"
    # cwd outside the checkout: workers import the installed alignkernels, as a user's would
    proc = subprocess.run([sys.executable, str(DRIVER), framework, str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=540)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    on, off, driver = record["on"], record["off"], record["driver"]
    assert len({on["pid"], off["pid"], driver["pid"]}) == 3  # three processes
    assert on == {"pid": on["pid"], "applied": True, "backend": "torch", "binding_is_ours": True, "adapter_calls": 1}
    assert off == {"pid": off["pid"], "applied": False, "backend": "auto", "binding_is_ours": False,
                   "adapter_calls": 0}  # fmt: skip
    assert not driver["applied"]  # the hook runs in the workers, not in the driver
