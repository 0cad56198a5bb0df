"""The drop-ins under a real FSDP2 run: 2 ranks on CPU (gloo), the model sharded with
``torch.distributed.fsdp.fully_shard`` (every parameter, the lm_head included, a DTensor at rest).

``fsdp2_worker.py`` (one process per rank, started here) compares one SFT step — TRL's fused
forward after ``apply()``, or ``patch_causal_lm``'s ``return_token_logprobs=True`` — with stock TRL on
the unsharded model in one process: each rank's loss, and every parameter's full gradient against
the gradient of the ranks' mean loss (FSDP2 averages over ranks), to 1e-5. Two layouts: the lm_head
in the root unit (``fully_shard`` on each decoder layer and on the model: the usual layout, the head
is unsharded inside the model's forward) and the lm_head as its own unit (its weight stays a DTensor
in the model's forward). There, stock TRL 1.16 gathers it with a plain ``full_tensor()``, whose
backward leaves each rank its own gradient slice unaveraged — a wrong lm_head gradient, pinned as a
strict xfail; ``apply()`` gathers it with ``gather_lm_head(grad_reduce="avg")`` before TRL's forward
sees it (``GatherShardedHeadForward``), and ``patch_causal_lm`` does the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("torch without FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORLD = 2
TIMEOUT_S = 300
WORKER = Path(__file__).with_name("fsdp2_worker.py")
_TRL_OWN_UNIT = (
    "TRL 1.16 add_fused_lm_head gathers a DTensor lm_head with full_tensor() and no grad_placements: each "
    "rank keeps its own gradient slice, unaveraged (fix upstream: full_tensor(grad_placements=[Partial('avg')]))"
)
CHECKS = [
    "trl_fused_head",
    "patch_causal_lm",
    "patch_causal_lm_lm_head_own_unit",
    pytest.param("stock_trl_lm_head_own_unit", marks=pytest.mark.xfail(strict=True, reason=_TRL_OWN_UNIT)),
    "trl_fused_head_lm_head_own_unit",  # apply() gathers the head itself (GatherShardedHeadForward)
]
_RESULTS: list = []


def _run_ranks(tmp_path_factory):
    if not _RESULTS:
        tmpdir = tmp_path_factory.mktemp("fsdp2")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(tmpdir)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            for rank in range(WORLD)
        ]
        deadline = time.monotonic() + TIMEOUT_S
        logs = []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                pytest.fail(f"FSDP2 workers did not finish in {TIMEOUT_S} s")
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            path = tmpdir / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} exited {proc.returncode} without results:\n{log[-3000:]}"
            _RESULTS.append(json.loads(path.read_text()))
    return _RESULTS


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_fsdp2_step_matches_single_process(check, tmp_path_factory):
    per_rank = _run_ranks(tmp_path_factory)
    failures = [f"rank {r}:\n{res[check]['error']}" for r, res in enumerate(per_rank) if not res[check]["ok"]]
    assert not failures, "\n".join(failures)
