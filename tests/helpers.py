"""Shared test helpers (imported by test modules; ``conftest.py`` only wires pytest hooks).

Without a GPU, Triton kernels run in the interpreter on CPU tensors. ``TRITON_INTERPRET`` is read
when ``@triton.jit`` decorates a function, so it is set here, on first import, before any kernel
module is imported (``conftest.py`` imports this module first thing).
"""
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class ReturnedShapes(TorchDispatchMode):
    """Records the shape of every tensor an ATen op returns inside the ``with`` block (forward and
    backward): how tests show that a path never holds ``[N, V]`` logits."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


class NewBuffers(TorchDispatchMode):
    """Records ``(numel, dtype)`` of every tensor an ATen op allocates inside the ``with`` block (an output
    whose storage is none of its inputs'): how tests show that a path never forms a ``[V, H]`` gradient,
    an fp32 copy of the weight, or an ``[N, V]`` tile."""

    def __init__(self):
        super().__init__()
        self.buffers = []

    @property
    def sizes(self) -> list[int]:
        return [n for n, _ in self.buffers]

    def largest(self, dtype=None) -> int:
        """The element count of the largest new buffer (of ``dtype``, when given); 0 if none."""
        return max((n for n, dt in self.buffers if dtype is None or dt == dtype), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}  # fmt: skip
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.buffers.append((o.numel(), o.dtype))
        return out
