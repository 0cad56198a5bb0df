"""Spawned worker of ``test_verl_engine.py``: verl's own FSDP2 training engine, stock vs patched.

verl 0.9.1's ``FSDPEngineWithLMHead`` (``verl/workers/engine/fsdp/transformer_impl.py``) is built
directly (verl's ``EngineRegistry`` lists it for cuda/npu only) on a one-rank gloo process group, with
a CPU platform registered through verl's ``verl.plugin.platform.PlatformRegistry`` and selected by
``VERL_PLATFORM=cpu`` (set before ``import verl``: ``verl.utils.device`` resolves the platform at
import). The model is a tiny Qwen2 saved from a config into a temporary directory (no hub), attention
``sdpa``, fp32 throughout (``mixed_precision`` fp32: the engine then skips autocast).

Each case trains the same model twice for ``STEPS`` optimizer steps (two micro-batches each, so
gradients accumulate): once with verl's stock functions, once after
``alignkernels.integrations.verl.apply()`` (called before the engine is built: the engine compiles
its entropy function at construction). Per step it records the loss, the per-token log-probs and
entropies the engine returned, and at the end every parameter; ``python verl_engine_worker.py OUT
CASE...`` writes them with ``torch.save`` to ``OUT/<case>.pt`` (or the traceback to
``OUT/<case>.err``). This runs in its own process so verl's global state (platform, process group,
compiled functions, monkey-patched model classes) never reaches the rest of the suite.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from types import ModuleType
from typing import NamedTuple

os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")  # the test suite's setting (alignkernels' Triton kernels on CPU)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VOCAB = 89
STEPS = 3
LENGTHS = (9, 13, 6, 11)  # four sequences, two micro-batches of two


class Case(NamedTuple):
    remove_padding: bool  # model_config.use_remove_padding
    fused: bool  # model_config.use_fused_kernels (torch backend: FusedLinearForPPO)
    tied: bool  # tie_word_embeddings
    stock_fused: bool  # whether the stock run is fused too (else verl's logits path is the reference)


CASES = {
    "padded": Case(remove_padding=False, fused=False, tied=False, stock_fused=False),
    "remove_padding": Case(remove_padding=True, fused=False, tied=False, stock_fused=False),
    "fused_tied": Case(remove_padding=True, fused=True, tied=True, stock_fused=True),
    # verl's stock fused forward fails on an untied head that FSDP2 shards as its own unit (a DTensor
    # weight): the stock run checks that failure, then verl's logits path is the reference
    "fused_untied": Case(remove_padding=True, fused=True, tied=False, stock_fused=False),
}


def register_cpu_platform() -> None:
    """A CPU ``PlatformBase`` under the name ``cpu`` (verl 0.9.1 registers nvidia, amd, huawei)."""
    from verl.plugin.platform import PlatformRegistry
    from verl.plugin.platform.platform_base import PlatformBase

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = torch.cpu

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"  # verl moves batches with .to(get_device_id())

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    assert isinstance(PlatformCPU.device_module, ModuleType)


def save_tiny_model(path: str, tied: bool) -> None:
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied, max_position_embeddings=64,
    )  # fmt: skip
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # peaked distributions: entropies and log-probs far from uniform
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(path)


def without_trl_value_head() -> None:
    """verl's ``apply_monkey_patch`` imports TRL's ``AutoModelForCausalLMWithValueHead`` whenever TRL is
    installed (``verl/models/transformers/monkey_patch.py``); TRL 1.16 has it in neither place verl looks,
    so the import fails. It only patches the value-head model's ``state_dict``: tell verl TRL is absent."""
    import verl.models.transformers.monkey_patch as monkey_patch

    monkey_patch.is_trl_available = lambda: False


def build_engine(path: str, remove_padding: bool, fused: bool):
    from verl.trainer.config.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    model_config = HFModelConfig(
        path=path, load_tokenizer=False, override_config={"attn_implementation": "sdpa"},
        use_remove_padding=remove_padding, use_fused_kernels=fused, enable_gradient_checkpointing=False,
        fused_kernel_options={"impl_backend": "torch"} if fused else {},
    )  # fmt: skip
    engine_config = FSDPEngineConfig(
        strategy="fsdp2", use_torch_compile=True, use_dynamic_bsz=False, micro_batch_size_per_gpu=2,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_remove_padding=remove_padding, use_fused_kernels=fused,
    )  # fmt: skip
    # plain SGD: Adam's first steps are lr·sign(g), which turns rounding noise in near-zero gradients into
    # full-size parameter differences; SGD keeps the comparison on the gradients themselves
    optimizer_config = FSDPOptimizerConfig(optimizer="SGD", lr=0.05, weight_decay=0.0, clip_grad=1e6)
    engine = FSDPEngineWithLMHead(model_config, engine_config, optimizer_config, CheckpointConfig())
    engine.initialize()
    return engine


def batch(step: int, remove_padding: bool, fused: bool):
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(1000 + step)
    ids = [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    data = tu.get_tensordict(
        {
            "input_ids": nested(ids),
            "position_ids": nested([torch.arange(n) for n in LENGTHS]),
            "loss_mask": nested([(torch.arange(n) >= 3).float() for n in LENGTHS]),  # a 3-token "prompt"
            "advantages": nested([torch.randn(n, generator=g) for n in LENGTHS]),
        },
        non_tensor_dict={
            "temperature": 0.7, "use_remove_padding": remove_padding, "use_fused_kernels": fused,
            "calculate_entropy": True, "use_dynamic_bsz": False, "micro_batch_size_per_gpu": 2,
            "return_model_output": True, "pad_token_id": 0,
        },
    )  # fmt: skip
    return data


def loss_function(model_output, data, dp_group=None):
    """A policy-gradient loss with an entropy bonus, normalised by the global token count as verl's
    losses are: both engine outputs reach the gradient."""
    from verl.utils import tensordict_utils as tu

    mask = data["loss_mask"].values()
    adv = data["advantages"].values()
    n = tu.get_non_tensor_data(data, "batch_num_tokens", None)
    logp = model_output["log_probs"].values()
    entropy = model_output["entropy"].values()
    loss = -(logp * adv * mask).sum() / n - 0.05 * (entropy * mask).sum() / n
    return loss, {}


def train(path: str, remove_padding: bool, fused: bool, steps: int = STEPS) -> dict:
    import transformers

    # verl's apply_monkey_patch replaces the model *class*'s forward for the fused path; put it back
    # after each run, as a fresh worker process would have it
    forward = transformers.Qwen2ForCausalLM.forward
    try:
        return _train(path, remove_padding, fused, steps)
    finally:
        transformers.Qwen2ForCausalLM.forward = forward


def _train(path: str, remove_padding: bool, fused: bool, steps: int) -> dict:
    engine = build_engine(path, remove_padding, fused)
    out = {"loss": [], "log_probs": [], "entropy": [], "initial": full_parameters(engine.module)}
    for step in range(steps):
        with engine.train_mode():
            engine.optimizer_zero_grad()
            result = engine.forward_backward_batch(batch(step, remove_padding, fused), loss_function)
            engine.optimizer_step()
        model_output = result["model_output"]
        out["loss"].append(torch.tensor(result["loss"], dtype=torch.float64).sum())
        out["log_probs"].append(model_output["log_probs"].values().detach().clone())
        out["entropy"].append(model_output["entropy"].values().detach().clone())
    out["params"] = full_parameters(engine.module)
    return out


def full_parameters(module) -> dict:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()}


def run_case(name: str, workdir: str) -> dict:
    import alignkernels.integrations.verl as ak_verl

    case = CASES[name]
    path = os.path.join(workdir, name)
    save_tiny_model(path, case.tied)
    ak_verl.remove()
    result = {"stock": train(path, case.remove_padding, case.stock_fused)}
    if case.fused and not case.stock_fused:
        try:
            train(path, case.remove_padding, fused=True, steps=1)
            result["stock_fused_error"] = ""
        except RuntimeError as e:  # the upstream failure (mixed torch.Tensor and DTensor)
            result["stock_fused_error"] = str(e)
    ak_verl.apply()
    try:
        result["patched"] = train(path, case.remove_padding, case.fused)
        result["adapter_calls"] = ak_verl.adapter_calls()
    finally:
        ak_verl.remove()
    return result


def main(out_dir: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    register_cpu_platform()
    without_trl_value_head()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))  # fmt: skip
        try:
            for name in cases:
                try:
                    torch.save(run_case(name, tmp), os.path.join(out_dir, f"{name}.pt"))
                except Exception:  # reported by the pytest side
                    with open(os.path.join(out_dir, f"{name}.err"), "w") as f:
                        f.write(traceback.format_exc())
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
