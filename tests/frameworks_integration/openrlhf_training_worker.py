"""OpenRLHF 0.11.2's ``ActorPPOTrainer.training_step`` for a few steps on CPU, stock and patched, in a
process of its own (the stand-ins of ``openrlhf_stand_ins.py`` and the patches stay out of pytest's).

    python openrlhf_training_worker.py OUT.pt CONFIG

For the configuration ``CONFIG`` (a key of :data:`CONFIGS`), runs the same 3 steps three times from
the same initial weights — ``stock``, ``swap`` (``alignkernels.integrations.openrlhf.apply()``) and
``fused`` (``apply(fused_forward=True)``) — and saves per run: the metrics each step returns
(policy / entropy / KL loss, gradient norm), the action log-probs and entropy the actor's forward
gave at each step (a forward hook on the ``Actor``), the final parameters, and
``adapter_calls()``. Configurations with ``zero_stage`` wrap the model in a real ``DeepSpeedEngine``
(one gloo rank) and step through OpenRLHF's own strategy methods (``EngineStrategy``). Then one step
at N = 160 tokens, stock and fused, under a dispatch mode that
records every ``[>= N/4, V]`` tensor (``token_by_vocab``).
``tests/frameworks_integration/test_openrlhf_training.py`` compares them.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).parent))
from openrlhf_stand_ins import CPUStrategy, EngineStrategy, import_ppo_actor, ppo_args  # noqa: E402

STEPS = 3
B, PROMPT, RESPONSE, V = 3, 6, 5, 97


class Config(NamedTuple):
    model_type: str  # "qwen2" or "llama"
    tie_word_embeddings: bool
    temperature: float
    entropy_coef: float | None  # None: OpenRLHF does not ask the forward for the entropy
    kl_use_loss: bool
    loss_agg_mode: str
    zero_stage: int | None = None  # a DeepSpeed engine around the model (one gloo rank), as OpenRLHF's strategy


CONFIGS = {
    "qwen2_untied_entropy_kl": Config("qwen2", False, 0.7, 0.01, True, "token-mean"),
    "qwen2_deepspeed_zero2": Config("qwen2", False, 0.7, 0.01, True, "token-mean", zero_stage=2),
    "llama_tied_no_entropy_zero3": Config("llama", True, 1.0, None, False, "seq-mean-token-mean", zero_stage=3),
}


def _model(config: Config):
    import transformers

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa")  # fmt: skip
    hf_config = (transformers.Qwen2Config if config.model_type == "qwen2" else transformers.LlamaConfig)(**common)
    torch.manual_seed(0)
    model_class = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
    return model_class(hf_config).float()


def _experiences(actor, steps=STEPS, batch=B, prompt=PROMPT, response=RESPONSE):
    """One batch per step: left-padded prompts, responses that end early (masked tail), old /
    reference log-probs near the initial policy's (so the PPO clip and the KL term are active)."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    out = []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sequences = torch.randint(0, V, (batch, prompt + response), generator=g)
        attention_mask = torch.ones_like(sequences)
        attention_mask[0, :2] = 0  # left padding
        action_mask = torch.ones(batch, response, dtype=torch.bool)
        action_mask[1, -2:] = False  # a response that ended early
        attention_mask[1, -2:] = 0
        with torch.no_grad():
            logp = actor(sequences, action_mask, attention_mask)
        out.append(Experience(
            sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
            action_log_probs=logp + 0.3 * torch.randn(logp.shape, generator=g),
            base_action_log_probs=logp + 0.2 * torch.randn(logp.shape, generator=g),
            advantages=torch.randn(batch, response, generator=g),
        ))  # fmt: skip
    return out


class TokenByVocab(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor an ATen op returns (forward, backward, optimizer step) that has the
    vocabulary as a dimension and at least ``rows`` rows' worth of elements: a ``[rows, V]`` tile."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and V in t.shape and t.numel() // V >= self.rows:
                self.found.append((str(func), tuple(t.shape)))
        return out


def _watch(ppo_actor, config: Config, options) -> list:
    """One training step at N = 4 x 40 tokens (under ``apply(**options)`` unless ``None``) under
    :class:`TokenByVocab` with rows = N / 4 (more than H = 32, so the ``[V, H]`` head and its gradient
    do not count)."""
    import alignkernels.integrations.openrlhf as ak_openrlhf

    actor = ppo_actor.Actor(_model(config), temperature=config.temperature)
    actor.packing_samples = False
    (experience,) = _experiences(actor, steps=1, batch=4, prompt=20, response=20)
    watch = TokenByVocab(rows=4 * 40 // 4)
    with contextlib.ExitStack() as stack:
        if options is not None:
            stack.enter_context(ak_openrlhf.apply(**options))
        _run(ppo_actor, config, [experience], watch=watch)
    return watch.found


def _parameters(actor) -> dict:
    """Every parameter, whole (ZeRO-3 partitions them: gathered for the copy)."""
    params = list(actor.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in actor.named_parameters()}
    return {n: p.detach().clone() for n, p in actor.named_parameters()}


def _run(ppo_actor, config: Config, experiences, watch=None):
    args = ppo_args(entropy_coef=config.entropy_coef, kl_use_loss=config.kl_use_loss, kl_init_coef=0.05,
                    kl_estimator="k3", loss_agg_mode=config.loss_agg_mode)  # fmt: skip
    strategy = CPUStrategy(args)
    actor = ppo_actor.Actor(_model(config), temperature=config.temperature)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads the model itself
    # SGD, not DeepSpeed's Adam: Adam's normalisation turns a gradient that is zero in exact arithmetic
    # (the k_proj bias: softmax is shift invariant) into a full +-lr step of its rounding noise, so the
    # parameters would compare noise, not the gradients (seen: 1.5e-4 apart after 3 AdamW steps)
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.zero_stage is not None:  # as DeepspeedStrategy._ds_init_train_model: actor.model = the engine
        import deepspeed

        strategy = EngineStrategy(args)
        ds_config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": config.zero_stage}, "zero_allow_untested_optimizer": True}  # fmt: skip
        actor.model, optimizer, _, _ = deepspeed.initialize(model=actor.model, optimizer=optimizer, config=ds_config)
    initial = _parameters(actor)
    trainer = ppo_actor.ActorPPOTrainer(strategy, actor, None, optimizer, scheduler, micro_train_batch_size=B)
    forwards = []
    actor.register_forward_hook(lambda module, inputs, output: forwards.append(output))
    steps = []
    for step, experience in enumerate(copy.deepcopy(experiences)):
        with watch or contextlib.nullcontext():
            status = trainer.training_step(experience, kl_ctl=0.05, step=step)
        (logp, output), = forwards[-1:]  # fmt: skip
        metrics = {k: float(v) for k, v in status["metrics"].items()
                   if k in ("policy_loss", "entropy_loss", "kl", "actor_grad_norm", "ppo_kl", "ppo_clip_ratio")}  # fmt: skip
        entropy = getattr(output, "entropy", None)
        steps.append({"metrics": metrics, "logp": logp.detach().clone(),
                      "entropy": None if entropy is None else entropy.detach().clone()})  # fmt: skip
    assert len(forwards) == len(experiences), len(forwards)
    return {"steps": steps, "initial": initial, "params": _parameters(actor)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out_path: str, config_name: str) -> None:
    import alignkernels.integrations.openrlhf as ak_openrlhf

    config = CONFIGS[config_name]
    if config.zero_stage is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    ppo_actor = import_ppo_actor()
    actor = ppo_actor.Actor(_model(config), temperature=config.temperature)
    actor.packing_samples = False
    experiences = _experiences(actor)
    results = {"stock": _run(ppo_actor, config, experiences)}
    for name, options in (("swap", {}), ("fused", {"fused_forward": True})):
        with ak_openrlhf.apply(**options):
            results[name] = _run(ppo_actor, config, experiences)
            results[name]["adapter_calls"] = ak_openrlhf.adapter_calls()
            results[name]["forward_is_fused"] = ppo_actor.Actor.forward is ak_openrlhf.fused_actor_forward
    results["config"] = config._asdict()
    results["token_by_vocab"] = {"stock": _watch(ppo_actor, config, None),
                                 "fused": _watch(ppo_actor, config, {"fused_forward": True, "chunk_size": 16})}  # fmt: skip
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
