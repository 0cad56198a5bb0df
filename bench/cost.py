"""The one cost model of the benchmarks: bytes moved and FLOPs per op, per pass.

Used by the roofline column of ``python -m bench`` (achieved bytes/s or FLOP/s over the measured
copy bandwidth or GEMM throughput) and by the analytic roofline of ``python -m bench --static``,
so the two can never disagree. Counts follow what an implementation really issues:

- ``token_logprobs`` (logits ``[N, V]``): the forward reads the logits once and writes three fp32
  per-row values (logp, and the saved softmax state); the backward reads the logits again and
  writes their gradient once. Bandwidth-bound; the FLOPs (exp, FMA, compare per logit) are only
  there to show how far from compute-bound it is.
- ``linear_logprobs`` (hidden ``[N, H]`` x lm_head ``[V, H]``): GEMMs dominate (2·N·H·V each).
  Two paths, named by :class:`HeadPath`:

  * ``RECOMPUTE`` (four GEMMs, what ``linear_logprobs``, TRL's ``ChunkedLogProbFunction`` and CCE
    do): forward ``z = h·Wᵀ``; backward recomputes ``z`` tile by tile, then ``dh = dz·W`` and
    ``dW = dzᵀ·h``: 2·N·H·V forward, 8·N·H·V forward+backward.
  * ``GRAD_IN_FORWARD`` (three GEMMs): a token-separable loss (cross-entropy, GRPO/PPO per-token
    surrogates) knows its upstream gradient in the forward, so ``dz`` is formed from the tile
    already in registers and the backward only scales stored gradients: 6·N·H·V, all of it in the
    forward (``fused_linear_cross_entropy``, Liger's fused linear losses).
  * ``MATERIALISED`` (eager: full logits in memory, autograd): 2·N·H·V forward, 6·N·H·V in all,
    plus the ``[N, V]`` logits written and read through HBM.

  Bytes (ideal tiling: the logits tile never reaches HBM except on the materialised path): the
  inputs are read once per pass that runs a GEMM over them, gradients written once.
- GAE: five fp32 arrays of ``[B, T]`` read or written once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


@dataclass(frozen=True)
class Cost:
    """Bytes and FLOPs of one call: forward alone, and forward+backward (= forward for ops without
    a backward)."""

    fwd_bytes: int
    fwdbwd_bytes: int
    fwd_flops: int
    fwdbwd_flops: int

    def as_dict(self) -> dict:
        return asdict(self)

    def amount(self, kind: str, phase: str) -> int:
        """``kind`` "bytes" | "flops"; ``phase`` "fwd" | "fwdbwd"."""
        return getattr(self, f"{phase}_{kind}")


class HeadPath(str, Enum):
    RECOMPUTE = "recompute"  # 4 GEMMs: forward, and backward's recompute + dh + dW
    GRAD_IN_FORWARD = "grad_in_forward"  # 3 GEMMs, all in the forward
    MATERIALISED = "materialised"  # eager autograd over full logits: 3 GEMMs, logits through HBM

    @property
    def gemms(self) -> tuple[int, int]:
        """(GEMMs in the forward, GEMMs in forward+backward), each 2·N·H·V FLOPs."""
        return {"recompute": (1, 4), "grad_in_forward": (3, 3), "materialised": (1, 3)}[self.value]


# Per-row fp32/int64 scalars of token_logprobs: label (8) + logp, row_max, log_sum/lse, entropy.
_ROW_FWD_BYTES = 8 + 4 * 3
_ROW_BWD_BYTES = 8 + 4 * 4  # label + saved state (2) + upstream grads (2)
_TOKEN_FWD_FLOPS_PER_LOGIT = 5  # scale, max, subtract, exp, FMA into the centred sums
_TOKEN_BWD_FLOPS_PER_LOGIT = 7  # subtract, exp, two FMAs, select, scale (+ the recompute)


def token_logprobs_cost(N: int, V: int, elem_bytes: int = 2) -> Cost:
    fwd = N * V * elem_bytes + N * _ROW_FWD_BYTES
    bwd = 2 * N * V * elem_bytes + N * _ROW_BWD_BYTES
    return Cost(fwd_bytes=fwd, fwdbwd_bytes=fwd + bwd, fwd_flops=_TOKEN_FWD_FLOPS_PER_LOGIT * N * V,
                fwdbwd_flops=(_TOKEN_FWD_FLOPS_PER_LOGIT + _TOKEN_BWD_FLOPS_PER_LOGIT) * N * V)  # fmt: skip


def linear_logprobs_cost(N: int, H: int, V: int, elem_bytes: int = 2, path: HeadPath = HeadPath.RECOMPUTE,
                         ref_tokens: int = 0) -> Cost:  # fmt: skip
    """``N`` trained tokens through ``path``; ``ref_tokens`` more through the head without grad
    (DPO's reference model in the same step: one GEMM each, forward only)."""
    path = HeadPath(path)
    gemm = 2 * H * V
    fwd_gemms, all_gemms = path.gemms
    inputs = (N * H + V * H) * elem_bytes
    grads = inputs
    ref = ref_tokens * H * elem_bytes + (V * H * elem_bytes if ref_tokens else 0)
    if path is HeadPath.GRAD_IN_FORWARD:
        fwd_bytes = fwdbwd_bytes = inputs + grads
    else:
        fwd_bytes, fwdbwd_bytes = inputs, inputs + inputs + grads  # backward re-reads the inputs
    if path is HeadPath.MATERIALISED:
        logits = N * V * elem_bytes
        fwd_bytes += 2 * logits  # the GEMM writes them, the softmax reads them back
        fwdbwd_bytes += 4 * logits  # + their gradient written, then read by the dh and dW GEMMs
    return Cost(fwd_bytes=fwd_bytes + ref, fwdbwd_bytes=fwdbwd_bytes + ref,
                fwd_flops=(fwd_gemms * N + ref_tokens) * gemm, fwdbwd_flops=(all_gemms * N + ref_tokens) * gemm)  # fmt: skip


def gae_cost(B: int, T: int) -> Cost:
    n = B * T * 5 * 4  # rewards, values, mask read; advantages, returns written (fp32)
    return Cost(fwd_bytes=n, fwdbwd_bytes=n, fwd_flops=0, fwdbwd_flops=0)


# Stated peaks for the static (no-GPU) roofline: dense bf16 tensor-core FLOP/s, HBM bytes/s. A GPU run
# measures its own (copy bandwidth, bf16 GEMM) and uses those instead.
DEVICE_PEAKS = {
    "A100-SXM-80GB": dict(bytes_per_s=2.039e12, bf16_flops=312e12),
    "H100-SXM-80GB": dict(bytes_per_s=3.35e12, bf16_flops=989e12),
    "H200-SXM-141GB": dict(bytes_per_s=4.8e12, bf16_flops=989e12),
}


def roofline_seconds(cost: Cost, device: str, phase: str = "fwdbwd") -> float:
    """Lower bound on time: max(bytes / bandwidth, FLOPs / bf16 peak)."""
    peak = DEVICE_PEAKS[device]
    return max(cost.amount("bytes", phase) / peak["bytes_per_s"], cost.amount("flops", phase) / peak["bf16_flops"])
