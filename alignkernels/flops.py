"""Count the matmul FLOPs a piece of PyTorch code actually dispatches (tests and benchmarks).

``MatmulFlopCounter`` is a ``TorchDispatchMode`` that sees every ATen call below autograd -- forward
and backward alike -- and adds ``2·m·n·k`` for each matrix product: ``mm``, ``addmm``, ``bmm``,
``baddbmm``, ``matmul``/``dot``-style ops, including the in-place (``addmm_``, ``baddbmm_``) and
``out=`` overloads, which ``torch.utils.flop_counter`` does not count (it misses ``addmm_``).
Everything else (elementwise passes, reductions) is free here: the claim it checks is about GEMMs.

    with MatmulFlopCounter() as counter:
        loss = fused_linear_cross_entropy(hidden, weight, labels)
        loss.backward()
    counter.total  # ≈ 6·N·H·V
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _mm_flops(a, b):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm_flops(a, b):
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


# overload packet -> (positions of the two operands, FLOPs of one product)
_MATMULS = {
    aten.mm: ((0, 1), _mm_flops),
    aten.addmm: ((1, 2), _mm_flops),
    aten.addmm_: ((1, 2), _mm_flops),
    aten.bmm: ((0, 1), _bmm_flops),
    aten.baddbmm: ((1, 2), _bmm_flops),
    aten.baddbmm_: ((1, 2), _bmm_flops),
    aten.mv: ((0, 1), lambda a, v: 2 * a.shape[0] * a.shape[1]),
    aten.addmv: ((1, 2), lambda a, v: 2 * a.shape[0] * a.shape[1]),
    aten.addmv_: ((1, 2), lambda a, v: 2 * a.shape[0] * a.shape[1]),
    aten.dot: ((0, 1), lambda a, b: 2 * a.shape[0]),
    aten.vdot: ((0, 1), lambda a, b: 2 * a.shape[0]),
}


class MatmulFlopCounter(TorchDispatchMode):
    """Sum of matmul FLOPs dispatched inside the ``with`` block (``total``), per op (``by_op``).
    ``matmul``/``linear`` decompose into the ops above before reaching this mode, so each product
    is counted once."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _MATMULS.get(func.overloadpacket)
        if entry is not None:
            (i, j), flops = entry
            self.by_op[func.overloadpacket.__name__] += int(flops(args[i], args[j]))
        return func(*args, **kwargs)
