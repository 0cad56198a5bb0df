"""The static report's aggregation and cost rows (the compile step itself is tests/kernels/test_compile.py)."""
from bench.static import cost_rows, summarize_triton


def _report(regs, local, occ, ok=True):
    return dict(ok=ok, error=None, registers=regs, local_bytes=local, shared_bytes=0, occupancy=occ,
                num_warps=4, constexprs={"BLOCK_V": 1024})  # fmt: skip


def test_summary_keeps_the_worst_case_over_dtype_variants():
    raw = {
        "token_logprobs-token_logprobs_fwd_kernel-0@sm80": _report(32, 0, 1.0),
        "token_logprobs-token_logprobs_fwd_kernel-3@sm80": _report(48, 8, 0.5),  # another dtype, same config
        "token_logprobs-token_logprobs_fwd_kernel-0@sm90": _report(30, 0, 1.0),
    }
    (row,) = summarize_triton(raw, [80, 90])
    assert row["variants"] == 3 and row["ok"]
    assert row["registers_sm80"] == 48 and row["local_bytes_sm80"] == 8 and row["occupancy_sm80"] == 0.5
    assert row["registers_sm90"] == 30


def test_summary_flags_a_failed_compile():
    raw = {"gae-gae_fwd_kernel-0@sm80": dict(ok=False, error="boom", constexprs={}, num_warps=2)}
    (row,) = summarize_triton(raw, [80])
    assert not row["ok"] and "registers_sm80" not in row


def test_cost_rows_cover_both_ops_with_roofline_bounds():
    rows = cost_rows()
    assert {r["op"] for r in rows} == {"token_logprobs", "linear_logprobs (recompute)",
                                       "linear_logprobs (grad_in_forward)"}  # fmt: skip
    for r in rows:
        assert r["fwdbwd_bytes"] >= r["fwd_bytes"] > 0
        assert r["H100-SXM-80GB fwd+bwd us"] < r["A100-SXM-80GB fwd+bwd us"]
