"""pytest-benchmark cases: the ``python -m bench`` ops and providers at their ``--quick`` shapes.

``pytest bench --benchmark-only`` times them (add ``--benchmark-save=NAME`` /
``--benchmark-compare`` to keep and compare runs across commits); a plain ``pytest`` run executes
each case once (see ``bench/conftest.py``). Each case runs the provider's forward+backward (forward
only for GAE) on the default device; a provider that cannot run here is skipped with its reason.
"""
from __future__ import annotations

import pytest
import torch

from bench.harness import tensors_in
from bench.registry import build_ops

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = build_ops()
CASES = [(op_name, p.name) for op_name, op in OPS.items() for p in op.providers]


@pytest.mark.parametrize("op_name,provider_name", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_bench(benchmark, op_name, provider_name):
    op = OPS[op_name]
    provider = op.provider(provider_name)
    reason = provider.available(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    shape = op.shapes["quick"][-1]
    dtype = op.fixed_dtype or op.default_dtype[DEVICE.type]
    torch.manual_seed(0)
    inputs = op.make_inputs(dict(shape), dtype, DEVICE)
    leaves = [t for t in tensors_in(inputs) if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        out = provider.run(inputs)
        if op.to_loss is not None:
            op.to_loss(out, inputs).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update({"op": op_name, "provider": provider_name, "shape": shape, "dtype": str(dtype)})
    out = benchmark(step)
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.isfinite(first.detach().float()).all()
    if op.to_loss is not None:
        assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in leaves)
