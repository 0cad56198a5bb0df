"""Alignment losses on per-token log-probs (DPO, GRPO, PPO, reward) and their fused forms.

Submodules are imported on first use (``alignkernels.losses.grpo`` etc.); the public names are
re-exported lazily by ``alignkernels``.
"""
