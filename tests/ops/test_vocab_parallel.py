"""Vocab-parallel log-probs on torch.distributed (gloo, CPU, several processes on one machine).

One ``torch.multiprocessing`` spawn per world size runs every check (spawning is the slow part);
each rank records pass/fail per check and the pytest functions below assert on the records.
Every check compares against the single-process op on the full (concatenated) tensors, which
each rank also computes from the same seed.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch

# Uneven vocabulary slices (V = 103, not a power of two) for each world size
SHARD_BOUNDS = {2: [0, 40, 103], 4: [0, 17, 50, 71, 103]}
V = 103
FP32 = dict(rtol=2e-5, atol=2e-5)
SPAWN_TIMEOUT_S = 600  # one spawn per world size runs every check (~60 s on an idle 2-core machine)


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
def _labels_in_every_shard(shape, bounds, ignore_index, gen):
    """Random global labels with each shard's first and last id present and a few ignored rows."""
    labels = torch.randint(0, bounds[-1], shape, generator=gen)
    flat = labels.view(-1)
    special = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        special += [a, b - 1]
    flat[: len(special)] = torch.tensor(special)
    flat[len(special)] = ignore_index
    flat[-1] = ignore_index
    return labels


def _shard(bounds, rank):
    return bounds[rank], bounds[rank + 1] - bounds[rank]


def _close(name, got, want, **tol):
    torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}", **(tol or FP32))


def check_token_logprobs(rank, world, group=None, bounds=None, backend="torch", dtype=torch.float32,
                         ignore_index=-100, strided=False, with_entropy=True, shape=(3, 7)):  # fmt: skip
    import alignkernels
    from alignkernels.ops.vocab_parallel import vocab_parallel_token_logprobs

    bounds = bounds or SHARD_BOUNDS[world]
    gen = torch.Generator().manual_seed(1234)
    full = (torch.randn(*shape[:-1], shape[-1] + int(strided), bounds[-1], generator=gen) * 3).to(dtype)
    if strided:
        full = full[..., :-1, :]  # logits[:, :-1]: leading dims strided
    labels = _labels_in_every_shard(full.shape[:-1], bounds, ignore_index, gen)
    g_logp = torch.randn(labels.shape, generator=gen, dtype=dtype)
    g_ent = torch.randn(labels.shape, generator=gen, dtype=dtype)
    temperature = 0.7
    kw = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=with_entropy)

    ref_logits = full.clone().requires_grad_(True)
    ref = alignkernels.token_logprobs(ref_logits, labels, backend="torch", **kw)
    ref = ref if with_entropy else (ref,)
    loss = (ref[0] * g_logp).sum() + ((ref[1] * g_ent).sum() if with_entropy else 0)
    loss.backward()

    rank_in_group = torch.distributed.get_rank(group)
    start, size = _shard(bounds, rank_in_group)
    if strided:  # keep the strided leading layout: the shard is a slice of a padded parent
        parent = torch.zeros(*shape[:-1], shape[-1] + 1, size, dtype=dtype)
        parent[..., :-1, :] = full[..., start : start + size]
        parent.requires_grad_(True)
        shard = parent[..., :-1, :]
    else:
        parent = shard = full[..., start : start + size].detach().requires_grad_(True)
    got = vocab_parallel_token_logprobs(shard, labels, vocab_start=start, vocab_size=bounds[-1], process_group=group,
                                        backend=backend, **kw)  # fmt: skip
    got = got if with_entropy else (got,)
    loss = (got[0] * g_logp).sum() + ((got[1] * g_ent).sum() if with_entropy else 0)
    loss.backward()
    tol = FP32 if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)
    _close("logp", got[0], ref[0].detach(), **tol)
    if with_entropy:
        _close("entropy", got[1], ref[1].detach(), **tol)
    ignored = labels == ignore_index
    assert bool((got[0][ignored] == 0).all()), "ignored rows must give logp 0"
    assert torch.isfinite(got[0]).all()
    grad = parent.grad[..., :-1, :] if strided else parent.grad
    _close("grad_logits", grad, ref_logits.grad[..., start : start + size], **tol)
    assert bool((grad[ignored] == 0).all()), "ignored rows must get zero gradient"


def check_linear_logprobs(rank, world, group=None, bounds=None, backend="torch", with_bias=True, softcap=30.0,
                          with_entropy=True, shape=(2, 9), H=16, only_logp_grad=False):  # fmt: skip
    import alignkernels
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs

    bounds = bounds or SHARD_BOUNDS[world]
    gen = torch.Generator().manual_seed(99)
    hidden = torch.randn(*shape, H, generator=gen)
    weight = torch.randn(bounds[-1], H, generator=gen) * 0.5
    bias = torch.randn(bounds[-1], generator=gen) if with_bias else None
    labels = _labels_in_every_shard(shape, bounds, -100, gen)
    g_logp = torch.randn(shape, generator=gen)
    g_ent = torch.zeros(shape) if only_logp_grad else torch.randn(shape, generator=gen)
    kw = dict(temperature=0.8, logit_scale=1.3, softcap=softcap, return_entropy=with_entropy, chunk_size=5,
              vocab_block_size=16)  # fmt: skip

    def run(fn, h, w, b, **extra):
        out = fn(h, w, labels, **extra, **kw)
        out = out if with_entropy else (out,)
        loss = (out[0] * g_logp).sum() + ((out[1] * g_ent).sum() if with_entropy else 0)
        loss.backward()
        return [o.detach() for o in out]

    h_ref = hidden.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    b_ref = bias.clone().requires_grad_(True) if with_bias else None
    ref = run(alignkernels.linear_logprobs, h_ref, w_ref, None, bias=b_ref, backend="torch")

    start, size = _shard(bounds, torch.distributed.get_rank(group))
    h = hidden.clone().requires_grad_(True)
    w = weight[start : start + size].clone().requires_grad_(True)
    b = bias[start : start + size].clone().requires_grad_(True) if with_bias else None
    got = run(vocab_parallel_linear_logprobs, h, w, None, bias_shard=b, vocab_start=start, vocab_size=bounds[-1],
              process_group=group, backend=backend)  # fmt: skip
    _close("logp", got[0], ref[0])
    if with_entropy:
        _close("entropy", got[1], ref[1])
    assert bool((got[0][labels == -100] == 0).all())
    _close("grad_hidden", h.grad, h_ref.grad)
    _close("grad_weight", w.grad, w_ref.grad[start : start + size])
    if with_bias:
        _close("grad_bias", b.grad, b_ref.grad[start : start + size])


def check_linear_lora(rank, world, backend="torch", shape=(2, 7), H=8, r=3):
    """LoRA on a column-parallel head: lora_A replicated, lora_B sharded like the weight (frozen)."""
    import alignkernels
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs

    bounds = SHARD_BOUNDS[world]
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(*shape, H, generator=gen)
    weight = torch.randn(bounds[-1], H, generator=gen) * 0.5
    lora_A, lora_B = torch.randn(r, H, generator=gen) * 0.5, torch.randn(bounds[-1], r, generator=gen) * 0.5
    labels = _labels_in_every_shard(shape, bounds, -100, gen)
    g_logp, g_ent = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    kw = dict(temperature=0.9, softcap=20.0, return_entropy=True, chunk_size=4, vocab_block_size=16, backend=backend)

    def run(fn, h, w, a, b, **extra):
        logp, ent = fn(h, w, labels, lora=(a, b, 1.5), **extra, **kw)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp.detach(), ent.detach()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, lora_A, lora_B)]
    ref = run(alignkernels.linear_logprobs, leaves[0], weight, leaves[1], leaves[2])
    start, size = _shard(bounds, torch.distributed.get_rank())
    h, a, b = (t.clone().requires_grad_(True) for t in (hidden, lora_A, lora_B[start : start + size]))
    got = run(vocab_parallel_linear_logprobs, h, weight[start : start + size], a, b, vocab_start=start,
              vocab_size=bounds[-1])  # fmt: skip
    _close("logp", got[0], ref[0])
    _close("entropy", got[1], ref[1])
    _close("grad_hidden", h.grad, leaves[0].grad)
    _close("grad_lora_A (all-reduced)", a.grad, leaves[1].grad)
    _close("grad_lora_B (local shard)", b.grad, leaves[2].grad[start : start + size])
    # an adapter on one rank only would leave the grad_lora_A all-reduce half-joined: every rank refuses
    one_sided = (a, b, 1.5) if torch.distributed.get_rank() == 0 else None
    _expect_error(lambda: vocab_parallel_linear_logprobs(h, weight[start : start + size], labels, vocab_start=start,
                                                         vocab_size=bounds[-1], lora=one_sided),
                  "lora= / lora_A.requires_grad")  # fmt: skip


def check_linear_grad_hidden_partial(rank, world, shape=(2, 9), H=16):
    """``grad_hidden="partial"``: the same logp / entropy / grad_weight as fp64, and ``hidden`` gets this
    rank's term ``dz_k @ W_k`` of the fp64 gradient (the ranks' terms sum to the full one), on the default
    and the batch-invariant plans; a bad value or a choice that differs across ranks is refused by name."""
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs
    from alignkernels.reference import token_logprobs_reference

    bounds = SHARD_BOUNDS[world]
    gen = torch.Generator().manual_seed(31)
    hidden = torch.randn(*shape, H, generator=gen)
    weight = torch.randn(bounds[-1], H, generator=gen) * 0.5
    labels = _labels_in_every_shard(shape, bounds, -100, gen)
    g_logp, g_ent = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    # fp64: dz = d loss / d logits, then grad_hidden = dz @ W = Σ_k dz_k @ W_k and grad_weight = dzᵀ h
    logits = (hidden.double() @ weight.double().T).requires_grad_(True)
    want_logp, want_ent = token_logprobs_reference(logits, labels, temperature=0.7, return_entropy=True)
    ((want_logp * g_logp).sum() + (want_ent * g_ent).sum()).backward()
    start, size = _shard(bounds, rank)
    dz_k, w_k = logits.grad[..., start : start + size], weight.double()[start : start + size]
    want_term, want_full = dz_k @ w_k, logits.grad @ weight.double()
    want_grad_w = dz_k.reshape(-1, size).T @ hidden.double().reshape(-1, H)
    tol = dict(rtol=2e-6, atol=2e-6)
    for batch_invariant in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight[start : start + size].clone().requires_grad_(True)
        logp, ent = vocab_parallel_linear_logprobs(h, w, labels, vocab_start=start, vocab_size=bounds[-1], temperature=0.7,
                                                   return_entropy=True, chunk_size=5, vocab_block_size=16,
                                                   batch_invariant=batch_invariant, grad_hidden="partial")  # fmt: skip
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        _close(f"logp (batch_invariant={batch_invariant})", logp.double(), want_logp.detach(), **tol)
        _close(f"entropy (batch_invariant={batch_invariant})", ent.double(), want_ent.detach(), **tol)
        _close(f"grad_hidden term (batch_invariant={batch_invariant})", h.grad.double(), want_term, **tol)
        _close(f"grad_weight (batch_invariant={batch_invariant})", w.grad.double(), want_grad_w, **tol)
        total = h.grad.clone()
        torch.distributed.all_reduce(total)
        _close(f"Σ_k grad_hidden terms (batch_invariant={batch_invariant})", total.double(), want_full, **tol)
    w = weight[start : start + size]
    for bad, match in (("full", r"grad_hidden must be one of \('reduced', 'partial'\), got 'full'"),
                       (True, r"grad_hidden must be one of .* \(a str\), got True")):  # fmt: skip
        _expect_error(lambda: vocab_parallel_linear_logprobs(hidden, w, labels, vocab_start=start, vocab_size=bounds[-1],
                                                             grad_hidden=bad), match)  # fmt: skip
    # one rank partial, the others reduced: the reduced ranks would wait in the backward's all-reduce
    mixed = "partial" if rank == 0 else "reduced"
    _expect_error(lambda: vocab_parallel_linear_logprobs(hidden.clone().requires_grad_(True), w, labels, vocab_start=start,
                                                         vocab_size=bounds[-1], grad_hidden=mixed),
                  r"requires_grad / grad_hidden= does")  # fmt: skip


def _expect_error(fn, match):
    import re

    try:
        fn()
    except (ValueError, TypeError) as exc:
        assert re.search(match, str(exc)), f"error {exc!r} does not match {match!r}"
        return
    raise AssertionError(f"no ValueError/TypeError raised (expected one matching {match!r})")


def check_head_precision(rank, world, shape=(2, 7), H=16):
    """``head_precision`` on the vocab-parallel op: fp16 shards, every mode, against fp64 eager on the
    upcast operands (the numbers of an fp32 lm-head); a bad value is refused by name on every rank."""
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs

    bounds = SHARD_BOUNDS[world]
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(*shape, H, generator=gen).half()
    weight = (torch.randn(bounds[-1], H, generator=gen) * 0.5).half()
    labels = _labels_in_every_shard(shape, bounds, -100, gen)
    logsm = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    valid = labels != -100
    want_logp = torch.where(valid, logsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    want_entropy = torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0)
    start, size = _shard(bounds, rank)
    for precision in ("input", "fp32", "tf32"):
        logp, entropy = vocab_parallel_linear_logprobs(
            hidden, weight[start:start + size], labels, vocab_start=start, vocab_size=bounds[-1], return_entropy=True,
            chunk_size=4, vocab_block_size=16, head_precision=precision)  # fmt: skip
        assert logp.dtype == torch.float32
        _close(f"logp {precision}", logp.double(), want_logp, rtol=2e-6, atol=2e-6)
        _close(f"entropy {precision}", entropy.double(), want_entropy, rtol=2e-6, atol=2e-6)
    _expect_error(lambda: vocab_parallel_linear_logprobs(hidden, weight[start:start + size], labels, vocab_start=start,
                                                         vocab_size=bounds[-1], head_precision="fp16"),
                  "head_precision must be one of")  # fmt: skip


def check_inconsistent_shards(rank, world):
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    bounds = SHARD_BOUNDS[world]
    start, size = _shard(bounds, rank)
    labels = torch.arange(6) % V
    logits = torch.randn(6, size)

    def call(lg=logits, lb=labels, vs=start, vocab=V):
        return vocab_parallel_token_logprobs(lg, lb, vocab_start=vs, vocab_size=vocab)

    call()  # consistent layout works
    # a gap: the last rank's slice starts one id late
    last = rank == world - 1
    _expect_error(lambda: call(vs=start + 1 if last else start, lg=logits[:, :-1] if last else logits),
                  r"do not tile.*uncovered")  # fmt: skip
    # an overlap: rank 1 starts one id early (its slice still inside [0, V))
    _expect_error(lambda: call(vs=start - 1 if rank == 1 else start), r"do not tile.*overlaps")
    # shards that stop short of V
    _expect_error(lambda: call(vocab=V + 5), r"do not tile.*end at 103")
    # different N across ranks
    _expect_error(lambda: call(lg=logits[: 6 - (rank == 0)], lb=labels[: 6 - (rank == 0)]), r"same tokens")
    # labels differ across ranks
    _expect_error(lambda: call(lb=(labels + rank) % V), r"labels differ")
    # one rank's bad input: it raises its own error, every other rank a clear one (no hang)
    bad = rank == world - 1
    if bad:
        _expect_error(lambda: call(lg=logits.long()), r"logits_shard must be a floating")
    else:
        _expect_error(call, r"rank\(s\) \[%d\].*rejected" % (world - 1))
    # a label outside the global vocabulary: every rank raises the range error
    _expect_error(lambda: call(lb=torch.full((6,), V)), r"labels must be in \[0, 103\)")
    # the linear form: different hidden.requires_grad
    h = torch.randn(6, 4).requires_grad_(rank == 0)
    w = torch.randn(size, 4)
    _expect_error(lambda: vocab_parallel_linear_logprobs(h, w, labels, vocab_start=start, vocab_size=V),
                  r"requires_grad differs")  # fmt: skip
    # and the group still works afterwards (no collective left dangling)
    call()


def check_data_parallel_grpo(rank, world):
    """DDP over ``world`` ranks of the fused GRPO loss (dapo, num_items_in_batch = global token
    count) equals the single-process loss and gradients on the concatenated batch."""
    import alignkernels
    from torch.nn.parallel import DistributedDataParallel

    gen = torch.Generator().manual_seed(7)
    B, T, H, vocab = 2 * world, 6, 8, 37
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(vocab, H, generator=gen) * 0.5
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).long()
    mask[0, :] = 0  # a fully masked completion
    mask[-1, :] = 1  # ranks hold different token counts
    adv = torch.randn(B, generator=gen)
    old_logp = -torch.rand(B, T, generator=gen) * 3
    n_items = int(mask.sum())
    kw = dict(old_logp=old_logp, loss_type="dapo", num_items_in_batch=n_items, epsilon_low=0.2, epsilon_high=0.28,
              backend="torch")  # fmt: skip

    w_ref = weight.clone().requires_grad_(True)
    h_ref = hidden.clone().requires_grad_(True)
    ref_loss, _ = alignkernels.fused_linear_grpo_loss(h_ref, w_ref, ids, adv, mask, **kw)
    ref_loss.backward()

    rows = slice(rank * B // world, (rank + 1) * B // world)
    local = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in kw.items()}

    # (a) TRL's convention: normaliser num_items_in_batch / num_processes, DDP averages gradients
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight.clone())

        def forward(self, h, i, a, m):
            return alignkernels.fused_linear_grpo_loss(h, self.weight, i, a, m, num_processes=world, **local)[0]

    ddp = DistributedDataParallel(Head())
    loss = ddp(hidden[rows], ids[rows], adv[rows], mask[rows])
    loss.backward()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    mean_loss /= world
    _close("ddp mean loss", mean_loss, ref_loss.detach())
    _close("ddp grad_weight", ddp.module.weight.grad, w_ref.grad)

    # (b) plain torch.distributed: per-rank loss with num_processes=1, gradients all-reduced (summed)
    w = weight.clone().requires_grad_(True)
    h = hidden[rows].clone().requires_grad_(True)
    loss, _ = alignkernels.fused_linear_grpo_loss(h, w, ids[rows], adv[rows], mask[rows], **local)
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(w.grad)
    _close("summed loss", total, ref_loss.detach())
    _close("summed grad_weight", w.grad, w_ref.grad)
    _close("grad_hidden (local rows)", h.grad, h_ref.grad[rows])


def check_tp_dp_subgroups(rank, world):
    """4 ranks as 2 tensor-parallel groups x 2 data-parallel replicas: each TP group shards the
    vocabulary of its own batch, through ``process_group``."""
    assert world == 4
    groups = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    group = groups[rank // 2]
    bounds = [0, 61, 103]
    check_linear_logprobs(rank, world, group=group, bounds=bounds, shape=(3, 4))
    check_token_logprobs(rank, world, group=group, bounds=bounds, shape=(2, 5))


def check_fsdp2_dtensor_head(rank, world):
    """An lm_head held as a DTensor (FSDP2's Shard(0) parameter), gathered once by gather_lm_head,
    gives the plain-tensor result, and the gradient reaches the sharded parameter reduced as asked:
    averaged / summed over data-parallel ranks, or kept local when every rank has the same data."""
    import alignkernels
    from alignkernels.ops.vocab_parallel import gather_lm_head
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(V, 8, generator=gen)
    bias = torch.randn(V, generator=gen)
    batches = [(torch.randn(10, 8, generator=gen), torch.randint(0, V, (10,), generator=gen)) for _ in range(world)]
    kw = dict(backend="torch", chunk_size=4, vocab_block_size=16)

    refs = []
    for hidden, labels in batches:
        w_ref, b_ref = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        logp = alignkernels.linear_logprobs(hidden, w_ref, labels, bias=b_ref, **kw)
        logp.sum().backward()
        refs.append((logp.detach(), w_ref.grad, b_ref.grad))

    for mode, own_batch in (("avg", rank), ("sum", rank), (None, 0)):
        w_dt = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))
        b_dt = torch.nn.Parameter(distribute_tensor(bias.clone(), mesh, [Shard(0)]))
        w_full, b_full = gather_lm_head(w_dt, b_dt, grad_reduce=mode)
        assert not isinstance(w_full, DTensor) and not isinstance(b_full, DTensor)
        hidden, labels = batches[own_batch]
        logp = alignkernels.linear_logprobs(hidden, w_full, labels, bias=b_full, **kw)
        logp.sum().backward()
        _close(f"logp ({mode})", logp.detach(), refs[own_batch][0])
        assert isinstance(w_dt.grad, DTensor)
        if mode is None:
            want_w, want_b = refs[0][1], refs[0][2]
        else:
            want_w, want_b = sum(r[1] for r in refs), sum(r[2] for r in refs)
            if mode == "avg":
                want_w, want_b = want_w / world, want_b / world
        _close(f"grad_weight ({mode})", w_dt.grad.full_tensor(), want_w)
        _close(f"grad_bias ({mode})", b_dt.grad.full_tensor(), want_b)
    plain = torch.randn(3, 2)
    assert gather_lm_head(plain)[0] is plain


def check_communication_volume(rank, world):
    """What crosses the wire, counted at the torch.distributed calls: O(N) numbers forward (N for
    the max, 3N -- 2N without entropy -- for the sums, plus a 7-int64 layout record), nothing in
    the logits backward, N_valid x H for grad_hidden in the linear backward. Never O(N·V)."""
    import alignkernels.ops.vocab_parallel as vp

    calls = []

    class CountingDist:
        def __getattr__(self, name):
            return getattr(torch.distributed, name)

        def all_reduce(self, t, **kw):
            calls.append(("all_reduce", t.numel(), t.dtype))
            return torch.distributed.all_reduce(t, **kw)

        def all_gather(self, out, t, **kw):
            calls.append(("all_gather", t.numel(), t.dtype))
            return torch.distributed.all_gather(out, t, **kw)

    start, size = _shard(SHARD_BOUNDS[world], rank)
    n, H = 12, 8
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[:3] = -100
    original = vp.dist
    vp.dist = CountingDist()
    try:
        logits = torch.randn(n, size, requires_grad=True)
        logp, ent = vp.vocab_parallel_token_logprobs(logits, labels, vocab_start=start, vocab_size=V,
                                                     return_entropy=True)  # fmt: skip
        assert calls == [("all_gather", 7, torch.int64), ("all_reduce", n, torch.float32),
                         ("all_reduce", 3 * n, torch.float32)], calls  # fmt: skip
        calls.clear()
        (logp.sum() + ent.sum()).backward()
        assert calls == [], calls
        vp.vocab_parallel_token_logprobs(logits, labels, vocab_start=start, vocab_size=V, check_shards=False)
        assert calls == [("all_reduce", n, torch.float32), ("all_reduce", 2 * n, torch.float32)], calls
        calls.clear()
        hidden = torch.randn(n, H, requires_grad=True)
        logp, ent = vp.vocab_parallel_linear_logprobs(hidden, torch.randn(size, H, requires_grad=True), labels,
                                                      vocab_start=start, vocab_size=V, return_entropy=True)  # fmt: skip
        n_valid = n - 3
        assert calls == [("all_gather", 7, torch.int64), ("all_reduce", n_valid, torch.float32),
                         ("all_reduce", 3 * n_valid, torch.float32)], calls  # fmt: skip
        calls.clear()
        (logp.sum() + ent.sum()).backward()
        assert calls == [("all_reduce", n_valid * H, torch.float32)], calls
    finally:
        vp.dist = original


def check_edge_cases(rank, world):
    """Every row ignored (finite zeros, zero gradients, empty collectives); bf16 logits (fp32
    math on both sides); the default group passed explicitly as ``group.WORLD``."""
    import alignkernels
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    start, size = _shard(SHARD_BOUNDS[world], rank)
    gen = torch.Generator().manual_seed(11)
    ignored = torch.full((2, 3), -100)
    logits = torch.randn(2, 3, size, generator=gen).requires_grad_(True)
    logp, ent = vocab_parallel_token_logprobs(logits, ignored, vocab_start=start, vocab_size=V, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert bool((logp == 0).all() and (ent == 0).all() and (logits.grad == 0).all())
    hidden = torch.randn(2, 3, 4, generator=gen).requires_grad_(True)
    weight = torch.randn(size, 4, generator=gen).requires_grad_(True)
    logp, ent = vocab_parallel_linear_logprobs(hidden, weight, ignored, vocab_start=start, vocab_size=V,
                                               return_entropy=True)  # fmt: skip
    (logp.sum() + ent.sum()).backward()
    assert bool((logp == 0).all() and (ent == 0).all())
    assert bool((hidden.grad == 0).all() and (weight.grad == 0).all())

    gen = torch.Generator().manual_seed(12)  # same draws on every rank
    full = torch.randn(5, V, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, V, (5,), generator=gen)
    ref_logp, ref_ent = alignkernels.token_logprobs(full, labels, backend="torch", return_entropy=True)
    world_group = torch.distributed.group.WORLD
    logp, ent = vocab_parallel_token_logprobs(full[:, start : start + size], labels, vocab_start=start, vocab_size=V,
                                              process_group=world_group, return_entropy=True)  # fmt: skip
    assert logp.dtype == torch.float32
    _close("bf16 logp", logp, ref_logp)
    _close("bf16 entropy", ent, ref_ent)


def _rel(got, want, floor=0.0):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / max(want.abs().max().item(), floor, 1e-20)).item()


def check_precision(rank, world):
    """Logits at offsets ±1e4 and T = 0.01 / 1 / 100, both forms, torch and triton: logp, entropy and the
    shard's gradient within 2e-6 of the fp64 eager reference on the full inputs (the merge is centred)."""
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs
    from alignkernels.reference import linear_logprobs_reference, token_logprobs_reference

    start, size = _shard(SHARD_BOUNDS[world], rank)
    worst = {}
    for backend in ("torch", "triton"):
        for offset in (-1e4, 0.0, 1e4):
            for T in (0.01, 1.0, 100.0):
                gen = torch.Generator().manual_seed(5)
                full = torch.randn(3, V, generator=gen) * 3 + offset
                labels = torch.randint(0, V, (3,), generator=gen)
                labels[0] = full[0].argmax()
                g_logp, g_ent = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
                ref_x = full.double().requires_grad_(True)
                r_logp, r_ent = token_logprobs_reference(ref_x, labels, temperature=T, return_entropy=True)
                (r_logp * g_logp + r_ent * g_ent).sum().backward()
                shard = full[:, start : start + size].clone().requires_grad_(True)
                logp, ent = vocab_parallel_token_logprobs(shard, labels, vocab_start=start, vocab_size=V,
                                                          temperature=T, return_entropy=True, backend=backend)
                (logp * g_logp + ent * g_ent).sum().backward()
                worst[f"token-{backend}-{offset}-{T}"] = max(
                    _rel(logp, r_logp, 1.0), _rel(ent, r_ent, 1.0), _rel(shard.grad, ref_x.grad[:, start : start + size])
                )
                # linear: h[r] = [1, e_r], W[:, 0] = offset, so the fp32 GEMM is exact and logits = offset + W[:, 1 + r]
                hidden = torch.cat((torch.ones(3, 1), torch.eye(3)), 1)
                weight = torch.cat((torch.full((V, 1), offset), (torch.randn(V, 3, generator=gen) * 48).round() / 16), 1)
                w64 = weight.double().requires_grad_(True)
                r_logp, r_ent = linear_logprobs_reference(hidden.double(), w64, labels, temperature=T,
                                                          return_entropy=True)
                (r_logp * g_logp + r_ent * g_ent).sum().backward()
                w_shard = weight[start : start + size].clone().requires_grad_(True)
                logp, ent = vocab_parallel_linear_logprobs(hidden, w_shard, labels, vocab_start=start, vocab_size=V,
                                                           temperature=T, return_entropy=True, backend=backend)
                (logp * g_logp + ent * g_ent).sum().backward()
                worst[f"linear-{backend}-{offset}-{T}"] = max(
                    _rel(logp, r_logp, 1.0), _rel(ent, r_ent, 1.0),
                    _rel(w_shard.grad[:, 1:], w64.grad[start : start + size, 1:]),
                )  # fmt: skip
    bad = {k: v for k, v in worst.items() if not v < 2e-6}
    assert not bad, bad


def check_logp_entropy_bounds(rank, world):
    """The merge of shard statistics keeps ``logp <= 0`` and ``entropy >= 0`` exactly: peaked and flat rows
    at offsets of ±1e4 and T from 1e-4 to 1e3, both forms, torch and triton, the LoRA head (before: logp up
    to +1e-7 and entropy down to -1e-7 from the rounding of the merged ``log S``)."""
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    start, size = _shard(SHARD_BOUNDS[world], rank)
    bad = []
    gen = torch.Generator().manual_seed(9)
    for backend in ("torch", "triton"):
        for offset in (0.0, 1e4, -1e4):
            for spread in (1e-3, 1.0, 30.0):
                full = torch.randn(6, V, generator=gen) * spread + offset
                labels = full.argmax(-1)
                full[torch.arange(6), labels] += torch.tensor([0.0, 1.0, 50.0]).repeat(2) * spread
                hidden = torch.cat((torch.ones(6, 1), torch.randn(6, 3, generator=gen)), 1)
                weight = torch.cat((torch.full((V, 1), offset), torch.randn(V, 3, generator=gen) * spread), 1)
                lora = (torch.randn(2, 4, generator=gen) * 0.1, torch.randn(V, 2, generator=gen) * spread, 0.5)
                for T in (1e-4, 1e-2, 0.7, 1e3):
                    outs = {
                        "token": vocab_parallel_token_logprobs(full[:, start:start + size], labels, vocab_start=start,
                                                               vocab_size=V, temperature=T, return_entropy=True,
                                                               backend=backend),
                        "linear": vocab_parallel_linear_logprobs(hidden, weight[start:start + size], labels,
                                                                 vocab_start=start, vocab_size=V, temperature=T,
                                                                 return_entropy=True, backend=backend),
                        "lora": vocab_parallel_linear_logprobs(hidden, weight[start:start + size], labels,
                                                               vocab_start=start, vocab_size=V, temperature=T,
                                                               return_entropy=True, backend=backend,
                                                               lora=(lora[0], lora[1][start:start + size], lora[2])),
                    }  # fmt: skip
                    for form, (logp, ent) in outs.items():
                        if not ((logp <= 0).all() and (ent >= 0).all()):
                            bad.append((backend, form, offset, spread, T, logp.max().item(), ent.min().item()))
    assert not bad, bad


def check_masked_vocabulary(rank, world):
    """-inf logits / bias entries on several shards, a label on one of them: logp = -inf, entropy and the
    other rows as the single-process op (both forms, torch and triton); no NaN in the gradients."""
    import alignkernels
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    start, size = _shard(SHARD_BOUNDS[world], rank)
    gen = torch.Generator().manual_seed(10)
    masked = [3, 45, 60, V - 1]
    full = torch.randn(4, V, generator=gen) * 2
    full[:, masked] = float("-inf")
    labels = torch.tensor([45, 7, V - 1, 60])
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(V, 8, generator=gen) / 3
    bias = torch.zeros(V)
    bias[masked] = float("-inf")
    for backend in ("torch", "triton"):
        x = full[:, start:start + size].clone().requires_grad_(True)
        logp, ent = vocab_parallel_token_logprobs(x, labels, vocab_start=start, vocab_size=V, return_entropy=True,
                                                  backend=backend)  # fmt: skip
        want_logp, want_ent = alignkernels.token_logprobs(full, labels, return_entropy=True, backend="torch")
        ent.sum().backward()
        h = hidden.clone().requires_grad_(True)
        l_logp, l_ent = vocab_parallel_linear_logprobs(h, weight[start:start + size], labels, vocab_start=start,
                                                       vocab_size=V, bias_shard=bias[start:start + size],
                                                       return_entropy=True, backend=backend)  # fmt: skip
        lw_logp, lw_ent = alignkernels.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                                       backend="torch")  # fmt: skip
        l_ent.sum().backward()
        for name, got, want in (("token logp", logp, want_logp), ("token entropy", ent, want_ent),
                                ("linear logp", l_logp, lw_logp), ("linear entropy", l_ent, lw_ent)):  # fmt: skip
            assert torch.equal(torch.isneginf(got), torch.isneginf(want)), (backend, name, got, want)
            finite = torch.isfinite(want)
            _close(f"{backend} {name}", got[finite].detach(), want[finite])
        assert torch.isneginf(logp[[0, 2, 3]]).all() and torch.isfinite(x.grad).all() and torch.isfinite(h.grad).all()


def check_batch_invariant(rank, world, form, backend, examples, lora=False):
    """``batch_invariant=True``: a pool of 40 tokens computed as one batch, then sub-batches (1..40
    tokens, shuffled, packed ``[1, n]`` or padded ``[B, T]`` with junk inputs and -100 labels, any
    ``chunk_size`` / ``vocab_block_size``, gradients on or off; the same draws on every rank) give
    every token's logp, entropy and gradient row (``grad_hidden``; the logits form: the shard's
    ``grad_logits`` row) bit for bit. 16-row tiles, so the batches span one to three tiles.
    ``lora``: with a trainable rank-3 adapter on the head (``lora_B`` sharded like the weight)."""
    import random

    import alignkernels
    from alignkernels.ops import _lmhead_engine as engine
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    bounds = SHARD_BOUNDS[world]
    start, size = _shard(bounds, rank)
    gen = torch.Generator().manual_seed(21)
    pool_n, H = 40, 16
    weight = torch.randn(V, H, generator=gen) * 0.5
    pool = dict(x=torch.randn(pool_n, H, generator=gen) if form == "linear" else torch.randn(pool_n, V, generator=gen) * 3,
                labels=torch.randint(0, V, (pool_n,), generator=gen), g_logp=torch.randn(pool_n, generator=gen),
                g_ent=torch.randn(pool_n, generator=gen))  # fmt: skip
    adapter = {}
    if lora:
        lora_A, lora_B = torch.randn(3, H, generator=gen) * 0.3, torch.randn(V, 3, generator=gen) * 0.3
        adapter = dict(lora=(lora_A.requires_grad_(), lora_B[start:start + size].clone().requires_grad_(), 0.7))

    def run(x, labels, g_logp, g_ent, grad, **kw):
        leaf = (x if form == "linear" else x[..., start:start + size]).clone().requires_grad_(grad)
        kw.update(adapter)
        if form == "linear":
            out = vocab_parallel_linear_logprobs(leaf, weight[start:start + size], labels, vocab_start=start,
                                                 vocab_size=V, return_entropy=True, backend=backend,
                                                 batch_invariant=True, **kw)  # fmt: skip
        else:
            out = vocab_parallel_token_logprobs(leaf, labels, vocab_start=start, vocab_size=V, return_entropy=True,
                                                backend=backend, batch_invariant=True)  # fmt: skip
        if not grad:
            return out[0], out[1], None
        ((out[0] * g_logp).sum() + (out[1] * g_ent).sum()).backward()
        return out[0].detach(), out[1].detach(), leaf.grad

    saved = engine.BATCH_INVARIANT_ROWS
    engine.BATCH_INVARIANT_ROWS = {"cpu": 16, "cuda": 16}
    try:
        want = run(pool["x"][None], pool["labels"][None], pool["g_logp"][None], pool["g_ent"][None], True)
        single_lora = dict(lora=(lora_A.detach(), lora_B, 0.7)) if lora else {}
        single = (alignkernels.linear_logprobs(pool["x"], weight, pool["labels"], return_entropy=True, backend="torch",
                                               **single_lora)
                  if form == "linear" else
                  alignkernels.token_logprobs(pool["x"], pool["labels"], return_entropy=True, backend="torch"))
        _close("pool logp", want[0][0], single[0])
        _close("pool entropy", want[1][0], single[1])
        # the public ops hand batch_invariant=True to the vocab-parallel form (they used to refuse it)
        public = (alignkernels.linear_logprobs(pool["x"][None], weight[start:start + size], pool["labels"][None],
                                               process_group=torch.distributed.group.WORLD, vocab_start=start,
                                               vocab_size=V, return_entropy=True, backend=backend, batch_invariant=True,
                                               **adapter)
                  if form == "linear" else
                  alignkernels.token_logprobs(pool["x"][None, :, start:start + size], pool["labels"][None],
                                              process_group=torch.distributed.group.WORLD, vocab_start=start,
                                              vocab_size=V, return_entropy=True, backend=backend, batch_invariant=True))
        assert torch.equal(public[0], want[0]) and torch.equal(public[1], want[1])
        rng = random.Random(5)  # same draws on every rank
        for _ in range(examples):
            n = rng.choice([1, 2, 15, 17, rng.randint(3, 39), 40])
            idx = rng.sample(range(pool_n), n)
            if rng.random() < 0.5:
                shape, pos = (1, n), [(0, i) for i in range(n)]
            else:
                B = rng.randint(1, n)
                T = -(-n // B) + rng.randint(0, 3)
                shape, pos = (B, T), sorted(rng.sample([(b, t) for b in range(B) for t in range(T)], n))
            junk = torch.Generator().manual_seed(rng.randint(0, 2**31))
            x = torch.randn(*shape, pool["x"].shape[-1], generator=junk) * 5
            labels = torch.full(shape, -100)
            g_logp, g_ent = torch.randn(shape, generator=junk), torch.randn(shape, generator=junk)
            for (b, t), i in zip(pos, idx):
                x[b, t], labels[b, t] = pool["x"][i], pool["labels"][i]
                g_logp[b, t], g_ent[b, t] = pool["g_logp"][i], pool["g_ent"][i]
            grad = rng.random() < 0.6
            kw = dict(chunk_size=rng.choice([None, 1, 5]), vocab_block_size=rng.choice([None, 16])) if form == "linear" else {}
            logp, ent, gx = run(x, labels, g_logp, g_ent, grad, **kw)
            bs, ts = zip(*pos)
            what = f"n={n} shape={shape} grad={grad} {kw}"
            assert torch.equal(logp[bs, ts], want[0][0, idx]), what
            assert torch.equal(ent[bs, ts], want[1][0, idx]), what
            assert bool((logp[labels == -100] == 0).all()), what
            if grad:
                assert torch.equal(gx[bs, ts], want[2][0, idx]), what
                assert bool((gx[labels == -100] == 0).all()), what
    finally:
        engine.BATCH_INVARIANT_ROWS = saved
    if form == "linear":  # refused by name on every rank
        _expect_error(lambda: vocab_parallel_linear_logprobs(pool["x"], weight[start:start + size], pool["labels"],
                                                             vocab_start=start, vocab_size=V, batch_invariant=1),
                      "batch_invariant must be a bool")  # fmt: skip


def check_support(rank, world):
    """``support=`` (the sampler's kept tokens, GLOBAL packed words on every rank; shard bounds 17, 50, 71
    cut the 32-bit words) on both forms, torch and triton: logp, entropy and every gradient as fp64 masked
    ``log_softmax`` on one process; rows whose kept tokens all sit on another shard; a label outside the
    set is the same ``ValueError`` on every rank."""
    from alignkernels.ops._support import pack_bits
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    start, size = _shard(SHARD_BOUNDS[world], rank)
    gen = torch.Generator().manual_seed(21)
    full = torch.randn(2, 6, V, generator=gen) * 3
    labels = _labels_in_every_shard((2, 6), SHARD_BOUNDS[world], -100, gen)
    keep = torch.rand(2, 6, V, generator=gen) < 0.3
    keep[0, 0] = False
    keep[0, 0, 60:64] = True  # one row's whole set on one shard
    keep.scatter_(-1, labels.clamp(min=0)[..., None], True)
    bits = pack_bits(keep)
    hidden, weight = torch.randn(2, 6, 8, generator=gen), torch.randn(V, 8, generator=gen) / 3
    valid = labels != -100

    def fp64(logits_fn, *inputs):
        xs = [t.double().requires_grad_(True) for t in inputs]
        ls = torch.log_softmax(logits_fn(*xs).masked_fill(~keep, float("-inf")), -1)
        logp = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
        ent = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
        (logp.sum() + 0.5 * ent.sum()).backward()
        return logp, ent, [x.grad for x in xs]

    want = fp64(lambda x: x, full)
    want_l = fp64(lambda h, w: h @ w.T, hidden, weight)
    for backend in ("torch", "triton"):
        x = full[..., start:start + size].clone().requires_grad_(True)
        logp, ent = vocab_parallel_token_logprobs(x, labels, vocab_start=start, vocab_size=V, return_entropy=True,
                                                  backend=backend, support=bits)  # fmt: skip
        (logp.sum() + 0.5 * ent.sum()).backward()
        _close(f"{backend} token logp", logp.double(), want[0])
        _close(f"{backend} token entropy", ent.double(), want[1])
        _close(f"{backend} token grad", x.grad.double(), want[2][0][..., start:start + size])
        h, w = hidden.clone().requires_grad_(True), weight[start:start + size].clone().requires_grad_(True)
        logp, ent = vocab_parallel_linear_logprobs(h, w, labels, vocab_start=start, vocab_size=V, return_entropy=True,
                                                   backend=backend, support=bits)  # fmt: skip
        (logp.sum() + 0.5 * ent.sum()).backward()
        _close(f"{backend} linear logp", logp.double(), want_l[0])
        _close(f"{backend} linear entropy", ent.double(), want_l[1])
        _close(f"{backend} linear grad_hidden", h.grad.double(), want_l[2][0])
        _close(f"{backend} linear grad_weight", w.grad.double(), want_l[2][1][start:start + size])
    keep[1, 4, labels[1, 4]] = False
    for fn in (lambda: vocab_parallel_token_logprobs(full[..., start:start + size], labels, vocab_start=start,
                                                     vocab_size=V, support=pack_bits(keep)),
               lambda: vocab_parallel_linear_logprobs(hidden, weight[start:start + size], labels, vocab_start=start,
                                                      vocab_size=V, support=pack_bits(keep))):  # fmt: skip
        _expect_error(fn, r"position \(1, 4\) is outside its row's support")


def check_support_empty_row(rank, world):
    """A row with no kept token on any shard (``check_labels=False``): logp ``-inf``, entropy 0, every
    gradient 0, on both forms, torch and triton, as on one process (``tests/ops/test_support.py``); rows
    empty on some shards only are the usual case (fp64); a label outside its row's set on a shard that keeps
    nothing of that row: ``-inf`` (was NaN: that shard's ``-inf - (-inf)``)."""
    from alignkernels.ops._support import pack_bits
    from alignkernels.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_token_logprobs

    start, size = _shard(SHARD_BOUNDS[world], rank)
    gen = torch.Generator().manual_seed(31)
    full = torch.randn(2, 6, V, generator=gen) * 3
    labels = _labels_in_every_shard((2, 6), SHARD_BOUNDS[world], -100, gen)
    keep = torch.rand(2, 6, V, generator=gen) < 0.3
    keep.scatter_(-1, labels.clamp(min=0)[..., None], True)
    labels[0, 1], labels[1, 2] = 20, 5
    keep[0, 1] = False  # no kept token anywhere
    keep[1, 2] = False
    keep[1, 2, 60:64] = True  # kept tokens on one shard only, the label (5) on the first shard, outside the set
    bits = pack_bits(keep)
    hidden, weight = torch.randn(2, 6, 8, generator=gen), torch.randn(V, 8, generator=gen) / 3
    g_logp, g_ent = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    g_logp[1, 2] = g_ent[1, 2] = 0.0  # the label-outside row: values checked, not its gradient
    others = labels.clone()
    others[0, 1] = others[1, 2] = -100
    valid = others != -100

    def fp64(logits_fn, *inputs):
        xs = [t.double().requires_grad_(True) for t in inputs]
        ls = torch.log_softmax(logits_fn(*xs).masked_fill(~keep, float("-inf")), -1)
        logp = torch.where(valid, ls.gather(-1, others.clamp(min=0)[..., None]).squeeze(-1), 0.0)
        ent = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp, ent, [x.grad for x in xs]

    want = fp64(lambda x: x, full)
    want_l = fp64(lambda h, w: h @ w.T, hidden, weight)
    for backend in ("torch", "triton"):
        x = full[..., start:start + size].clone().requires_grad_(True)
        h, w = hidden.clone().requires_grad_(True), weight[start:start + size].clone().requires_grad_(True)
        token = vocab_parallel_token_logprobs(x, labels, vocab_start=start, vocab_size=V, return_entropy=True,
                                              backend=backend, support=bits, check_labels=False)  # fmt: skip
        linear = vocab_parallel_linear_logprobs(h, w, labels, vocab_start=start, vocab_size=V, return_entropy=True,
                                                backend=backend, support=bits, check_labels=False)  # fmt: skip
        for form, (logp, ent), leaf, w_want in (("token", token, x, want), ("linear", linear, h, want_l)):
            torch.autograd.backward([logp, ent], [g_logp, g_ent])
            what = f"{backend} {form}"
            assert logp[0, 1] == float("-inf") and ent[0, 1] == 0, (what, logp[0, 1], ent[0, 1])
            assert bool((leaf.grad[0, 1] == 0).all()), what
            assert logp[1, 2] == float("-inf"), (what, logp[1, 2])
            assert not any(bool(t.isnan().any()) for t in (logp, ent, leaf.grad)), what
            _close(f"{what} logp", logp[valid].double(), w_want[0][valid])
            _close(f"{what} entropy", ent[valid].double(), w_want[1][valid])
        _close(f"{backend} token grad", x.grad.double(), want[2][0][..., start:start + size])
        _close(f"{backend} linear grad_hidden", h.grad.double(), want_l[2][0])
        _close(f"{backend} linear grad_weight", w.grad.double(), want_l[2][1][start:start + size])


def check_top_k(rank, world):
    """``top_k=`` with ``process_group=`` on both forms (torch and triton; through ``token_logprobs`` /
    ``linear_logprobs``): integer logits (exact ties everywhere, planted ties across the shard boundaries),
    ``k`` cutting inside a tie that crosses a boundary and ``k`` wider than a shard: logp, entropy and
    gradients equal to the single-process ``top_k=`` op and to fp64 masked ``log_softmax`` whose kept set is
    a stable descending sort (ties to the lowest global ids); a label outside the set names its position."""
    import torch.distributed as dist
    from alignkernels import linear_logprobs, token_logprobs

    start, size = _shard(SHARD_BOUNDS[world], rank)
    gen = torch.Generator().manual_seed(41)
    full = torch.randint(-3, 4, (2, 5, V), generator=gen).double()
    planted = sorted({b + d for b in SHARD_BOUNDS[2][1:-1] + SHARD_BOUNDS[4][1:-1] for d in (-1, 0)})
    full[0, 0, planted] = 10.0  # 16 17 39 40 49 50 70 71: k = 3 cuts at 39|40, k = 5 at 49|50
    hidden = torch.randint(-2, 3, (2, 5, 8), generator=gen).double()
    weight = torch.randint(-2, 3, (V, 8), generator=gen).double()
    group, temp = dist.group.WORLD, 0.7
    widest = max(b - a for a, b in zip(SHARD_BOUNDS[world][:-1], SHARD_BOUNDS[world][1:]))

    def kept_set(logits, k):  # the k best by (value descending, id ascending)
        order = torch.sort(-logits, dim=-1, stable=True).indices[..., :k]
        return torch.zeros(logits.shape, dtype=torch.bool).scatter_(-1, order, True)

    def fp64(logits_fn, inputs, keep, labels):
        xs = [t.clone().requires_grad_(True) for t in inputs]
        ls = torch.log_softmax((logits_fn(*xs) / temp).masked_fill(~keep, float("-inf")), -1)
        valid = labels != -100
        logp = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
        ent = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
        (logp.sum() + 0.5 * ent.sum()).backward()
        return logp, ent, [x.grad for x in xs]

    for k in (3, 5, widest + 3):  # widest + 3: wider than every shard
        forms = (("token", lambda x: x, (full,)), ("linear", lambda h, w: h @ w.T, (hidden, weight)))
        for form, logits_fn, inputs in forms:
            logits = logits_fn(*inputs)
            keep = kept_set(logits, k)
            labels = torch.multinomial(keep.view(-1, V).double(), 1, generator=gen).view(2, 5)
            labels[1, 4] = -100
            if form == "token":  # the last kept planted tie
                labels[0, 0] = planted[min(k, len(planted)) - 1]
            want = fp64(logits_fn, inputs, keep, labels)
            for backend in ("torch", "triton") if k != 3 else ("torch",):  # the interpreter is the slow part
                what = f"{form} {backend} k={k}"
                if form == "token":
                    x = full[..., start:start + size].float().requires_grad_(True)
                    one = full.float().requires_grad_(True)
                    run = lambda t, **kw: token_logprobs(t, labels, temperature=temp, return_entropy=True,  # noqa: E731
                                                         backend=backend, top_k=k, **kw)  # fmt: skip
                    leaves, one_leaves, cut = [x], [one], [lambda g: g[..., start:start + size]]
                    got, ref = run(x, process_group=group, vocab_start=start, vocab_size=V), run(one)
                else:
                    h, w = hidden.float().requires_grad_(True), weight[start:start + size].float().requires_grad_(True)
                    h1, w1 = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
                    run = lambda a, b, **kw: linear_logprobs(  # noqa: E731
                        a, b, labels, temperature=temp, return_entropy=True, backend=backend, top_k=k, **kw)  # fmt: skip
                    leaves, one_leaves, cut = [h, w], [h1, w1], [lambda g: g, lambda g: g[start:start + size]]
                    got, ref = run(h, w, process_group=group, vocab_start=start, vocab_size=V), run(h1, w1)
                if k == 5 and backend == "torch":  # the same set on batch_invariant=True's fixed plan (padded rows)
                    inv = run(*(leaf.detach() for leaf in leaves), process_group=group, vocab_start=start, vocab_size=V,
                              batch_invariant=True)  # fmt: skip
                    _close(f"{what} batch_invariant logp", inv[0], got[0].detach())
                for outs in (got, ref):
                    (outs[0].sum() + 0.5 * outs[1].sum()).backward()
                for i, name in enumerate(("logp", "entropy")):
                    _close(f"{what} {name} vs one process", got[i], ref[i])
                    _close(f"{what} {name} vs fp64", got[i].double(), want[i])
                for leaf, one_leaf, c, g64 in zip(leaves, one_leaves, cut, want[2]):
                    _close(f"{what} grad vs one process", leaf.grad, c(one_leaf.grad))
                    _close(f"{what} grad vs fp64", leaf.grad.double(), c(g64))
    labels[1, 0] = int((~keep[1, 0]).nonzero()[0])
    _expect_error(lambda: linear_logprobs(hidden.float(), weight[start:start + size].float(), labels, top_k=k,
                                          process_group=group, vocab_start=start, vocab_size=V),
                  r"position \(1, 0\) is outside its row's support")  # fmt: skip
    keep = kept_set(full, 5)
    labels = torch.multinomial(keep.view(-1, V).double(), 1, generator=gen).view(2, 5)
    labels[1, 0] = int((~keep[1, 0]).nonzero()[0])
    _expect_error(lambda: token_logprobs(full[..., start:start + size].float(), labels, top_k=5, process_group=group,
                                         vocab_start=start, vocab_size=V),
                  r"position \(1, 0\) is outside its row's support")  # fmt: skip
    _expect_error(lambda: token_logprobs(full[..., start:start + size].float(), labels, top_k=V + 1,
                                         process_group=group, vocab_start=start, vocab_size=V),
                  r"top_k must be in \[1, V=103\]")  # fmt: skip


def _checks_for(world):
    checks = {
        "token_fp32": lambda r: check_token_logprobs(r, world),
        "token_fp64_strided_no_entropy": lambda r: check_token_logprobs(r, world, dtype=torch.float64, strided=True,
                                                                        with_entropy=False),  # fmt: skip
        "token_ignore_index_minus_one": lambda r: check_token_logprobs(r, world, ignore_index=-1),
        "token_triton": lambda r: check_token_logprobs(r, world, backend="triton", shape=(2, 5)),
        "linear_fp32": lambda r: check_linear_logprobs(r, world),
        "linear_no_bias_no_softcap_logp_only": lambda r: check_linear_logprobs(r, world, with_bias=False, softcap=None,
                                                                               with_entropy=False),  # fmt: skip
        "linear_triton": lambda r: check_linear_logprobs(r, world, backend="triton", shape=(2, 6), H=8),
        "linear_lora": lambda r: check_linear_lora(r, world),
        "linear_grad_hidden_partial": lambda r: check_linear_grad_hidden_partial(r, world),
        "inconsistent_shards": lambda r: check_inconsistent_shards(r, world),
        "communication_volume": lambda r: check_communication_volume(r, world),
        "edge_cases": lambda r: check_edge_cases(r, world),
        "logp_entropy_bounds": lambda r: check_logp_entropy_bounds(r, world),
        "masked_vocabulary": lambda r: check_masked_vocabulary(r, world),
        "batch_invariant_linear": lambda r: check_batch_invariant(r, world, "linear", "torch", 10 if world == 2 else 4),
        "batch_invariant_token": lambda r: check_batch_invariant(r, world, "token", "torch", 10 if world == 2 else 4),
        "batch_invariant_linear_lora": lambda r: check_batch_invariant(r, world, "linear", "torch",
                                                                       6 if world == 2 else 3, lora=True),
        "support": lambda r: check_support(r, world),
        "support_empty_row": lambda r: check_support_empty_row(r, world),
        "top_k": lambda r: check_top_k(r, world),
    }
    if world == 2:
        checks["precision_large_logits"] = lambda r: check_precision(r, world)
        checks["head_precision"] = lambda r: check_head_precision(r, world)
        checks["ddp_grpo"] = lambda r: check_data_parallel_grpo(r, world)
        checks["fsdp2_dtensor_head"] = lambda r: check_fsdp2_dtensor_head(r, world)
        checks["batch_invariant_linear_triton"] = lambda r: check_batch_invariant(r, world, "linear", "triton", 2)
        checks["batch_invariant_token_triton"] = lambda r: check_batch_invariant(r, world, "token", "triton", 2)
    if world == 4:
        checks["tp_dp_subgroups"] = lambda r: check_tp_dp_subgroups(r, world)
    return checks


def _worker(rank, world, tmpdir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    results = {}
    try:
        for name, check in _checks_for(world).items():
            t0 = time.perf_counter()
            try:
                check(rank)
                results[name] = {"ok": True}
            except Exception:  # recorded and reported by the pytest side
                results[name] = {"ok": False, "error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            torch.distributed.barrier()
    finally:
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# pytest side: one spawn per world size
# --------------------------------------------------------------------------------------------
_RESULTS: dict = {}


def _run_world(world, tmp_path_factory):
    if isinstance(_RESULTS.get(world), str):  # the spawn failed once: every check of that world reports it
        pytest.fail(_RESULTS[world])
    if world not in _RESULTS:
        import torch.multiprocessing as mp

        tmpdir = str(tmp_path_factory.mktemp(f"vocab_parallel_{world}"))
        ctx = mp.start_processes(_worker, args=(world, tmpdir), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                _RESULTS[world] = f"vocab-parallel workers (world size {world}) did not finish in {SPAWN_TIMEOUT_S} s"
                pytest.fail(_RESULTS[world])
        per_rank = []
        for r in range(world):
            with open(os.path.join(tmpdir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
        _RESULTS[world] = per_rank
    return _RESULTS[world]


CHECK_NAMES = {w: list(_checks_for(w)) for w in (2, 4)}


@pytest.mark.parametrize("world,check", [(w, c) for w in (2, 4) for c in CHECK_NAMES[w]])
def test_vocab_parallel(world, check, tmp_path_factory):
    per_rank = _run_world(world, tmp_path_factory)
    failures = [f"rank {r}:\n{res[check]['error']}" for r, res in enumerate(per_rank) if not res[check]["ok"]]
    assert not failures, "\n".join(failures)


def test_needs_initialised_group():
    import torch.distributed as dist
    from alignkernels.ops.vocab_parallel import vocab_parallel_token_logprobs

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), vocab_start=0, vocab_size=5)
