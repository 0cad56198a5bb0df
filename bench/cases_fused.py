"""The loss head in three GEMMs against four, fwd+bwd from hidden states.

- ``fused_ce``: the SFT loss (``mean`` over valid tokens, TRL SFTTrainer's reduction) from
  ``hidden [N, H]`` and the lm_head ``[V, H]``. Providers: ``alignkernels:three_gemm``
  (``fused_linear_cross_entropy``), ``alignkernels:four_gemm`` (``linear_logprobs`` + the same
  reduction, autograd), eager (materialised logits, ``log_softmax``), TRL's
  ``ChunkedLogProbFunction`` + SFTTrainer's reduction, Liger's fused linear cross-entropy (GPU).
- ``fused_grpo``: GRPO (dapo, β=0.04, token-level ratios) from ``[B, T, H]``:
  ``fused_linear_grpo_loss`` on its default three-GEMM path vs ``head_path="four_gemm"``, eager,
  TRL's ``ChunkedLogProbFunction`` + ``alignkernels.grpo_loss`` (TRL's loss, transcribed), and
  Liger's ``LigerFusedLinearGRPOLoss`` (a chunked torch loss; runs on the CPU too).

Roofline (GPU): three-GEMM fwd+bwd is 6·n·H·V matmul FLOPs, four-GEMM 8·n·H·V.
"""
from __future__ import annotations

import math

import torch

from .cases_common import ours_check, package_check
from .cases_linear_logprobs import head_cost
from .cases_losses import GRPO_BETA, GRPO_EPS_HIGH, GRPO_EPS_LOW, grpo_eager, grpo_inputs, grpo_liger, head_loss_cost
from .cost import HeadPath
from .harness import OpBench, Provider

CPU_TARGET = {"N": 4096, "H": 1024, "V": 32000}  # the CPU shape of bench/results/cpu-amd-epyc/fused.txt


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(out, inputs):
    return _first(out)


# ------------------------------------------------------------------------------------------------
# SFT cross-entropy
# ------------------------------------------------------------------------------------------------
def ce_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, H, V = shape["N"], shape["H"], shape["V"]
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < 0.1] = -100  # some prompt / padding tokens
    return {
        "hidden": torch.randn(N, H, device=device).to(dtype).requires_grad_(True),
        "weight": (torch.randn(V, H, device=device) * (2.0 / math.sqrt(H))).to(dtype).requires_grad_(True),
        "labels": labels,
    }


def ce_three_gemm(inputs):
    import alignkernels

    return alignkernels.fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"])


def ce_four_gemm(inputs):
    import alignkernels

    logp = alignkernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"])
    return -logp.sum() / (inputs["labels"] != -100).sum().clamp(min=1)


def ce_eager(inputs):
    logits = (inputs["hidden"] @ inputs["weight"].T).float()
    return torch.nn.functional.cross_entropy(logits, inputs["labels"], ignore_index=-100)


def ce_trl(inputs):
    from trl.kernels import ChunkedLogProbFunction

    mask = inputs["labels"] != -100
    logp = ChunkedLogProbFunction.apply(inputs["hidden"][mask], inputs["weight"], None, inputs["labels"][mask], 1.0,
                                        32768, None, 1.0, ())[0]  # fmt: skip
    return -logp.sum() / mask.sum().clamp(min=1)  # SFTTrainer.compute_loss


def ce_liger(inputs):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="mean")(inputs["weight"], inputs["hidden"], inputs["labels"])


def build_fused_ce() -> OpBench:
    return OpBench(
        name="fused_ce",
        title="SFT cross-entropy from hidden [N, H]: three GEMMs vs four",
        make_inputs=ce_inputs,
        providers=[
            Provider("eager", ce_eager, role="eager", cost=head_cost(HeadPath.MATERIALISED)),
            Provider("alignkernels:three_gemm", ce_three_gemm, role="ours",
                     available=ours_check(("fused_linear_cross_entropy",))),
            Provider("alignkernels:four_gemm", ce_four_gemm, role="ours", available=ours_check(("linear_logprobs",)),
                     cost=head_cost(HeadPath.RECOMPUTE)),
            Provider("trl", ce_trl, available=package_check("trl.kernels", "trl"), cost=head_cost(HeadPath.RECOMPUTE),
                     note="trl: ChunkedLogProbFunction + SFTTrainer's reduction"),
            Provider("liger", ce_liger,
                     available=package_check("liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel",
                                             cuda_only=True),
                     note="liger: LigerFusedLinearCrossEntropyLoss (Triton, GPU only)"),
        ],
        shapes={
            "cuda": [{"N": n, "H": 4096, "V": 128256} for n in (4096, 8192, 16384)],
            "cpu": [{**CPU_TARGET, "N": n} for n in (1024, 4096)],
            "quick": [{"N": n, "H": 32, "V": 500} for n in (16, 64)],
        },
        shape_keys=("N", "H", "V"),
        x_axis="N",
        to_loss=_loss,
        cost=head_cost(HeadPath.GRAD_IN_FORWARD),  # bench.cost: the op's default, three GEMMs
        roofline="matmul",
    )


# ------------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------------
_GRPO = dict(beta=GRPO_BETA, epsilon_low=GRPO_EPS_LOW, epsilon_high=GRPO_EPS_HIGH, loss_type="dapo",
             use_bias_correction_kl=False)  # fmt: skip


def _grpo_ours(head_path):
    def run(inputs):
        import alignkernels

        return alignkernels.fused_linear_grpo_loss(
            inputs["hidden"], inputs["weight"], inputs["labels"], inputs["advantages"], inputs["mask"],
            old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"], head_path=head_path, **_GRPO,
        )

    return run


def grpo_trl(inputs):
    from trl.kernels import ChunkedLogProbFunction

    import alignkernels

    mask = inputs["mask"].bool()
    logp_valid = ChunkedLogProbFunction.apply(inputs["hidden"][mask], inputs["weight"], None, inputs["labels"][mask],
                                              1.0, 32768, None, 1.0, ())[0]  # fmt: skip
    logp = logp_valid.new_zeros(mask.shape).masked_scatter(mask, logp_valid)
    return alignkernels.grpo_loss(logp, inputs["old_logp"], inputs["ref_logp"], inputs["advantages"], inputs["mask"],
                                  **_GRPO)  # fmt: skip


def build_fused_grpo() -> OpBench:
    return OpBench(
        name="fused_grpo",
        title="GRPO (dapo, beta=0.04) from hidden [B, T, H]: three GEMMs vs four",
        make_inputs=grpo_inputs,
        providers=[
            Provider("eager", grpo_eager, role="eager", cost=head_loss_cost(HeadPath.MATERIALISED, False)),
            Provider("alignkernels:three_gemm", _grpo_ours("three_gemm"), role="ours",
                     available=ours_check(("fused_linear_grpo_loss",))),
            Provider("alignkernels:four_gemm", _grpo_ours("four_gemm"), role="ours",
                     available=ours_check(("fused_linear_grpo_loss",)), cost=head_loss_cost(HeadPath.RECOMPUTE, False)),
            Provider("trl", grpo_trl, available=package_check("trl.kernels", "trl"),
                     cost=head_loss_cost(HeadPath.RECOMPUTE, False),
                     note="trl: ChunkedLogProbFunction + grpo_loss (TRL's _compute_loss)"),
            Provider("liger", grpo_liger, available=package_check("liger_kernel.chunked_loss", "liger-kernel"),
                     note="liger: LigerFusedLinearGRPOLoss"),
        ],
        shapes={
            "cuda": [{"B": 8, "T": t, "H": 4096, "V": 128256} for t in (1024, 2048)],
            "cpu": [{"B": 4, "T": 1024, "H": CPU_TARGET["H"], "V": CPU_TARGET["V"]}],
            "quick": [{"B": 2, "T": t, "H": 32, "V": 500} for t in (8, 16)],
        },
        shape_keys=("B", "T", "H", "V"),
        x_axis="T",
        to_loss=_loss,
        cost=head_loss_cost(HeadPath.GRAD_IN_FORWARD, False),
        roofline="matmul",
    )
