"""``batch_invariant=True`` on ``token_logprobs`` and ``linear_logprobs``: a token's logp, entropy and
gradient row are bitwise the same whatever batch it is computed in.

Property: a pool of 64 tokens, each with its own upstream gradient, is computed once as one batch;
then random sub-batches (1..64 tokens, shuffled, packed ``[1, n]`` or padded ``[B, T]`` with
``ignore_index`` padding holding junk hidden states / logits, random ``chunk_size`` /
``vocab_block_size``, gradients on or off) must reproduce every token's values and gradient row bit
for bit. Torch and Triton (the interpreter on CPU), with and without a LoRA adapter on the head
(``lora=``: its thin GEMMs run per tile of the padded rows, ``ops/_lora.py``). The default path's promise (run-to-run
determinism) is ``tests/test_determinism.py``'s.
"""
import math
import random

import pytest
import torch

import alignkernels as ak
from alignkernels.ops import _lmhead_engine as engine
from helpers import TRITON_DEVICE, max_rel_error

POOL, H = 64, 24


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _pool(V, device, seed=0, rank=3):
    g = torch.Generator().manual_seed(seed)
    pool = dict(hidden=torch.randn(POOL, H, generator=g).to(device),
                weight=(torch.randn(V, H, generator=g) * 0.5).to(device),
                logits=(torch.randn(POOL, V, generator=g) * 3).to(device),
                labels=torch.randint(0, V, (POOL,), generator=g).to(device),
                g_logp=torch.randn(POOL, generator=g).to(device),
                g_entropy=torch.randn(POOL, generator=g).to(device))  # fmt: skip
    # a trainable LoRA adapter on the head (lora_A [r, H], lora_B [V, r], scaling), used with lora=True
    pool["lora"] = ((torch.randn(rank, H, generator=g) * 0.3).to(device).requires_grad_(),
                    (torch.randn(V, rank, generator=g) * 0.3).to(device).requires_grad_(), 0.7)  # fmt: skip
    return pool


def _layout(idx, rng, pool, key):
    """The tokens ``idx`` as a packed ``[1, n]`` batch or a right-padded ``[B, T]`` one (junk
    inputs, label -100 in the padding). Returns ``(inputs, labels, g_logp, g_entropy, positions)``."""
    x, n = pool[key], len(idx)
    if rng.random() < 0.5:
        pos = [(0, i) for i in range(n)]
        shape = (1, n)
    else:
        B = rng.randint(1, n)
        T = math.ceil(n / B) + rng.randint(0, 3)
        pos = sorted(rng.sample([(b, t) for b in range(B) for t in range(T)], n))
        shape = (B, T)
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    inputs = (torch.randn(*shape, x.shape[-1], generator=g) * 5).to(x.device)  # junk where padded
    labels = torch.full(shape, -100, dtype=torch.long, device=x.device)
    g_logp, g_entropy = (torch.randn(shape, generator=g).to(x.device) for _ in range(2))
    for (b, t), i in zip(pos, idx):
        inputs[b, t], labels[b, t] = x[i], pool["labels"][i]
        g_logp[b, t], g_entropy[b, t] = pool["g_logp"][i], pool["g_entropy"][i]
    return inputs, labels, g_logp, g_entropy, pos


def _run(op, pool, inputs, labels, g_logp, g_entropy, grad, backend, **kw):
    x = inputs.clone().requires_grad_(grad)
    if op == "linear_logprobs":
        logp, entropy = ak.linear_logprobs(x, pool["weight"], labels, return_entropy=True, backend=backend,
                                           batch_invariant=True, **kw)  # fmt: skip
    else:
        logp, entropy = ak.token_logprobs(x, labels, return_entropy=True, backend=backend, batch_invariant=True)
    if not grad:
        return logp, entropy, None
    (gx,) = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_entropy).sum(), x)
    return logp.detach(), entropy.detach(), gx


def _check_property(op, backend, V, examples, seed, lora=False):
    device = _device(backend)
    pool = _pool(V, device)
    key = "hidden" if op == "linear_logprobs" else "logits"
    rng = random.Random(seed)
    adapter = dict(lora=pool["lora"]) if lora else {}
    full = _run(op, pool, pool[key][None], pool["labels"][None], pool["g_logp"][None], pool["g_entropy"][None],
                True, backend, **adapter)  # fmt: skip
    want_logp, want_entropy, want_grad = full[0][0], full[1][0], full[2][0]
    # the pool's own values are right (fp64 reference), so bitwise equality below is about the right bits
    ref_lora = {}
    if lora:
        ref_lora = dict(lora=(*(t.detach().cpu().double() for t in pool["lora"][:2]), pool["lora"][2]))
    ref = ak.linear_logprobs(pool["hidden"].cpu().double(), pool["weight"].cpu().double(), pool["labels"].cpu(),
                             return_entropy=True, backend="reference", **ref_lora) if op == "linear_logprobs" else \
        ak.token_logprobs(pool["logits"].cpu().double(), pool["labels"].cpu(), return_entropy=True, backend="reference")
    assert max_rel_error(want_logp, ref[0], floor=1.0) < 2e-6 and max_rel_error(want_entropy, ref[1], floor=1.0) < 2e-6
    for _ in range(examples):
        n = rng.choice([1, 2, 3, rng.randint(4, 31), 32, 33, rng.randint(34, 63), 64])
        idx = rng.sample(range(POOL), n)
        inputs, labels, g_logp, g_entropy, pos = _layout(idx, rng, pool, key)
        grad = rng.random() < 0.6
        kw = {}
        if op == "linear_logprobs":
            kw = dict(chunk_size=rng.choice([None, 1, 5, 64]), vocab_block_size=rng.choice([None, 128, 256]),
                      **adapter)  # fmt: skip
        logp, entropy, gx = _run(op, pool, inputs, labels, g_logp, g_entropy, grad, backend, **kw)
        b, t = zip(*pos)
        what = f"n={n} shape={tuple(labels.shape)} grad={grad} {kw}"
        assert torch.equal(logp[b, t], want_logp[idx]), what
        assert torch.equal(entropy[b, t], want_entropy[idx]), what
        assert bool((logp[labels == -100] == 0).all()), what
        if grad:
            assert torch.equal(gx[b, t], want_grad[idx]), what
            assert bool((gx[labels == -100] == 0).all()), what


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("backend,examples", [("torch", 30), ("triton", 6)])
def test_linear_logprobs_rows_are_batch_invariant(backend, examples, lora, monkeypatch):
    """V = 300 in 16-row x 128-column tiles (the fixed plan shrunk so that batches span 1-4 row tiles
    and several vocab blocks are merged); ``lora``: a rank-3 adapter on the head, trainable."""
    monkeypatch.setattr(engine, "BATCH_INVARIANT_BLOCK", 128)
    monkeypatch.setattr(engine, "BATCH_INVARIANT_ROWS", {"cpu": 16, "cuda": 16})
    _check_property("linear_logprobs", backend, 300, examples, seed=1, lora=lora)


@pytest.mark.parametrize("lora", [False, True])
def test_linear_logprobs_rows_are_batch_invariant_default_plan(lora):
    """The shipped plan (256 x 16384 tiles on CPU): V = 16500 is one full block and a 116-wide one."""
    _check_property("linear_logprobs", "torch", 16500, 8, seed=2, lora=lora)


@pytest.mark.parametrize("backend,V,examples", [("torch", 97, 30), ("torch", 50000, 20), ("triton", 97, 6),
                                                ("triton", 5000, 6)])  # fmt: skip
def test_token_logprobs_rows_are_batch_invariant(backend, V, examples):
    """At V = 50 000 the default torch chunks (83 rows, the last one shorter) fail this property (a
    lone row's results differ in their last bits from the same row in the pool); the same chunks
    padded to 83 rows do not."""
    _check_property("token_logprobs", backend, V, examples, seed=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_return_stats_and_half_inputs_are_batch_invariant(backend, monkeypatch):
    """bf16 inputs and TRL's extra statistics: a row alone equals the same row in a batch of 40
    (16-row tiles: the batch spans three)."""
    monkeypatch.setattr(engine, "BATCH_INVARIANT_ROWS", {"cpu": 16, "cuda": 16})
    device = _device(backend)
    pool = _pool(300, device)
    h, w, y = pool["hidden"][:40].bfloat16(), pool["weight"].bfloat16(), pool["labels"][:40]
    full = ak.linear_logprobs(h, w, y, return_stats=True, backend=backend, batch_invariant=True)
    for i in (0, 17, 39):
        one = ak.linear_logprobs(h[i:i + 1], w, y[i:i + 1], return_stats=True, backend=backend, batch_invariant=True)
        for name, a, b in zip(full._fields, one, full):
            assert torch.equal(a[0], b[i]), name


def test_padding_cost_is_at_most_one_tile():
    """The padding is counted: n valid rows cost 2·ceil(n/R)·R·H·V forward FLOPs, R = 256 rows on the
    CPU (at most one tile over the default path's 2·n·H·V)."""
    from alignkernels.flops import MatmulFlopCounter

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, H, generator=g)
    for n in (1, 256, 257, 600):
        hidden, labels = torch.randn(n, H, generator=g), torch.randint(0, 40, (n,), generator=g)
        with MatmulFlopCounter() as flops:
            ak.linear_logprobs(hidden, weight, labels, batch_invariant=True)
        assert flops.total == 2 * math.ceil(n / 256) * 256 * H * 40, (n, flops.by_op)
        with MatmulFlopCounter() as flops:
            ak.linear_logprobs(hidden, weight, labels)
        assert flops.total == 2 * n * H * 40


@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
def test_refusals_are_named(op):
    pool = _pool(97, "cpu")
    call = (lambda **kw: ak.linear_logprobs(pool["hidden"], pool["weight"], pool["labels"], **kw)) \
        if op == "linear_logprobs" else (lambda **kw: ak.token_logprobs(pool["logits"], pool["labels"], **kw))
    with pytest.raises(ValueError, match=r"batch_invariant=True is implemented on the backends .*'reference'"):
        call(batch_invariant=True, backend="reference")
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        call(batch_invariant="yes")
    if op == "linear_logprobs":  # lora= with batch_invariant=True runs (the property tests above); not on reference
        lora = (torch.zeros(2, H), torch.zeros(97, 2), 1.0)
        with pytest.raises(ValueError, match=r"batch_invariant=True is implemented on the backends .*'reference'"):
            call(batch_invariant=True, lora=lora, backend="reference")
