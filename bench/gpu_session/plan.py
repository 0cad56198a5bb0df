"""What the bench and tune phases measure: the headline shapes and providers, on the GPU and in the
dry run (tiny shapes, the Triton providers interpreted on CPU)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Headline:
    """One headline case: an op of ``bench.registry`` at one shape, with the providers to compare."""

    op: str
    shape: dict
    providers: tuple[str, ...]


GPU_HEADLINES = (
    Headline("token_logprobs", {"N": 8192, "V": 151936},
             ("eager", "alignkernels:triton", "alignkernels:cuda", "trl", "liger")),
    Headline("linear_logprobs", {"N": 8192, "H": 4096, "V": 128256},
             ("eager", "alignkernels:triton", "trl", "cce", "liger")),
    Headline("cross_entropy", {"N": 8192, "H": 4096, "V": 128256},
             ("eager", "alignkernels:fused", "alignkernels:linear_logprobs", "cce", "liger")),
    # Qwen2.5-7B head, 8 completions of 1k tokens; Llama-3-8B head, 4 pairs of 1k tokens
    Headline("grpo", {"B": 8, "T": 1024, "H": 3584, "V": 151936},
             ("eager", "alignkernels:fused", "alignkernels:linear_logprobs+grpo_loss", "liger")),
    Headline("dpo", {"B": 4, "T": 1024, "H": 4096, "V": 128256}, ("eager", "alignkernels:fused", "liger")),
)
DRY_HEADLINES = (  # the interpreter runs one Triton program at a time: a few rows only
    Headline("token_logprobs", {"N": 4, "V": 300}, ("eager", "alignkernels:triton", "alignkernels:torch")),
    Headline("linear_logprobs", {"N": 4, "H": 32, "V": 300}, ("eager", "alignkernels:triton", "alignkernels:torch")),
    Headline("cross_entropy", {"N": 4, "H": 32, "V": 300},
             ("eager", "alignkernels:fused", "alignkernels:linear_logprobs")),
    Headline("grpo", {"B": 1, "T": 4, "H": 32, "V": 300}, ("eager", "alignkernels:fused")),
    Headline("dpo", {"B": 1, "T": 4, "H": 32, "V": 300}, ("eager", "alignkernels:fused")),
)
MEMORY_OP = "linear_logprobs"
GPU_MEMORY = ({"N": 32768, "H": 4096, "V": 128256}, {"N": 131072, "H": 4096, "V": 128256})
DRY_MEMORY = ({"N": 4, "H": 32, "V": 300}, {"N": 8, "H": 32, "V": 300})
MEMORY_PROVIDERS = ("eager", "alignkernels:triton", "alignkernels:torch", "trl", "cce", "liger")


def sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(headlines=DRY_HEADLINES, memory=DRY_MEMORY, repeats=1, warmup=1, device="cpu", dtype="fp32")
    return dict(headlines=GPU_HEADLINES, memory=GPU_MEMORY, repeats=10, warmup=2, device="cuda", dtype="bf16")
