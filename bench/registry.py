"""The default benchmark registry: every op ``python -m bench`` knows, in run order."""
from __future__ import annotations

from .harness import OpBench


def build_ops() -> dict[str, OpBench]:
    from . import cases_cross_entropy, cases_linear_logprobs, cases_losses, cases_prm, cases_token_logprobs

    ops = [
        cases_token_logprobs.build(),
        cases_linear_logprobs.build(),
        cases_cross_entropy.build(),
        cases_losses.build_grpo(),
        cases_losses.build_dpo(),
        cases_losses.build_gae(),
        cases_prm.build_prm(),
    ]
    return {op.name: op for op in ops}
