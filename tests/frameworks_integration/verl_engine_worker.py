"""Spawned worker of ``test_verl_engine.py``: verl's own FSDP2 training engine, stock vs patched.

The engine harness is ``bench/e2e_verl.py`` (verl 0.9.1's ``FSDPEngineWithLMHead`` built directly on a
one-rank gloo group, a CPU platform registered through verl's ``PlatformRegistry``, a tiny Qwen2 saved from
a config, ``sdpa``, fp32, ``use_torch_compile=True``, plain SGD). Each case trains the same model twice for
``STEPS`` optimizer steps (two micro-batches each, so gradients accumulate): with verl's stock functions,
then after ``alignkernels.integrations.verl.apply()`` (called before the engine is built: the engine
compiles its entropy function at construction). Per step it records the loss, the per-token log-probs and
entropies (and Σπ² in the ``sum_pi_squared_*`` cases) the engine returned, and the parameters before and
after; the patched run also counts ``token_logprobs`` calls (:class:`TokenLogprobsSpy`);
``python verl_engine_worker.py OUT CASE...`` writes them with ``torch.save`` to ``OUT/<case>.pt`` (or the traceback to ``OUT/<case>.err``).
Its own process keeps verl's global state (platform, process group, compiled functions, patched model
classes) out of the test session.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from typing import NamedTuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # the test suite's setting (alignkernels' Triton kernels on CPU)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

import torch  # noqa: E402

from bench import e2e_verl  # noqa: E402

VOCAB = 89
STEPS = 3
LENGTHS = (9, 13, 6, 11)  # four sequences, two micro-batches of two
MODEL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip


class Case(NamedTuple):
    remove_padding: bool  # model_config.use_remove_padding
    fused: bool  # model_config.use_fused_kernels (torch backend: FusedLinearForPPO)
    tied: bool  # tie_word_embeddings
    stock_fused: bool  # whether the stock run is fused too (else verl's logits path is the reference)
    sum_pi_squared: bool = False  # calculate_sum_pi_squared (verl refuses it on its fused path: checked)


CASES = {
    "padded": Case(remove_padding=False, fused=False, tied=False, stock_fused=False),
    "remove_padding": Case(remove_padding=True, fused=False, tied=False, stock_fused=False),
    "fused_tied": Case(remove_padding=True, fused=True, tied=True, stock_fused=True),
    # verl's stock fused forward fails on an untied head that FSDP2 shards as its own unit (a DTensor
    # weight): the stock run checks that failure, then verl's logits path is the reference
    "fused_untied": Case(remove_padding=True, fused=True, tied=False, stock_fused=False),
    # Σπ²: on the fused path from the head's tiles vs verl's calculate_sum_pi_squared_from_logits on the
    # logits path (the stock fused run checks verl's refusal); on the padded logits path beside the one pass
    "sum_pi_squared_fused": Case(remove_padding=True, fused=True, tied=True, stock_fused=False, sum_pi_squared=True),
    "sum_pi_squared_padded": Case(remove_padding=False, fused=False, tied=False, stock_fused=False,
                                  sum_pi_squared=True),
}


def full_parameters(module) -> dict:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()}


def train(path: str, remove_padding: bool, fused: bool, steps: int = STEPS, sum_pi_squared: bool = False) -> dict:
    setup = e2e_verl.EngineSetup(remove_padding=remove_padding, fused=fused, sum_pi_squared=sum_pi_squared)
    with e2e_verl.model_class_forward_restored():
        engine = e2e_verl.build_engine(path, setup)
        out = {"loss": [], "log_probs": [], "entropy": [], "sum_pi_squared": []}
        out["initial"] = full_parameters(engine.module)
        for step in range(steps):
            result = e2e_verl.train_step(engine, e2e_verl.engine_batch(LENGTHS, VOCAB, 1000 + step, setup))
            out["loss"].append(torch.tensor(result["loss"], dtype=torch.float64).sum())
            out["log_probs"].append(result["model_output"]["log_probs"].values().detach().clone())
            out["entropy"].append(result["model_output"]["entropy"].values().detach().clone())
            if sum_pi_squared:
                out["sum_pi_squared"].append(result["model_output"]["sum_pi_squared"].values().detach().clone())
        out["params"] = full_parameters(engine.module)
    return out


class TokenLogprobsSpy:
    """Counts ``alignkernels.token_logprobs`` calls made by the verl drop-in (its logits seams in
    ``alignkernels/integrations/verl.py`` and the engine's one pass in ``verl_engine.py``)."""

    def __init__(self):
        import alignkernels.integrations.verl as ak_verl
        import alignkernels.integrations.verl_engine as ak_engine

        self.modules, self.calls = (ak_verl, ak_engine), 0
        self.original = ak_verl.token_logprobs

    def __enter__(self):
        def spy(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        for module in self.modules:
            module.token_logprobs = spy
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            module.token_logprobs = self.original


def run_case(name: str, workdir: str) -> dict:
    import alignkernels.integrations.verl as ak_verl

    case = CASES[name]
    path = os.path.join(workdir, name)
    e2e_verl.save_model(path, MODEL, tied=case.tied, head_scale=8.0)  # peaked: log-probs far from uniform
    ak_verl.remove()
    result = {"stock": train(path, case.remove_padding, case.stock_fused, sum_pi_squared=case.sum_pi_squared)}
    if case.fused and not case.stock_fused:
        try:
            train(path, case.remove_padding, fused=True, steps=1, sum_pi_squared=case.sum_pi_squared)
            result["stock_fused_error"] = ""
        except RuntimeError as e:  # the upstream failure (mixed torch.Tensor and DTensor) or verl's Σπ² refusal
            result["stock_fused_error"] = str(e)
    ak_verl.apply()
    try:
        with TokenLogprobsSpy() as spy:
            result["patched"] = train(path, case.remove_padding, case.fused, sum_pi_squared=case.sum_pi_squared)
        result["adapter_calls"] = ak_verl.adapter_calls()
        result["token_logprobs_calls"] = spy.calls
    finally:
        ak_verl.remove()
    return result


def main(out_dir: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    e2e_verl.use_cpu_platform()
    e2e_verl.without_trl_value_head()
    with tempfile.TemporaryDirectory() as tmp:
        e2e_verl.init_one_rank(tmp, "cpu")
        try:
            for name in cases:
                try:
                    torch.save(run_case(name, tmp), os.path.join(out_dir, f"{name}.pt"))
                except Exception:  # reported by the pytest side
                    with open(os.path.join(out_dir, f"{name}.err"), "w") as f:
                        f.write(traceback.format_exc())
        finally:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
