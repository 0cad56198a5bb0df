"""``token_logprobs``: per-token log-prob of the label and entropy, from logits ``[N, V]``.

Providers: alignkernels backends (``triton`` and ``cuda`` on GPU, the chunked ``torch`` path on
CPU), eager (``alignkernels.reference.token_logprobs_reference``: fp32 log_softmax + gather +
entropy from the full softmax), TRL's ``trl.kernels.selective_log_softmax_and_entropy`` (Triton,
GPU) and Liger-Kernel's cross-entropy with ``reduction="none"`` (GPU; log-prob only, no entropy).

Backward starts from ``Σ w1·logp + Σ w2·entropy`` with random per-token weights (RL losses weight
every token differently), so gradients flow through both outputs.
Roofline (GPU): bandwidth, counted by ``bench.cost.token_logprobs_cost``: forward reads the
logits once, forward+backward reads them twice and writes their gradient once.
"""
from __future__ import annotations

import torch

from .cases_common import needs_cuda, ours_check, package_check, weighted_logp_entropy_loss
from .cost import Cost, token_logprobs_cost
from .harness import OpBench, Provider

VOCABS = (32000, 128256, 151936)


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, V = shape["N"], shape["V"]
    logits = (torch.randn(N, V, device=device, dtype=torch.float32) * 2.0).to(dtype).requires_grad_(True)
    return {
        "logits": logits,
        "labels": torch.randint(0, V, (N,), device=device),
        "w_logp": torch.randn(N, device=device),
        "w_entropy": torch.randn(N, device=device),
    }


def cost(shape: dict, dtype: torch.dtype) -> Cost:
    return token_logprobs_cost(shape["N"], shape["V"], elem_bytes=dtype.itemsize)


def _ours(backend):
    def run(inputs):
        import alignkernels

        return alignkernels.token_logprobs(inputs["logits"], inputs["labels"], return_entropy=True, backend=backend)

    def probe(device):
        import alignkernels

        x = torch.zeros(2, 8, device=device)
        alignkernels.token_logprobs(x, torch.zeros(2, dtype=torch.long, device=device), backend=backend)

    check = ours_check(("token_logprobs",), backend, probe if backend == "cuda" else None)
    if backend == "torch":
        inner = check
        check = lambda device: inner(device) or (  # noqa: E731 - the torch path is the CPU backend
            "GPU runs report triton/cuda; the torch path is the CPU backend" if device.type == "cuda" else None
        )
    return Provider(f"alignkernels:{backend}", run, role="ours", available=check)


def _eager(inputs):
    from alignkernels.reference import token_logprobs_reference

    return token_logprobs_reference(inputs["logits"], inputs["labels"], return_entropy=True)


def _trl(inputs):
    from trl.kernels import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(inputs["logits"], inputs["labels"])


def _liger(inputs):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return -liger_cross_entropy(inputs["logits"], inputs["labels"], reduction="none"), None


def _trl_check(device):
    reason = package_check("trl.kernels", "trl")(device) or needs_cuda(device)
    if reason is None:
        import trl.kernels

        if not hasattr(trl.kernels, "selective_log_softmax_and_entropy"):
            return "trl installed without trl.kernels.selective_log_softmax_and_entropy"
    return reason


def build() -> OpBench:
    return OpBench(
        name="token_logprobs",
        title="token_logprobs: logits [N, V] -> log p(label), entropy",
        make_inputs=make_inputs,
        providers=[
            Provider("eager", _eager, role="eager"),
            _ours("triton"),
            _ours("cuda"),
            _ours("torch"),
            Provider("trl", _trl, available=_trl_check),
            Provider("liger", _liger, available=package_check("liger_kernel.transformers.functional", "liger-kernel", cuda_only=True),
                     note="liger: log-prob only (cross-entropy), no entropy"),
        ],
        shapes={
            "cuda": [{"N": n, "V": v} for v in VOCABS for n in (4096, 8192, 16384)],
            "cpu": [{"N": n, "V": v} for v in VOCABS for n in (128, 512)],
            "quick": [{"N": n, "V": 1000} for n in (16, 64)],
        },
        shape_keys=("N", "V"),
        x_axis="N",
        to_loss=weighted_logp_entropy_loss,
        cost=cost,
        roofline="bandwidth",
    )
