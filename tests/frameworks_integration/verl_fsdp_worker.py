"""One rank of the 2-rank gloo checks in ``test_verl.py`` (``test_fsdp2_lm_head_own_unit_two_ranks``,
``test_linear_cross_entropy_tensor_parallel_two_ranks``; one spawn for both).

verl's fused forward (``verl.models.transformers.dense_common.forward_with_torch_backend``, installed as
the model's forward as verl does) on a tiny untied Qwen2 sharded with FSDP2 ``fully_shard``: each
decoder layer, the lm_head as its own unit, then the root. The lm_head weight reaches
``FusedLinearForPPO`` as a DTensor. Checks, written to ``rank<k>.json``:
- ``stock``: verl's own module on it raises (``mixed torch.Tensor and DTensor``);
- ``patched``: under ``alignkernels.integrations.verl.apply()`` each rank's loss equals the unsharded
  one-process loss on its batch, and every parameter's full gradient equals the gradient of the
  ranks' mean loss (FSDP2 averages), 1e-5;
- ``tensor_parallel``: verl's ``linear_cross_entropy`` (patched) with a 2-rank ``dist_process_group``, each
  rank passing its ``[V/2, H]`` shard (ids from ``rank x V/2``, verl's layout): per rank the log-probs and
  entropies of the global distribution, ``grad_weight`` the shard's rows of the full gradient, ``grad_hidden``
  the rank's term ``dz_k @ W_k`` (summed over the ranks: the full gradient), all vs fp64 eager, for
  ``reduction`` none / sum / mean and temperature 0.7; a label -100 gives 0 (logp and entropy) and no
  gradient, as the single-device seam does.
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


def _rel(got, want):
    return float((got.detach().double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def check_tensor_parallel(rank, world, measured):
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    import alignkernels.integrations.verl as ak_verl

    shard, H, T = 37, 16, 0.7
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, H, generator=g)
    weight = torch.randn(world * shard, H, generator=g) * 0.6
    labels = torch.randint(0, world * shard, (2, 9), generator=g)
    labels[0, :world] = torch.arange(world) * shard + shard - 1  # a label in every shard, at its last id
    labels[1, 3] = -100
    valid = (labels != -100).reshape(-1)
    g_logp, g_ent = torch.randn(18, generator=g), torch.randn(18, generator=g)
    # fp64 eager on the full weight: dz = d loss / d logits; grad_hidden = Σ_k dz_k @ W_k, grad_weight = dzᵀ h
    logits = (hidden.reshape(-1, H).double() @ weight.double().T / T).requires_grad_(True)
    logsm = torch.log_softmax(logits, -1)
    want_logp = torch.where(valid, logsm.gather(-1, labels.reshape(-1, 1).clamp(min=0)).squeeze(-1), 0.0)
    want_ent = torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0)  # an ignored row: 0, no gradient
    rows = slice(rank * shard, (rank + 1) * shard)
    with ak_verl.apply():
        assert verl_lce.linear_cross_entropy is ak_verl.linear_cross_entropy
        for reduction in ("none", "sum", "mean"):
            scale = {"none": g_logp, "sum": g_logp[0], "mean": g_logp[0] / 18}[reduction]
            logits.grad = None
            ((want_logp * scale).sum() + (want_ent * g_ent).sum()).backward(retain_graph=True)
            dz = logits.grad / T
            want_term, want_full = dz[:, rows] @ weight[rows].double(), dz @ weight.double()
            want_grad_w = dz[:, rows].T @ hidden.reshape(-1, H).double()
            h = hidden.clone().requires_grad_(True)
            w = weight[rows].clone().requires_grad_(True)
            logp, ent = verl_lce.linear_cross_entropy(h, w, labels, T, reduction, dist.group.WORLD)
            up = g_logp if reduction == "none" else g_logp[0]
            ((logp * up).sum() + (ent * g_ent).sum()).backward()
            want = {"none": want_logp, "sum": want_logp.sum(), "mean": want_logp.mean()}[reduction]
            assert logp.shape == want.shape and ent.shape == (18,) and h.grad.shape == h.shape
            total = h.grad.clone()
            dist.all_reduce(total)
            errors = {
                "logp": _rel(logp, want), "entropy": _rel(ent, want_ent),
                "grad_hidden_term": _rel(h.grad.reshape(-1, H), want_term),
                "grad_hidden_sum": _rel(total.reshape(-1, H), want_full), "grad_weight": _rel(w.grad, want_grad_w),
            }  # fmt: skip
            measured[reduction] = errors
            for name, err in errors.items():
                assert err <= 2e-6, f"reduction={reduction}: {name} {err:.2e} from fp64"
            if reduction == "none":
                ignored = (logp[~valid], ent[~valid], h.grad.reshape(-1, H)[~valid])
                assert all(bool((x == 0).all()) for x in ignored), "label -100: logp, entropy, grad_hidden 0"
                same = [torch.empty_like(logp) for _ in range(world)]
                dist.all_gather(same, logp.detach())
                assert all(torch.equal(x, same[0]) for x in same), "logp differs across ranks"
        assert ak_verl.adapter_calls() == 3


def main(rank, world, tmpdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    results, measured = {}, {}
    checks = (("stock", check_stock), ("patched", check_patched),
              ("tensor_parallel", functools.partial(check_tensor_parallel, measured=measured)))  # fmt: skip
    try:
        for name, fn in checks:
            try:
                fn(rank, world)
                results[name] = {"ok": True}
            except Exception:  # reported by the pytest side
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        results["measured"] = measured  # errors from fp64 of the tensor-parallel check, per reduction
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
