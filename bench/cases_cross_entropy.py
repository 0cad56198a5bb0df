"""``cross_entropy`` (SFT): mean token cross-entropy straight from hidden states ``[N, H]`` and the
lm_head ``[V, H]``.

Providers: ``alignkernels:fused`` (``alignkernels.fused_linear_cross_entropy``: a token-separable
loss, so the gradient is formed in the forward -- three GEMMs, ``bench.cost.HeadPath.GRAD_IN_FORWARD``;
skipped with a note where this build of alignkernels has no such op), ``alignkernels:linear_logprobs``
(``-linear_logprobs(...).mean()``: the four-GEMM recompute path), eager (materialised logits +
``F.cross_entropy`` in fp32), Liger-Kernel's fused linear cross-entropy and Apple's Cut
Cross-Entropy (GPU). Roofline (GPU): matmul throughput, counting what each provider issues.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cases_common import ours_check, package_check
from .cases_linear_logprobs import head_cost, make_inputs
from .cost import HeadPath
from .harness import OpBench, Provider, call_mapped

IGNORE_INDEX = -100
ALIASES = {
    "hidden": ("hidden", "hidden_states", "_input", "input", "x"),
    "weight": ("weight", "lm_head_weight", "lin_weight", "lm_head"),
    "labels": ("labels", "target", "targets"),
}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(out, inputs):
    return _first(out)


def _eager(inputs):
    logits = (inputs["hidden"] @ inputs["weight"].T).float()
    return F.cross_entropy(logits, inputs["labels"], ignore_index=IGNORE_INDEX)


def _fused(inputs):
    import alignkernels

    return _first(call_mapped(alignkernels.fused_linear_cross_entropy, inputs, ALIASES, ignore_index=IGNORE_INDEX))


def _composed(inputs):
    import alignkernels

    return -alignkernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"]).mean()


def _liger(inputs):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(inputs["weight"], inputs["hidden"], inputs["labels"])


def _cce(inputs):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"])


def build() -> OpBench:
    return OpBench(
        name="cross_entropy",
        title="SFT cross-entropy: hidden [N, H] x lm_head [V, H] -> mean -log p(label)",
        make_inputs=make_inputs,
        providers=[
            Provider("eager", _eager, role="eager", cost=head_cost(HeadPath.MATERIALISED)),
            Provider("alignkernels:fused", _fused, role="ours", available=ours_check(("fused_linear_cross_entropy",)),
                     cost=head_cost(HeadPath.GRAD_IN_FORWARD)),
            Provider("alignkernels:linear_logprobs", _composed, role="ours", available=ours_check(("linear_logprobs",))),
            Provider("liger", _liger,
                     available=package_check("liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel",
                                             cuda_only=True),
                     note="liger: LigerFusedLinearCrossEntropyLoss", cost=head_cost(HeadPath.GRAD_IN_FORWARD)),
            Provider("cce", _cce, available=package_check("cut_cross_entropy", "cut-cross-entropy (Apple CCE)",
                                                          cuda_only=True), note="cce: Apple Cut Cross-Entropy"),
        ],
        shapes={
            "cuda": [{"N": n, "H": 4096, "V": 128256} for n in (4096, 8192, 16384)],
            "cpu": [{"N": n, "H": 256, "V": 32000} for n in (256, 1024)],
            "quick": [{"N": n, "H": 32, "V": 500} for n in (16, 64)],
        },
        shape_keys=("N", "H", "V"),
        x_axis="N",
        to_loss=_loss,
        cost=head_cost(HeadPath.RECOMPUTE),
        roofline="matmul",
    )
