"""The one cost model (``bench.cost``): its FLOP counts match the matrix products each path really
issues, its byte counts match the tensors a kernel must touch, and the benchmark's roofline column
and the static report read the same numbers."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alignkernels
from bench.cases_linear_logprobs import build as build_linear_logprobs
from bench.cases_token_logprobs import build as build_token_logprobs
from bench.cost import HeadPath, linear_logprobs_cost, roofline_seconds, token_logprobs_cost
from bench.static import LINEAR_SHAPES, TOKEN_SHAPES, cost_rows


class MatmulFlops(TorchDispatchMode):
    """Counts 2·m·n·k for every matrix product, in-place and ``out=`` variants included
    (``torch.utils.flop_counter`` skips ``addmm_``)."""

    OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name.rstrip("_") in self.OPS:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))


N, H, V = 16, 24, 300


def _inputs():
    torch.manual_seed(0)
    return torch.randn(N, H, requires_grad=True), torch.randn(V, H, requires_grad=True), torch.randint(0, V, (N,))


def _count(forward):
    """(FLOPs of ``forward()``, FLOPs of its backward) counted on the matrix products."""
    with MatmulFlops() as fwd_counter:
        loss = forward()
    with MatmulFlops() as bwd_counter:
        loss.backward()
    return fwd_counter.flops, bwd_counter.flops


def test_recompute_path_is_four_gemms():
    hidden, weight, labels = _inputs()
    fwd, bwd = _count(lambda: alignkernels.linear_logprobs(hidden, weight, labels, backend="torch").sum())
    cost = linear_logprobs_cost(N, H, V, path=HeadPath.RECOMPUTE)
    assert fwd == cost.fwd_flops == 2 * N * H * V  # one [N,H]x[H,V] GEMM
    assert fwd + bwd == cost.fwdbwd_flops == 8 * N * H * V  # + recompute + grad_hidden + grad_weight


def test_materialised_path_is_three_gemms():
    hidden, weight, labels = _inputs()
    eager = build_linear_logprobs().provider("eager")
    inputs = dict(hidden=hidden, weight=weight, labels=labels, softcap=None)
    fwd, bwd = _count(lambda: eager.run(inputs)[0].sum())
    cost = eager.cost(dict(N=N, H=H, V=V), torch.float32)
    assert (fwd, fwd + bwd) == (cost.fwd_flops, cost.fwdbwd_flops) == (2 * N * H * V, 6 * N * H * V)


@pytest.mark.skipif(not hasattr(alignkernels, "fused_linear_cross_entropy"),
                    reason="this build has no alignkernels.fused_linear_cross_entropy")  # fmt: skip
def test_fused_cross_entropy_forms_its_gradient_in_three_gemms():
    from bench.cases_cross_entropy import build

    hidden, weight, labels = _inputs()
    fused = build().provider("alignkernels:fused")
    inputs = dict(hidden=hidden, weight=weight, labels=labels, softcap=None)
    fwd, bwd = _count(lambda: fused.run(inputs))
    cost = fused.cost(dict(N=N, H=H, V=V), torch.float32)
    assert fwd + bwd == cost.fwdbwd_flops == 6 * N * H * V


def test_token_logprobs_byte_model_matches_tensor_sizes():
    n, v = 8, 1000
    logits = torch.randn(n, v, dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,))
    cost = token_logprobs_cost(n, v, elem_bytes=logits.element_size())
    # Forward kernel: reads logits + labels, writes logp and the saved (row_max, log_sum) / entropy (fp32).
    fwd = logits.nbytes + labels.nbytes + 3 * n * 4
    # Backward kernel: reads logits, labels, the saved state, grad_logp, grad_entropy; writes the gradient.
    bwd = 2 * logits.nbytes + labels.nbytes + 4 * n * 4
    assert cost.fwd_bytes == fwd
    assert cost.fwdbwd_bytes == fwd + bwd


def test_bench_column_and_static_report_read_one_model():
    """The op cost the GPU roofline column uses equals the static report's row at the same shape."""
    rows = {(r["op"], r["shape"]): r for r in cost_rows()}
    linear = build_linear_logprobs()
    for n, h, v in LINEAR_SHAPES:
        static = rows[("linear_logprobs (recompute)", f"N={n} H={h} V={v} bf16")]
        bench = linear.cost(dict(N=n, H=h, V=v), torch.bfloat16)
        assert bench.as_dict() == {k: static[k] for k in bench.as_dict()}
        assert bench.fwdbwd_flops == 8 * n * h * v
    token = build_token_logprobs()
    for n, v in TOKEN_SHAPES:
        static = rows[("token_logprobs", f"N={n} V={v} bf16")]
        bench = token.cost(dict(N=n, V=v), torch.bfloat16)
        assert bench.as_dict() == {k: static[k] for k in bench.as_dict()}


def test_roofline_picks_the_binding_resource():
    token = token_logprobs_cost(8192, 151936)
    assert roofline_seconds(token, "H100-SXM-80GB") == token.fwdbwd_bytes / 3.35e12  # memory-bound
    linear = linear_logprobs_cost(8192, 4096, 128256)
    assert roofline_seconds(linear, "H100-SXM-80GB") == linear.fwdbwd_flops / 989e12  # compute-bound
    fused = linear_logprobs_cost(8192, 4096, 128256, path=HeadPath.GRAD_IN_FORWARD)
    assert fused.fwdbwd_flops * 4 == linear.fwdbwd_flops * 3
