"""``linear_logprobs``: per-token log-prob and entropy straight from hidden states ``[N, H]`` and
the lm_head ``[V, H]``.

Providers: alignkernels backends (``triton``/``cuda`` on GPU, the chunked ``torch`` path on CPU),
eager (what training code does: ``hidden @ weight.T`` in the input dtype, then
``alignkernels.reference.token_logprobs_reference`` in fp32 on the materialised logits), TRL's
fused head ``trl.kernels.ChunkedLogProbFunction`` (cuBLAS tiles + Triton online logsumexp on GPU,
torch tiles on CPU), Liger-Kernel's fused linear cross-entropy (``reduction="none"``; GPU;
log-prob only) and Apple's Cut Cross-Entropy when installed (GPU; log-prob only).

Gemma-2's final-logit soft-capping is applied when the shape carries ``softcap`` (``--preset
gemma2-9b``). Roofline (GPU): matmul throughput over a measured bf16 GEMM, counting what each
provider issues (``bench.cost``): 8·N·H·V for the recompute path (ours, TRL, CCE), 6·N·H·V for
eager (materialised logits) and for Liger (gradient formed in the forward).
"""
from __future__ import annotations

import math

import torch

from .cases_common import ours_check, package_check, weighted_logp_entropy_loss
from .cost import Cost, HeadPath, linear_logprobs_cost
from .harness import OpBench, Provider

MODEL_SHAPES = ((4096, 128256), (3584, 152064))  # (H, V): Llama-3-8B, Qwen2.5-7B


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, H, V = shape["N"], shape["H"], shape["V"]
    hidden = torch.randn(N, H, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=device, dtype=torch.float32) * (2.0 / math.sqrt(H))).to(dtype)
    return {
        "hidden": hidden,
        "weight": weight.requires_grad_(True),
        "labels": torch.randint(0, V, (N,), device=device),
        "softcap": shape.get("softcap"),
        "w_logp": torch.randn(N, device=device),
        "w_entropy": torch.randn(N, device=device),
    }


def head_cost(path: HeadPath):
    """``bench.cost.linear_logprobs_cost`` at a case's shape, for one way of running the head."""

    def cost(shape: dict, dtype: torch.dtype) -> Cost:
        return linear_logprobs_cost(shape["N"], shape["H"], shape["V"], elem_bytes=dtype.itemsize, path=path)

    return cost


def _ours(backend):
    def run(inputs):
        import alignkernels

        return alignkernels.linear_logprobs(
            inputs["hidden"], inputs["weight"], inputs["labels"], softcap=inputs["softcap"],
            return_entropy=True, backend=backend,
        )

    def probe(device):
        import alignkernels

        h = torch.zeros(2, 16, device=device, dtype=torch.bfloat16)
        w = torch.zeros(32, 16, device=device, dtype=torch.bfloat16)
        alignkernels.linear_logprobs(h, w, torch.zeros(2, dtype=torch.long, device=device), backend=backend)

    check = ours_check(("linear_logprobs",), backend, probe if backend == "cuda" else None)
    if backend == "torch":
        inner = check
        check = lambda device: inner(device) or (  # noqa: E731
            "GPU runs report triton/cuda; the torch path is the CPU backend" if device.type == "cuda" else None
        )
    return Provider(f"alignkernels:{backend}", run, role="ours", available=check)


def _eager(inputs):
    from alignkernels.reference import token_logprobs_reference, transform_logits

    logits = inputs["hidden"] @ inputs["weight"].T  # in the input dtype, as the model's lm_head does
    if inputs["softcap"] is not None:
        logits = transform_logits(logits.float(), softcap=inputs["softcap"])
    return token_logprobs_reference(logits, inputs["labels"], return_entropy=True)


def _trl_chunk_size():
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return int(_CHUNKED_LOGPROB_CHUNK_SIZE)
    except Exception:  # noqa: BLE001 - private constant; TRL's 1.16 value
        return 32768


def _trl(inputs):
    from trl.kernels import ChunkedLogProbFunction

    out = ChunkedLogProbFunction.apply(
        inputs["hidden"], inputs["weight"], None, inputs["labels"], 1.0, _trl_chunk_size(),
        inputs["softcap"], 1.0, ("entropy",),
    )
    return out[0], out[1]


def _liger(inputs):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=inputs["softcap"])
    return -ce(inputs["weight"], inputs["hidden"], inputs["labels"]), None


def _cce(inputs):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(
        inputs["hidden"], inputs["weight"], inputs["labels"], softcap=inputs["softcap"], reduction="none"
    ), None


def build() -> OpBench:
    return OpBench(
        name="linear_logprobs",
        title="linear_logprobs: hidden [N, H] x lm_head [V, H] -> log p(label), entropy",
        make_inputs=make_inputs,
        providers=[
            Provider("eager", _eager, role="eager", cost=head_cost(HeadPath.MATERIALISED)),
            _ours("triton"),
            _ours("cuda"),
            _ours("torch"),
            Provider("trl", _trl, available=package_check("trl.kernels", "trl"),
                     note="trl: trl.kernels.ChunkedLogProbFunction (logp + entropy)"),
            Provider("liger", _liger,
                     available=package_check("liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel",
                                             cuda_only=True),
                     note="liger: fused linear cross-entropy, log-prob only",
                     cost=head_cost(HeadPath.GRAD_IN_FORWARD)),
            Provider("cce", _cce, available=package_check("cut_cross_entropy", "cut-cross-entropy (Apple CCE)",
                                                          cuda_only=True),
                     note="cce: Apple Cut Cross-Entropy, log-prob only"),
        ],
        shapes={
            "cuda": [{"N": n, "H": h, "V": v} for h, v in MODEL_SHAPES for n in (4096, 8192, 16384)],
            "cpu": [{"N": n, "H": 256, "V": 32000} for n in (256, 1024)],
            "quick": [{"N": n, "H": 32, "V": 500} for n in (16, 64)],
        },
        shape_keys=("N", "H", "V", "softcap"),
        x_axis="N",
        to_loss=weighted_logp_entropy_loss,
        cost=head_cost(HeadPath.RECOMPUTE),
        roofline="matmul",
    )
