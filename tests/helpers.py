"""Shared test helpers (imported by test modules; ``conftest.py`` only wires pytest hooks).

Without a GPU, Triton kernels run in the interpreter on CPU tensors. ``TRITON_INTERPRET`` is read
when ``@triton.jit`` decorates a function, so it is set here, on first import, before any kernel
module is imported (``conftest.py`` imports this module first thing).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The device the "triton" backend runs on in this session: real GPU, or the CPU interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


# A near-delta softmax (T = 0.01) has gradient entries ~e^-200: fp32 underflows them to 0 while fp64 keeps
# 1e-80. Gradients are compared relative to max(max|grad|, GRAD_FLOOR).
GRAD_FLOOR = 1e-20


def max_rel_error(actual, expected, floor=0.0):
    """``max|actual - expected| / max(max|expected|, floor)`` in fp64: the precision tests' one metric
    (``floor=1`` for log-probs and entropies, in nats: absolute below one nat)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor) or 1.0
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
