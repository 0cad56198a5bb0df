"""One rank of the sharded-parameter drop-in tests (``test_sharded.py`` starts ``world`` of these per
mode; gloo on CPU): ``fsdp2`` (``torch.distributed.fsdp.fully_shard``) or ``zero3`` (DeepSpeed ZeRO-3).

Every rank builds the same tiny Qwen2 from one seed and its own batch (data parallel). The
single-process reference is stock TRL's fused head on the unsharded model: the loss of each
rank's batch and the gradient of their mean (FSDP2 averages gradients over ranks). The FSDP2 run
shards the model with ``torch.distributed.fsdp.fully_shard`` (parameters are DTensors at rest), the
ZeRO-3 run with ``deepspeed.initialize`` (parameters partitioned to ``numel() == 0`` at rest); both
run TRL's fused forward after ``alignkernels.integrations.trl.apply()`` (or ``patch_causal_lm``'s
``return_token_logprobs=True``) and compares its loss and the full gradients with the reference.
Each check's outcome is written to ``rank{r}.json``; the pytest side asserts on it.

    python sharded_worker.py MODE RANK WORLD TMPDIR
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 128


def tiny_model(seed=0, **overrides):
    import transformers

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # a peakier softmax than random init gives
    return model


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[:, : 3 + rank] = -100  # prompts of different lengths per rank: different token counts
    return input_ids, labels


def sft_loss(model, input_ids, labels, path):
    if path in ("trl", "stock"):  # TRL's fused forward (add_fused_lm_head), as SFT/DPO/GRPO trainers call it
        return model(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
    return model(input_ids, labels=labels, return_token_logprobs=True).loss  # patch_causal_lm


def reference(world, **model_kwargs):
    """Stock TRL fused head, unsharded, one process: per-rank losses and the mean-loss gradients."""
    from trl.trainer.utils import add_fused_lm_head

    import alignkernels.integrations.trl as ak_trl

    assert not ak_trl.is_applied()
    model = tiny_model(**model_kwargs)
    add_fused_lm_head(model)
    losses = []
    for r in range(world):
        loss = sft_loss(model, *batch(r), "trl")
        (loss / world).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def fsdp2_run(rank, world, path, shard_lm_head_separately, **model_kwargs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from trl.trainer import utils as trl_utils

    import alignkernels.integrations.trl as ak_trl
    from alignkernels.integrations.transformers import patch_causal_lm

    model = tiny_model(**model_kwargs)
    if path in ("trl", "stock"):
        if path == "trl":
            ak_trl.apply()
        trl_utils.add_fused_lm_head(model)  # looked up now: apply() rebinds it, as in TRL's trainer modules
    else:
        patch_causal_lm(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if shard_lm_head_separately:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model.lm_head.weight, DTensor), type(model.lm_head.weight)
    calls = ak_trl.adapter_calls()
    loss = sft_loss(model, *batch(rank), path)
    loss.backward()
    if path == "trl":
        assert ak_trl.adapter_calls() > calls, "TRL's fused forward did not call the adapter"
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
    "zero_allow_untested_optimizer": True,
}


def zero3_run(rank, world, path, **model_kwargs):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig
    from trl.trainer import utils as trl_utils

    import alignkernels.integrations.trl as ak_trl
    from alignkernels.integrations.transformers import patch_causal_lm

    hf_ds_config = HfDeepSpeedConfig(ZERO3_CONFIG)  # noqa: F841 - keeps is_deepspeed_zero3_enabled() on
    model = tiny_model(**model_kwargs)
    if path == "trl":
        ak_trl.apply()
        trl_utils.add_fused_lm_head(model)
    else:
        patch_causal_lm(model)
    engine, *_ = deepspeed.initialize(model=model, config=ZERO3_CONFIG, model_parameters=list(model.parameters()))
    head = engine.module.lm_head.weight
    assert hasattr(head, "ds_shape") and head.numel() == 0, "the lm_head is not ZeRO-3 partitioned"
    calls = ak_trl.adapter_calls()
    loss = sft_loss(engine, *batch(rank), path)
    engine.backward(loss)
    if path == "trl":
        assert ak_trl.adapter_calls() > calls, "TRL's fused forward did not call the adapter"
    return loss.detach(), {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}


def check(rank, world, path, shard_lm_head_separately=False, zero3=False, **model_kwargs):
    import alignkernels.integrations.trl as ak_trl

    ak_trl.remove()
    try:
        want_losses, want_grads = reference(world, **model_kwargs)
        if zero3:
            loss, grads = zero3_run(rank, world, path, **model_kwargs)
        else:
            loss, grads = fsdp2_run(rank, world, path, shard_lm_head_separately, **model_kwargs)
    finally:
        ak_trl.remove()
    torch.testing.assert_close(loss, want_losses[rank], **TOL)
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(grad, want_grads[name], msg=lambda m: f"{name}: {m}", **TOL)
    assert grads["lm_head.weight"].abs().sum() > 0


ZERO3_CHECKS = {
    "trl_fused_head": lambda r, w: check(r, w, "trl", zero3=True),
    "patch_causal_lm": lambda r, w: check(r, w, "patch", zero3=True),
}
FSDP2_CHECKS = {
    "stock_trl_lm_head_own_unit": lambda r, w: check(r, w, "stock", shard_lm_head_separately=True),
    "trl_fused_head": lambda r, w: check(r, w, "trl"),
    "trl_fused_head_lm_head_own_unit": lambda r, w: check(r, w, "trl", shard_lm_head_separately=True),
    "patch_causal_lm": lambda r, w: check(r, w, "patch"),
    "patch_causal_lm_lm_head_own_unit": lambda r, w: check(r, w, "patch", shard_lm_head_separately=True),
}


def main(mode, rank, world, tmpdir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )  # fmt: skip
    checks = FSDP2_CHECKS
    if mode == "zero3":
        import deepspeed

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group above
        checks = ZERO3_CHECKS
    results = {}
    try:
        for name, fn in checks.items():
            t0 = time.perf_counter()
            try:
                fn(rank, world)
                results[name] = {"ok": True}
            except Exception:  # reported by the pytest side
                results[name] = {"ok": False, "error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
