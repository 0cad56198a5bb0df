"""Process reward model: K-head token-classification loss at ~20 step tokens per sequence, from
hidden states -- ours (gather the step rows, head on [P, H]) vs eager (head on every token,
[B, T, K] logits, cross-entropy over labels != -100, as transformers' ForTokenClassification)."""
from __future__ import annotations

import torch

from .cases_common import ours_check
from .cost import Cost
from .harness import OpBench, Provider

STEPS_PER_SEQUENCE = 20


def prm_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, T, H, K = shape["B"], shape["T"], shape["H"], shape["K"]
    labels = torch.full((B, T), -100, dtype=torch.long, device=device)
    steps = torch.rand(B, T, device=device).argsort(-1)[:, : min(STEPS_PER_SEQUENCE, T)]
    labels.scatter_(1, steps, torch.randint(0, K, steps.shape, device=device))
    return {
        "hidden": torch.randn(B, T, H, device=device).to(dtype).requires_grad_(True),
        "weight": (torch.randn(K, H, device=device) / H**0.5).to(dtype).requires_grad_(True),
        "bias": torch.zeros(K, device=device).to(dtype).requires_grad_(True),
        "labels": labels,
    }


def prm_eager(inputs):
    from alignkernels.reference import token_classification_loss_reference

    return token_classification_loss_reference(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"])


def prm_ours(inputs):
    import alignkernels

    loss, _ = alignkernels.fused_linear_prm_loss(inputs["hidden"], inputs["weight"], inputs["labels"],
                                                 bias=inputs["bias"])  # fmt: skip
    return loss


def prm_cost(shape, dtype):
    n, H, K = shape["B"] * shape["T"], shape["H"], shape["K"]
    item = torch.finfo(dtype).bits // 8
    steps = shape["B"] * min(STEPS_PER_SEQUENCE, shape["T"])
    # ours reads the step rows only; the hidden gradient [B, T, H] is written once (mostly zeros)
    return Cost(fwd_bytes=steps * H * item, fwdbwd_bytes=(steps + n) * H * item,
                fwd_flops=2 * steps * H * K, fwdbwd_flops=6 * steps * H * K)  # fmt: skip


def build_prm() -> OpBench:
    return OpBench(
        name="prm",
        title=f"PRM loss (K heads, {STEPS_PER_SEQUENCE} step tokens per sequence) from hidden [B, T, H]",
        make_inputs=prm_inputs,
        providers=[
            Provider("eager", prm_eager, role="eager"),
            Provider("alignkernels:fused", prm_ours, role="ours", available=ours_check(("fused_linear_prm_loss",))),
        ],
        shapes={
            "cuda": [{"B": 16, "T": t, "H": 4096, "K": 3} for t in (1024, 2048, 4096)],
            "cpu": [{"B": 4, "T": t, "H": 512, "K": 3} for t in (512, 1024)],
            "quick": [{"B": 2, "T": t, "H": 32, "K": 3} for t in (32, 64)],
        },
        shape_keys=("B", "T", "H", "K"),
        x_axis="T",
        to_loss=lambda out, inputs: out,
        cost=prm_cost,
        roofline="bandwidth",
    )
