"""Tests of the benchmark harness itself (not of the kernels): the CLI's --quick run writes
well-formed JSON and PNG plots, an out-of-memory case is recorded and the run continues (in
process and in a worker subprocess, including a worker killed by SIGKILL), missing peers are
skipped with a note, and CPU peak-RSS measurement sees a known allocation."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from bench import __main__ as cli
from bench.harness import (
    OpBench, Provider, RunConfig, annotate_vs_eager, call_mapped, run_suite, shapes_for, summarize_ms,
)

MIB = 1 << 20
FAKE_REGISTRY = "bench.test_bench_harness:fake_ops"


# ------------------------------------------------------------------------------------------------
# A fake op whose providers misbehave on purpose; also loaded by the worker subprocess by name.
# ------------------------------------------------------------------------------------------------
def _fake_inputs(shape, dtype, device):
    return {"x": torch.randn(shape["N"], 8, dtype=dtype, device=device, requires_grad=True)}


def _allocating(inputs):
    """Holds a 64 MiB buffer while computing: its peak must show in the measurement."""
    buf = torch.ones(16 * MIB, dtype=torch.float32)  # 64 MiB, touched
    return (inputs["x"] * buf[:8]).sum(-1)


def _raises_oom(inputs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 TiB (injected by the test)")


def _raises_memory_error(inputs):
    raise MemoryError("injected by the test")


def _killed(inputs):
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def _plain(inputs):
    return inputs["x"].sum(-1)


def fake_ops():
    return {
        "fake": OpBench(
            name="fake",
            title="fake op for the harness tests",
            make_inputs=_fake_inputs,
            providers=[
                Provider("eager", _allocating, role="eager"),
                Provider("oom", _raises_oom),
                Provider("memerr", _raises_memory_error),
                Provider("killed", _killed),
                Provider("missing-peer", _plain, available=lambda device: "fakepeer not installed"),
                Provider("after", _plain, role="ours"),
            ],
            shapes={"cpu": [{"N": 4}, {"N": 8}], "quick": [{"N": 4}, {"N": 8}], "cuda": [{"N": 4}]},
            shape_keys=("N",),
            x_axis="N",
            to_loss=lambda out, inputs: out.sum(),
        )
    }


def _rows(results, provider):
    return [r for r in results["rows"] if r["provider"] == provider]


# ------------------------------------------------------------------------------------------------
def test_quick_cli_writes_json_and_png(tmp_path):
    rc = cli.main(["--quick", "--device", "cpu", "--ops", "token_logprobs,gae", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "timestamp", "repeats"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"token_logprobs", "gae"}
    assert any(r["role"] == "eager" for r in ok) and any(r["role"] == "ours" for r in ok)
    for r in ok:
        assert r["fwd_ms"]["median"] > 0 and r["fwd_ms"]["min"] <= r["fwd_ms"]["median"] <= r["fwd_ms"]["max"]
        assert r["input_bytes"] > 0
        if r["op"] == "token_logprobs":
            assert r["fwdbwd_ms"]["median"] > 0
            assert r["speedup_vs_eager"] is not None and math.isfinite(r["speedup_vs_eager"])
    # GPU-only peers are skipped with a note, never a crash
    assert any(r["status"] == "skipped" for r in data["rows"])
    assert all(isinstance(n, str) and "skipped" in n for n in data["notes"])
    for op in ("token_logprobs", "gae"):
        png = (tmp_path / f"{op}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_oom_is_recorded_and_the_run_continues_in_process():
    cfg = RunConfig(ops=["fake"], device=torch.device("cpu"), quick=True, isolate=False, registry=FAKE_REGISTRY,
                    providers=["eager", "oom", "memerr", "missing-peer", "after"])
    results = run_suite(cfg, log=lambda msg: None)
    for provider in ("oom", "memerr"):
        rows = _rows(results, provider)
        assert [r["status"] for r in rows] == ["oom", "oom"]
        assert rows[0]["fwd_ms"] is None
    assert "injected" in _rows(results, "oom")[0]["note"]
    assert [r["status"] for r in _rows(results, "after")] == ["ok", "ok"]  # cases after the OOM still ran
    assert [r["status"] for r in _rows(results, "missing-peer")] == ["skipped", "skipped"]
    assert results["notes"] == ["fake: missing-peer skipped: fakepeer not installed"]  # one line per peer


def test_worker_subprocess_measures_peak_rss_and_survives_oom_kill():
    cfg = RunConfig(ops=["fake"], device=torch.device("cpu"), shapes=[{"N": 4}], isolate=True, repeats=1,
                    warmup=1, registry=FAKE_REGISTRY, providers=["eager", "killed"], timeout_s=120)
    results = run_suite(cfg, log=lambda msg: None)
    eager, = _rows(results, "eager")
    assert eager["status"] == "ok", eager["note"]
    # the provider holds a 64 MiB buffer: the fresh worker's peak RSS above its inputs must see it
    assert 60 * MIB <= eager["peak_fwd_bytes"] < 400 * MIB
    assert 60 * MIB <= eager["peak_fwdbwd_bytes"] < 400 * MIB
    killed, = _rows(results, "killed")
    assert killed["status"] == "oom" and "SIGKILL" in killed["note"]


def test_call_mapped_binds_by_alias_and_names_missing_parameters():
    def f(hidden_states, lm_head_weight, *, beta=0.0, loss_type="x"):
        return hidden_states, lm_head_weight, beta, loss_type

    aliases = {"hidden": ("hidden", "hidden_states"), "weight": ("weight", "lm_head_weight")}
    assert call_mapped(f, {"hidden": 1, "weight": 2}, aliases, beta=0.5, unused=3) == (1, 2, 0.5, "x")
    with pytest.raises(TypeError, match="lm_head_weight"):
        call_mapped(f, {"hidden": 1}, aliases)

    def g(hidden, *, backend="auto", **loss_kwargs):
        return hidden, backend, loss_kwargs

    assert call_mapped(g, {"hidden": 1}, aliases, beta=0.5, backend="torch") == (1, "torch", {"beta": 0.5})


def test_shapes_presets_and_cli_parsing():
    from bench.registry import build_ops

    ops = build_ops()
    cpu = torch.device("cpu")
    gemma = cli.PRESETS["gemma2-9b"]
    shapes = shapes_for(ops["linear_logprobs"], RunConfig(ops=[], device=cpu, preset=gemma))
    assert all(s["H"] == 3584 and s["V"] == 256000 and s["softcap"] == 30.0 for s in shapes)
    # a preset only touches the keys an op has; GAE's shapes are unchanged
    assert shapes_for(ops["gae"], RunConfig(ops=[], device=cpu, preset=gemma)) == ops["gae"].shapes["cpu"]
    parsed = cli.parse_shapes("N=1024,V=32000; N=2048,V=32000")
    assert parsed == [{"N": 1024, "V": 32000}, {"N": 2048, "V": 32000}]
    tl = shapes_for(ops["token_logprobs"], RunConfig(ops=[], device=cpu, shapes=parsed))
    assert tl == parsed
    # the documented CLI choices exist
    help_text = cli.build_parser().format_help()
    for flag in ("--ops", "--shapes", "--preset", "--dtype", "--device", "--repeats", "--quick", "--out",
                 "--memory-profile"):
        assert flag in help_text


def test_vs_eager_ratios_and_summary():
    t = summarize_ms([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (t["median"], t["min"], t["max"], t["p25"], t["p75"]) == (3.0, 1.0, 5.0, 2.0, 4.0)
    base = {"op": "o", "shape_str": "N=1", "dtype": "fp32", "status": "ok"}
    rows = [
        {**base, "provider": "eager", "role": "eager", "fwd_ms": {"median": 4.0}, "fwdbwd_ms": {"median": 10.0},
         "peak_fwd_bytes": 50, "peak_fwdbwd_bytes": 100},
        {**base, "provider": "ours", "role": "ours", "fwd_ms": {"median": 1.0}, "fwdbwd_ms": {"median": 2.5},
         "peak_fwd_bytes": 5, "peak_fwdbwd_bytes": 10},
        {**base, "provider": "peer", "role": "peer", "status": "oom", "fwd_ms": None, "fwdbwd_ms": None},
    ]
    annotate_vs_eager(rows)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(4.0)  # fwd+bwd times
    assert rows[1]["mem_ratio_vs_eager"] == pytest.approx(0.1)
    assert rows[2]["speedup_vs_eager"] is None


def test_memory_profile_is_gpu_only_on_cpu(tmp_path, capsys):
    from rich.console import Console

    cfg = RunConfig(ops=["token_logprobs"], device=torch.device("cpu"), quick=True)
    assert cli.memory_profile(cfg, tmp_path, Console(force_terminal=False)) == []
    assert "GPU-only" in capsys.readouterr().out
    assert not (tmp_path / "memory").exists()
