"""Phase ``tune``: each launch knob swept on the headline shapes (``*_CONFIGS`` through the kernel
module's ``pick_config``; ``chunk_size`` x ``vocab_block_size`` of ``linear_logprobs``); the summary
proposes the fastest forward+backward per knob (``tuning.md``)."""
from __future__ import annotations

import contextlib
import importlib
import sys
import time

from .plan import sizes
from .record import PhaseRecord, run_step


@contextlib.contextmanager
def forced_config(kernel_module_name: str, configs_name: str, config: tuple):
    """Make the launcher of a kernel module choose ``config``: its ``*_CONFIGS`` table is narrowed to
    that one entry and ``pick_config`` returns it (in the kernel module and wherever an op module
    bound the same function)."""
    module = importlib.import_module(kernel_module_name)
    original_configs, original_pick = getattr(module, configs_name), getattr(module, "pick_config", None)
    patched = [(module, configs_name, original_configs)]
    setattr(module, configs_name, (config,))
    if original_pick is not None:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("alignkernels") and getattr(mod, "pick_config", None) is original_pick:
                patched.append((mod, "pick_config", original_pick))
                setattr(mod, "pick_config", lambda *a, **k: config)
    try:
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)


def _time_fwd_fwdbwd(run, inputs_fn, repeats: int, device) -> dict:
    """Median forward and forward+backward ms of ``run(inputs)`` (loss = weighted sum of outputs)."""
    from ..cases_common import weighted_logp_entropy_loss
    from ..harness import summarize_ms, tensors_in, time_cpu, time_cuda

    inputs = inputs_fn()
    grads = [t for t in tensors_in(inputs) if t.requires_grad]
    forward = lambda: run(inputs)  # noqa: E731
    fwdbwd = lambda: weighted_logp_entropy_loss(run(inputs), inputs).backward()  # noqa: E731
    out = {}
    for name, fn in (("fwd_ms", forward), ("fwdbwd_ms", fwdbwd)):
        fn()  # warm-up (and compile)
        for t in grads:
            t.grad = None
        times = time_cuda(fn, repeats, grads, device) if device.type == "cuda" else time_cpu(fn, repeats, grads)[0]
        out[name] = summarize_ms(times)["median"]
    return out


def _sweep(configs, deadline: float, time_one) -> list[dict]:
    """One row per config: ``time_one(config)``'s timings, ``skipped`` past the phase deadline, or the
    error (e.g. an OOM at a big tile) -- a config that fails never ends the sweep."""
    rows = []
    for config in configs:
        if time.time() > deadline - 5:
            rows.append({"config": list(config), "status": "skipped", "note": "phase deadline"})
            continue
        try:
            rows.append({"config": list(config), "status": "ok", **time_one(config)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"config": list(config), "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def tune_token_logprobs(shape: dict, device, dtype, repeats: int, deadline: float, dry_run: bool) -> dict:
    import alignkernels
    import alignkernels.kernels.token_logprobs as kmod

    from ..cases_token_logprobs import make_inputs

    current = kmod.pick_config(shape["V"])
    declared = list(kmod.TOKEN_LOGPROBS_CONFIGS)
    extra = [] if dry_run else [(2048, 4), (4096, 4), (8192, 8), (8192, 16), (16384, 16)]
    declared = declared[:2] if dry_run else declared
    run = lambda inputs: alignkernels.token_logprobs(inputs["logits"], inputs["labels"], return_entropy=True,  # noqa: E731
                                                     backend="triton")  # fmt: skip

    def time_one(config):
        with forced_config(kmod.__name__, "TOKEN_LOGPROBS_CONFIGS", config):
            return _time_fwd_fwdbwd(run, lambda: make_inputs(dict(shape), dtype, device), repeats, device)

    rows = _sweep(dict.fromkeys(declared + extra), deadline, time_one)
    return {"knob": "TOKEN_LOGPROBS_CONFIGS (BLOCK_V, num_warps)", "shape": shape, "current": list(current),
            "declared": [list(c) for c in declared], "rows": rows}  # fmt: skip


def tune_linear_logprobs(shape: dict, device, dtype, repeats: int, deadline: float, dry_run: bool) -> dict:
    import alignkernels
    import alignkernels.kernels.linear_logprobs as kmod

    from ..cases_linear_logprobs import make_inputs

    chunks = (4,) if dry_run else (2048, 4096, 8192)
    blocks = (None, 128) if dry_run else (None, 8192, 16384, 32768)
    inputs_fn = lambda: make_inputs(dict(shape), dtype, device)  # noqa: E731

    def time_plan(config):
        chunk, block = config
        run = lambda inputs: alignkernels.linear_logprobs(  # noqa: E731
            inputs["hidden"], inputs["weight"], inputs["labels"], return_entropy=True, backend="triton",
            chunk_size=chunk, vocab_block_size=block)  # fmt: skip
        return _time_fwd_fwdbwd(run, inputs_fn, repeats, device)

    def time_fold(config):
        run = lambda inputs: alignkernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"],  # noqa: E731
                                                          return_entropy=True, backend="triton")  # fmt: skip
        with forced_config(kmod.__name__, "LINEAR_LOGPROBS_CONFIGS", config):
            return _time_fwd_fwdbwd(run, inputs_fn, repeats, device)

    rows = _sweep([(chunk, block) for chunk in chunks for block in blocks], deadline, time_plan)
    declared = list(kmod.LINEAR_LOGPROBS_CONFIGS)
    fold_rows = _sweep(dict.fromkeys(declared[:2] if dry_run else declared + [(4096, 8), (8192, 16)]), deadline,
                       time_fold)  # fmt: skip
    return {"knob": "linear_logprobs (chunk_size, vocab_block_size)", "shape": shape, "current": [None, None],
            "rows": rows, "fold": {"knob": "LINEAR_LOGPROBS_CONFIGS (BLOCK_V, num_warps)", "declared":
                                   [list(c) for c in declared], "rows": fold_rows}}  # fmt: skip


def phase_tune(args) -> int:
    import torch

    from ..harness import DTYPES

    record = PhaseRecord(args.work, "tune")
    cfg = sizes(args.dry_run)
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    repeats = 1 if args.dry_run else 5
    heads = {h.op: h for h in cfg["headlines"]}
    run_step(record, "token_logprobs", args.deadline, lambda: tune_token_logprobs(
        heads["token_logprobs"].shape, device, dtype, repeats, args.deadline, args.dry_run))  # fmt: skip
    run_step(record, "linear_logprobs", args.deadline, lambda: tune_linear_logprobs(
        heads["linear_logprobs"].shape, device, dtype, repeats, args.deadline, args.dry_run))  # fmt: skip
    return 0
