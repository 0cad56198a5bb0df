"""verl's FSDP2 training engine in one process: the harness of the verl step of ``python -m bench --e2e``
(:func:`verl_step_benchmark`) and of the stock-vs-patched engine test
(``tests/frameworks_integration/verl_engine_worker.py``).

verl 0.9.1's ``FSDPEngineWithLMHead`` (``verl/workers/engine/fsdp/transformer_impl.py``) is built
directly (verl's ``EngineRegistry`` lists it for cuda/npu only) on a one-rank process group (gloo on CPU,
nccl on CUDA). On CPU a platform named ``cpu`` is registered through verl's
``verl.plugin.platform.PlatformRegistry`` and selected with ``VERL_PLATFORM=cpu`` (:func:`use_cpu_platform`:
before verl resolves its platform, i.e. before ``verl.utils.device`` is first used). The model is a Qwen2
saved from a config into a directory (no hub), attention ``sdpa``, no tokenizer. A batch is verl's
no-padding layout: nested jagged ``input_ids`` / ``position_ids`` / ``loss_mask`` / ``advantages`` and the
engine's switches as non-tensor data (:func:`engine_batch`); the loss is a policy-gradient term plus an
entropy bonus over the global token count (:func:`policy_loss`), so both engine outputs reach the gradient.

Memory of the benchmark: the peak over the measured steps above the level before them (allocated bytes on
CUDA; resident set on CPU, ``VmHWM`` reset through ``/proc/self/clear_refs``), so the weights, verl's imports
and the compile caches are out of it; each mode runs in a fresh process (``bench/e2e.py``).
"""
from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import NamedTuple

import torch

from .harness import CpuRssProbe, CudaProbe

VERL_MODES = ("verl", "alignkernels", "alignkernels_fused")


class EngineSetup(NamedTuple):
    """What one engine is built with."""

    remove_padding: bool = True  # model_config.use_remove_padding (verl's default)
    fused: bool = False  # model_config.use_fused_kernels, torch backend (FusedLinearForPPO)
    lr: float = 0.05  # plain SGD
    micro_batch_size: int = 2  # sequences per micro-batch (use_dynamic_bsz off)
    dtype: str = "fp32"  # FSDP mixed-precision param dtype ("fp32": the engine skips autocast)
    sum_pi_squared: bool = False  # the batches ask for calculate_sum_pi_squared (model_output["sum_pi_squared"])


def use_cpu_platform() -> None:
    """Register a CPU ``PlatformBase`` under the name ``cpu`` and select it (``VERL_PLATFORM=cpu``)."""
    os.environ["VERL_PLATFORM"] = "cpu"
    from verl.plugin.platform import PlatformRegistry
    from verl.plugin.platform.platform_base import PlatformBase

    if PlatformRegistry.get("cpu") is not None:
        return

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


def without_trl_value_head() -> None:
    """verl's ``apply_monkey_patch`` imports TRL's ``AutoModelForCausalLMWithValueHead`` whenever TRL is
    installed (``verl/models/transformers/monkey_patch.py``); TRL 1.16 has it in neither place verl looks,
    so building any engine fails. It only patches the value-head model's ``state_dict``: tell verl TRL is absent."""
    import verl.models.transformers.monkey_patch as monkey_patch

    monkey_patch.is_trl_available = lambda: False


def init_one_rank(rendezvous_dir: str, device_type: str) -> None:
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous_dir}/rendezvous", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip


def save_model(path: str, config_kwargs: dict, *, tied: bool, head_scale: float = 1.0, seed: int = 0) -> None:
    """A Qwen2 from ``config_kwargs`` (``tie_word_embeddings=tied``) saved as a local checkpoint; the output
    embedding scaled by ``head_scale`` (peaked distributions)."""
    import transformers

    config = transformers.Qwen2Config(**config_kwargs, tie_word_embeddings=tied)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.save_pretrained(path)


def build_engine(path: str, setup: EngineSetup):
    from verl.trainer.config.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    model_config = HFModelConfig(
        path=path, load_tokenizer=False, override_config={"attn_implementation": "sdpa"},
        use_remove_padding=setup.remove_padding, use_fused_kernels=setup.fused, enable_gradient_checkpointing=False,
        fused_kernel_options={"impl_backend": "torch"} if setup.fused else {},
    )  # fmt: skip
    engine_config = FSDPEngineConfig(
        strategy="fsdp2", use_torch_compile=True, use_dynamic_bsz=False, micro_batch_size_per_gpu=setup.micro_batch_size,
        mixed_precision={"param_dtype": setup.dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_remove_padding=setup.remove_padding, use_fused_kernels=setup.fused,
    )  # fmt: skip
    # plain SGD: Adam's first steps are lr·sign(g), which turns rounding noise in near-zero gradients into
    # full-size parameter differences; SGD keeps a stock-vs-patched comparison on the gradients themselves
    optimizer_config = FSDPOptimizerConfig(optimizer="SGD", lr=setup.lr, weight_decay=0.0, clip_grad=1e6)
    engine = FSDPEngineWithLMHead(model_config, engine_config, optimizer_config, CheckpointConfig())
    engine.initialize()
    return engine


@contextmanager
def model_class_forward_restored():
    """verl's ``apply_monkey_patch`` replaces the model *class*'s forward for the fused path; put it back
    afterwards, as a fresh worker process would have it."""
    import transformers

    forward = transformers.Qwen2ForCausalLM.forward
    try:
        yield
    finally:
        transformers.Qwen2ForCausalLM.forward = forward


def engine_batch(lengths, vocab: int, seed: int, setup: EngineSetup, *, prompt_len: int = 3, temperature: float = 0.7):
    """verl's no-padding batch of ``len(lengths)`` random sequences; the first ``prompt_len`` tokens of each
    are out of the loss."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    return tu.get_tensordict(
        {
            "input_ids": nested([torch.randint(0, vocab, (n,), generator=g) for n in lengths]),
            "position_ids": nested([torch.arange(n) for n in lengths]),
            "loss_mask": nested([(torch.arange(n) >= prompt_len).float() for n in lengths]),
            "advantages": nested([torch.randn(n, generator=g) for n in lengths]),
        },
        non_tensor_dict={
            "temperature": temperature, "use_remove_padding": setup.remove_padding, "use_fused_kernels": setup.fused,
            "calculate_entropy": True, "calculate_sum_pi_squared": setup.sum_pi_squared,
            "use_dynamic_bsz": False, "micro_batch_size_per_gpu": setup.micro_batch_size,
            "return_model_output": True, "pad_token_id": 0,
        },
    )  # fmt: skip


def policy_loss(model_output, data, dp_group=None):
    """``-Σ logp·A·mask / n - 0.05·Σ H·mask / n`` with ``n`` the global token count (verl's normalisation)."""
    from verl.utils import tensordict_utils as tu

    mask = data["loss_mask"].values()
    n = tu.get_non_tensor_data(data, "batch_num_tokens", None)
    logp = model_output["log_probs"].values()
    entropy = model_output["entropy"].values()
    loss = -(logp * data["advantages"].values() * mask).sum() / n - 0.05 * (entropy * mask).sum() / n
    return loss, {}


def train_step(engine, data):
    """One optimizer step over ``data`` (its micro-batches accumulate): verl's ``forward_backward_batch``
    result (``loss`` per micro-batch, ``model_output`` with nested ``log_probs`` and ``entropy``)."""
    with engine.train_mode():
        engine.optimizer_zero_grad()
        result = engine.forward_backward_batch(data, policy_loss)
        engine.optimizer_step()
    return result


def verl_step_benchmark(mode: str, *, seq_len: int = 1024, batch_size: int = 2, vocab_size: int = 32000,
                        hidden_size: int = 896, intermediate_size: int = 4864, num_hidden_layers: int = 2,
                        num_attention_heads: int = 14, num_key_value_heads: int = 2, device=None,
                        steps: int = 3, warmup: int = 1, seed: int = 0) -> dict:  # fmt: skip
    """One verl training step (remove-padding layout, ``use_torch_compile`` on, one micro-batch of
    ``batch_size`` sequences of ``seq_len`` tokens, untied head): ``mode`` ``"verl"`` (stock logits path),
    ``"alignkernels"`` (the same after ``alignkernels.integrations.verl.apply()``) or
    ``"alignkernels_fused"`` (``use_fused_kernels`` after ``apply()``: the ``[N, V]`` logits never exist;
    verl's own fused path fails on this untied FSDP2 head). Sets up and tears down verl's platform, the
    process group and the patch itself (``python -m bench --e2e`` gives each mode a fresh process).
    Returns ``trainer, mode, device, dtype, batch_size, seq_len, step_time_s`` (median of ``steps`` after
    ``warmup``), ``peak_memory_bytes`` over the measured steps above the level before them (weights,
    optimizer, verl's imports and compile caches excluded: ``bench.harness``'s ``CudaProbe`` /
    ``CpuRssProbe``), ``memory_kind`` and ``loss``."""
    if mode not in VERL_MODES:
        raise ValueError(f"mode must be one of {VERL_MODES}, got {mode!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        use_cpu_platform()
    without_trl_value_head()
    import alignkernels.integrations.verl as ak_verl

    setup = EngineSetup(fused=mode == "alignkernels_fused", lr=1e-6, micro_batch_size=batch_size,
                        dtype="bf16" if device.type == "cuda" else "fp32")  # fmt: skip
    config = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max(seq_len, 32),
    )  # fmt: skip
    ak_verl.remove()
    with tempfile.TemporaryDirectory() as tmp, model_class_forward_restored():
        init_one_rank(tmp, device.type)
        path = os.path.join(tmp, "model")
        save_model(path, config, tied=False, seed=seed)
        if mode != "verl":
            ak_verl.apply()
        engine = build_engine(path, setup)
        def batch():  # a fresh TensorDict per step: the engine writes its bookkeeping into it
            return engine_batch([seq_len] * batch_size, vocab_size, seed, setup, prompt_len=seq_len // 2,
                                temperature=1.0)  # fmt: skip

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(warmup):
            train_step(engine, batch())
        sync()
        probe = CudaProbe(device) if device.type == "cuda" else CpuRssProbe()
        probe.start()
        times, loss = [], None
        for _ in range(steps):
            data = batch()
            sync()
            t0 = time.perf_counter()
            result = train_step(engine, data)
            sync()
            times.append(time.perf_counter() - t0)
            loss = float(torch.as_tensor(result["loss"]).sum()) if loss is None else loss
        peak = probe.peak()
        torch.distributed.destroy_process_group()
        ak_verl.remove()
    return dict(
        trainer="verl", mode=mode, device=str(device), dtype=setup.dtype, batch_size=batch_size, seq_len=seq_len,
        step_time_s=statistics.median(times), loss=loss, peak_memory_bytes=peak,
        memory_kind="peak allocated above the pre-step level" if device.type == "cuda" else
        "peak RSS above the pre-step level (VmHWM reset)",
    )  # fmt: skip
