"""The drop-ins under real sharded-parameter runs: 2 ranks on CPU (gloo), the model sharded with
``torch.distributed.fsdp.fully_shard`` (every parameter, the lm_head included, a DTensor at rest) or
by DeepSpeed ZeRO-3 (every parameter partitioned to ``numel() == 0`` at rest; skipped without
deepspeed).

``sharded_worker.py`` (one process per rank and mode, started here) compares one SFT step — TRL's fused
forward after ``apply()``, or ``patch_causal_lm``'s ``return_token_logprobs=True`` — with stock TRL on
the unsharded model in one process: each rank's loss, and every parameter's full gradient against
the gradient of the ranks' mean loss (FSDP2 averages over ranks), to 1e-5. Two layouts: the lm_head
in the root unit (``fully_shard`` on each decoder layer and on the model: the usual layout, the head
is unsharded inside the model's forward) and the lm_head as its own unit (its weight stays a DTensor
in the model's forward). There, stock TRL 1.16 gathers it with a plain ``full_tensor()``, whose
backward leaves each rank its own gradient slice unaveraged — a wrong lm_head gradient, pinned as a
strict xfail; ``apply()`` gathers it with ``gather_lm_head(grad_reduce="avg")`` before TRL's forward
sees it (``GatherShardedHeadForward``), and ``patch_causal_lm`` does the same. Under ZeRO-3 the head
is gathered around the call and again in backward (``head_logprobs(recompute_in_backward=True)``);
``patch_causal_lm``'s output is a ``ModelOutput`` so ZeRO-3 arms its backward hooks (before, its
backward crashed accumulating the head gradient into the re-partitioned parameter).
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
WORKER = Path(__file__).with_name("sharded_worker.py")
_TRL_OWN_UNIT = (
    "TRL 1.16 add_fused_lm_head gathers a DTensor lm_head with full_tensor() and no grad_placements: each "
    "rank keeps its own gradient slice, unaveraged (fix upstream: full_tensor(grad_placements=[Partial('avg')]))"
)
FSDP2_CHECKS = [
    "trl_fused_head",
    "patch_causal_lm",
    "patch_causal_lm_lm_head_own_unit",
    pytest.param("stock_trl_lm_head_own_unit", marks=pytest.mark.xfail(strict=True, reason=_TRL_OWN_UNIT)),
    "trl_fused_head_lm_head_own_unit",  # apply() gathers the head itself (GatherShardedHeadForward)
]
ZERO3_CHECKS = ["trl_fused_head", "patch_causal_lm"]
_RESULTS: dict = {}


def _run_ranks(mode, tmp_path_factory):
    if mode not in _RESULTS:
        tmpdir = tmp_path_factory.mktemp(mode)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen([sys.executable, str(WORKER), mode, str(rank), str(WORLD), str(tmpdir)], env=env,
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
                pytest.fail(f"{mode} workers did not finish in {TIMEOUT_S} s")
        per_rank = []
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            path = tmpdir / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} exited {proc.returncode} without results:\n{log[-3000:]}"
            per_rank.append(json.loads(path.read_text()))
        _RESULTS[mode] = per_rank
    return _RESULTS[mode]


def _assert_passed(per_rank, check):
    failures = [f"rank {r}:\n{res[check]['error']}" for r, res in enumerate(per_rank) if not res[check]["ok"]]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("check", FSDP2_CHECKS)
def test_fsdp2_step_matches_single_process(check, tmp_path_factory):
    _assert_passed(_run_ranks("fsdp2", tmp_path_factory), check)


@pytest.mark.slow
@pytest.mark.parametrize("check", ZERO3_CHECKS)
def test_zero3_step_matches_single_process(check, tmp_path_factory):
    pytest.importorskip("deepspeed")
    _assert_passed(_run_ranks("zero3", tmp_path_factory), check)
