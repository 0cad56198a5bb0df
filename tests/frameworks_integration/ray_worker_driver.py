"""A Ray driver for ``test_ray_workers.py``: starts a one-CPU local Ray instance whose job-level
``runtime_env`` names alignkernels' setup hook, exactly as the user's one config line does, and asks
Ray actors (other processes) what they see.

    python ray_worker_driver.py FRAMEWORK OUT.json      # FRAMEWORK: openrlhf or verl

Writes ``{"driver": ..., "on": ..., "off": ..., "seconds": ...}``: the driver's pid and whether the
driver itself is patched; for an actor under the job's ``runtime_env`` (``on``) and one whose own
``runtime_env`` adds ``ALIGNKERNELS_<FRAMEWORK>=0`` (``off``; Ray merges a child's ``env_vars`` into
the job's and keeps the hook): its pid, ``is_applied()``, the backend option it read from the
environment, whether the framework's by-name binding is ours, and ``adapter_calls()`` after the
framework's own log-prob function ran once on a small batch.

OpenRLHF needs ``flash_attn`` to import ``openrlhf.models``: its stand-in is written as source files
into a temporary folder on the ``PYTHONPATH`` the Ray processes inherit (``openrlhf_stand_ins.py``).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from openrlhf_stand_ins import write_stand_in_packages  # noqa: E402

BACKEND = "torch"  # the option the workers get through the job's env_vars (not the default "auto")


def probe(framework: str) -> dict:
    """What this process sees (runs inside a Ray actor)."""
    import torch

    ak = importlib.import_module(f"alignkernels.integrations.{framework}")
    logits = torch.randn(2, 3, 11)
    labels = torch.zeros(2, 3, dtype=torch.long)
    if framework == "openrlhf":
        seam = importlib.import_module("openrlhf.models.actor")
        ours = seam.log_probs_from_logits is ak.log_probs_from_logits
        seam.log_probs_from_logits(logits, labels)
    else:
        seam = importlib.import_module("verl.utils.torch_functional")
        ours = seam.logprobs_from_logits is ak.logprobs_from_logits
        seam.logprobs_from_logits(logits, labels)
    return {"pid": os.getpid(), "applied": ak.is_applied(), "backend": ak.options().backend, "binding_is_ours": ours,
            "adapter_calls": ak.adapter_calls()}  # fmt: skip


class Probe:
    """A Ray actor (OpenRLHF's and verl's actors are Ray actors too)."""

    def run(self, framework: str) -> dict:
        return probe(framework)


def main(framework: str, out_path: str) -> None:
    start = time.monotonic()
    switch = f"ALIGNKERNELS_{framework.upper()}"
    for name in list(os.environ):
        if name.startswith(switch):
            del os.environ[name]
    stubs = tempfile.mkdtemp(prefix="ak-stand-ins-")
    if framework == "openrlhf":
        write_stand_in_packages(stubs, ("flash_attn",))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (stubs, os.environ.get("PYTHONPATH")) if p)
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # no `uv run` detection in the workers
    import ray

    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        ray.init(
            num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1",
            _temp_dir=ray_dir,
            object_store_memory=80 * 1024 * 1024,
            runtime_env={"worker_process_setup_hook": f"alignkernels.integrations.{framework}.worker_setup",
                         "env_vars": {f"{switch}_BACKEND": BACKEND}},
        )  # fmt: skip
        actor = ray.remote(num_cpus=0)(Probe)
        on = actor.remote()
        off = actor.options(runtime_env={"env_vars": {switch: "0"}}).remote()
        results = ray.get([on.run.remote(framework), off.run.remote(framework)], timeout=240)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(stubs, ignore_errors=True)
    driver = importlib.import_module(f"alignkernels.integrations.{framework}")
    record = {"driver": {"pid": os.getpid(), "applied": driver.is_applied()}, "on": results[0], "off": results[1],
              "seconds": time.monotonic() - start}  # fmt: skip
    Path(out_path).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
