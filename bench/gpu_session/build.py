"""Phase ``build``: the CUDA extension for this GPU's arch only (``ALIGNKERNELS_CUDA_ARCHS``, set by the
shell from the device probe), before the tests, so that neither the tests (which reuse it, see
``extension_under_test`` in ``tests/kernels/test_cuda_ext.py``) nor the benchmarks pay for it."""
from __future__ import annotations

import os
import time

from .record import PhaseRecord, run_step


def build_cuda_extension() -> dict:
    """First use of ``backend="cuda"`` builds the extension (cached, file-locked) for this GPU's arch."""
    import torch

    import alignkernels

    if not torch.cuda.is_available():
        return {"status": "skipped", "note": "no CUDA device: the extension is built on a GPU machine only"}
    t0 = time.time()
    logits = torch.randn(4, 1000, device="cuda")
    labels = torch.randint(0, 1000, (4,), device="cuda")
    got = alignkernels.token_logprobs(logits, labels, backend="cuda")
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    err = (got.double() - want).abs().max().item()
    return {"status": "ok" if err < 1e-4 else "error", "build_s": round(time.time() - t0, 1), "max_abs_err": err,
            "archs": os.environ.get("ALIGNKERNELS_CUDA_ARCHS")}  # fmt: skip


def phase_build(args) -> int:
    record = PhaseRecord(args.work, "build")
    run_step(record, "cuda_extension", args.deadline, build_cuda_extension)
    return 0
