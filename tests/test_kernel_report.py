"""The static performance model: occupancy arithmetic and the bytes/FLOPs model, checked against
direct counts on tiny cases."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alignkernels
from alignkernels.kernel_report import linear_logprobs_cost, occupancy, roofline_seconds, token_logprobs_cost


def test_occupancy_arithmetic():
    # 32 regs x 32 lanes = 1024 regs/warp; 4 warps -> 16 blocks by registers, 16 by warps: full.
    assert occupancy(32, 4, 0, 90) == dict(blocks_per_sm=16, occupancy=1.0, limiter="registers")
    # 255 regs round up to 8192 per warp: one 8-warp block fits -> 8 / 64 warps.
    occ = occupancy(255, 8, 0, 80)
    assert occ["blocks_per_sm"] == 1 and occ["occupancy"] == 8 / 64 and occ["limiter"] == "registers"
    # Shared memory can be the limiter.
    assert occupancy(32, 4, 100 * 1024, 80)["limiter"] == "shared memory"


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


def test_linear_logprobs_flop_model_matches_direct_count():
    N, H, V = 16, 24, 300
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    cost = linear_logprobs_cost(N, H, V)
    with MatmulFlops() as fwd_counter:
        logp = alignkernels.linear_logprobs(hidden, weight, labels, backend="torch")
    with MatmulFlops() as bwd_counter:
        logp.sum().backward()
    fwd, bwd = fwd_counter.flops, bwd_counter.flops
    assert fwd == cost["fwd_flops"]  # one [N,H]x[H,V] GEMM
    assert fwd + bwd == cost["fwd_bwd_flops"]  # + recompute + grad_hidden + grad_weight GEMMs


def test_token_logprobs_byte_model_matches_tensor_sizes():
    N, V = 8, 1000
    logits = torch.randn(N, V, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,))
    cost = token_logprobs_cost(N, V, elem_bytes=logits.element_size())
    # Forward kernel: reads logits + labels, writes logp, lse, entropy (fp32).
    fwd = logits.nbytes + labels.nbytes + 3 * N * 4
    # Backward kernel: reads logits, labels, lse, entropy, grad_logp, grad_entropy; writes grad.
    bwd = 2 * logits.nbytes + labels.nbytes + 4 * N * 4
    assert cost["fwd_bytes"] == fwd
    assert cost["fwd_bwd_bytes"] == fwd + bwd


def test_roofline_picks_the_binding_resource():
    token = token_logprobs_cost(8192, 151936)
    assert roofline_seconds(token, "H100-SXM-80GB") == token["fwd_bwd_bytes"] / 3.35e12  # memory-bound
    linear = linear_logprobs_cost(8192, 4096, 128256)
    assert roofline_seconds(linear, "H100-SXM-80GB") == linear["fwd_bwd_flops"] / 989e12  # compute-bound
