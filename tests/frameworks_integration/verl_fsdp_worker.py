"""One rank of the 2-rank gloo check in ``test_verl.py::test_fsdp2_lm_head_own_unit_two_ranks``.

verl's fused forward (``verl.models.transformers.dense_common.forward_with_torch_backend``, installed as
the model's forward as verl does) on a tiny untied Qwen2 sharded with FSDP2 ``fully_shard``: each
decoder layer, the lm_head as its own unit, then the root. The lm_head weight reaches
``FusedLinearForPPO`` as a DTensor. Checks, written to ``rank<k>.json``:
- ``stock``: verl's own module on it raises (``mixed torch.Tensor and DTensor``);
- ``patched``: under ``alignkernels.integrations.verl.apply()`` each rank's loss equals the unsharded
  one-process loss on its batch, and every parameter's full gradient equals the gradient of the
  ranks' mean loss (FSDP2 averages), 1e-5.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

VOCAB = 101
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_model():
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    from verl.models.transformers.dense_common import forward_with_torch_backend

    model.forward = functools.partial(forward_with_torch_backend, model)  # verl patches the class's forward
    return model


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(input_ids)
    mask[:, : 2 + rank] = 0  # left padding, different per rank
    return input_ids, mask


def loss_of(model, rank):
    input_ids, mask = batch(rank)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, return_dict=True, temperature=0.8)
    m = mask.float()
    return -(out.log_probs * m).sum() / m.sum() - 0.01 * (out.entropy * m).sum() / m.sum()


def sharded(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_stock(rank, world):
    model = sharded(world)
    try:
        loss_of(model, rank)
    except Exception as e:  # noqa: BLE001 - the failure verl has upstream
        assert "DTensor" in str(e), str(e)
        return
    raise AssertionError("verl's stock FusedLinearForPPO ran on a DTensor lm_head (expected its mixed-tensor error)")


def check_patched(rank, world):
    from torch.distributed.tensor import DTensor

    import alignkernels.integrations.verl as ak_verl

    reference = tiny_model()
    losses = []
    for r in range(world):
        loss = loss_of(reference, r)
        (loss / world).backward()
        losses.append(loss.detach())
    want = {n: p.grad for n, p in reference.named_parameters()}
    with ak_verl.apply():
        model = sharded(world)
        assert isinstance(model.lm_head.weight, DTensor)
        loss = loss_of(model, rank)
        loss.backward()
        assert ak_verl.adapter_calls() == 1
    torch.testing.assert_close(loss.detach(), losses[rank], **TOL)
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(grad, want[name], msg=lambda m: f"{name}: {m}", **TOL)


def main(rank, world, tmpdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    results = {}
    try:
        for name, fn in (("stock", check_stock), ("patched", check_patched)):
            try:
                fn(rank, world)
                results[name] = {"ok": True}
            except Exception:  # reported by the pytest side
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
