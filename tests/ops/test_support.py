"""``support=`` (the sampler's kept tokens, packed int32 bitmask) and ``top_k=`` on ``token_logprobs``:
log-probs and entropy of the distribution renormalised over the kept set, against an fp64 masked
``log_softmax`` (values and gradients), on the triton (interpreter), torch and reference backends
(cuda: ``tests/cuemu/test_token_logprobs.py``; vocab-parallel: ``tests/ops/test_vocab_parallel.py``);
streamed (no ``[N, V]`` buffer); a label outside the set and every bad argument named."""
import pytest
import torch

import alignkernels as ak
from alignkernels.ops import _logits_engine
from alignkernels.ops._support import pack_bits, top_k_bits, unpack_bits
from helpers import NewBuffers, max_rel_error

B, T, V = 3, 5, 77


def _data(seed=0, dtype=torch.float32, keep_p=0.4):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    keep = torch.rand(B, T, V, generator=g) < keep_p
    keep[..., 31] = True  # bit 31: the int32 sign bit
    keep.scatter_(-1, labels[..., None], True)
    labels[0, 1] = labels[2, 4] = -100
    return logits, labels, keep


def _fp64_masked(logits, labels, keep, temperature):
    """fp64 eager ``log_softmax`` over the kept tokens only: logp, entropy, and d(Σlogp + Σ0.7·H)/d logits."""
    x = logits.detach().double().requires_grad_(True)
    z = (x / temperature).masked_fill(~keep, float("-inf"))
    ls = torch.log_softmax(z, -1)
    valid = labels != -100
    logp = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    entropy = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
    (logp.sum() + 0.7 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def _ours(logits, labels, backend, **kw):
    x = logits.clone().requires_grad_(True)
    logp, entropy = ak.token_logprobs(x, labels, return_entropy=True, backend=backend, **kw)
    (logp.sum() + 0.7 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


BACKENDS = ["triton", "torch", "reference"]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_support_matches_fp64_masked_log_softmax(backend, temperature):
    logits, labels, keep = _data()
    got = _ours(logits, labels, backend, support=pack_bits(keep), temperature=temperature)
    want = _fp64_masked(logits, labels, keep, temperature)
    for name, a, b in zip(("logp", "entropy"), got, want):
        assert max_rel_error(a, b, floor=1.0) < 2e-6, name
    assert max_rel_error(got[2], want[2]) < 2e-6
    assert bool((got[2][~keep] == 0).all()), "no gradient outside the kept set"
    assert bool((got[2][labels == -100] == 0).all())
    # the renormalisation is not a no-op: the full-vocabulary log-probs differ
    full = ak.token_logprobs(logits, labels, backend=backend, temperature=temperature)
    assert (full - got[0]).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4, V])
def test_top_k_matches_fp64_masked_log_softmax(backend, k):
    logits, labels, _ = _data(seed=1)
    keep = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, logits.double().topk(k, -1).indices, True)
    labels = torch.where(labels == -100, labels, logits.topk(k, -1).indices[..., -1])  # the k-th largest token
    got = _ours(logits, labels, backend, top_k=k)
    want = _fp64_masked(logits, labels, keep, 1.0)
    for a, b in zip(got, want):
        assert max_rel_error(a, b, floor=1.0) < 2e-6
    if k == V:  # the whole vocabulary: plain token_logprobs
        assert torch.allclose(got[0], ak.token_logprobs(logits, labels, backend=backend), rtol=0, atol=1e-6)
    if k == 1:
        assert bool((got[0] == 0).all()) and bool((got[1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits(backend):
    logits, labels, keep = _data(seed=2, dtype=torch.bfloat16)
    got = _ours(logits, labels, backend, support=pack_bits(keep))
    want = _fp64_masked(logits, labels, keep, 1.0)
    assert max_rel_error(got[0], want[0], floor=1.0) < 2e-6 and max_rel_error(got[1], want[1], floor=1.0) < 2e-6
    # one bf16 rounding of the gradient (the Triton interpreter's fp32 -> bf16 cast truncates: one ulp)
    assert max_rel_error(got[2], want[2]) < (2.0**-7 if backend == "triton" else 2.0**-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_outside_support(backend):
    logits, labels, keep = _data(seed=3)
    keep[1, 2, labels[1, 2]] = False
    with pytest.raises(ValueError, match=r"labels: the label at position \(1, 2\) is outside its row's support"):
        ak.token_logprobs(logits, labels, support=pack_bits(keep), backend=backend)
    logp = ak.token_logprobs(logits, labels, support=pack_bits(keep), backend=backend, check_labels=False)
    assert logp[1, 2] == float("-inf")
    keep[1, 2, labels[1, 2]] = True
    other = ak.token_logprobs(logits, labels, support=pack_bits(keep), backend=backend)
    rows = torch.ones(B, T, dtype=torch.bool)
    rows[1, 2] = False
    assert torch.equal(logp[rows], other[rows])
    # top_k: a label outside the row's top k
    with pytest.raises(ValueError, match="outside its row's support"):
        ak.token_logprobs(logits, logits.argmin(-1), top_k=3, backend=backend)


@pytest.mark.parametrize("kind", ["support", "top_k"])
def test_streams_chunk_by_chunk(kind, monkeypatch):
    """With 8-row chunks no tensor of N·V elements exists in the forward (the mask is per chunk)."""
    monkeypatch.setattr(_logits_engine, "TORCH_CHUNK_ELEMENTS", 8 * V)
    logits, labels, keep = _data(seed=4)
    kw = dict(support=pack_bits(keep)) if kind == "support" else dict(top_k=7, check_labels=False)
    with NewBuffers() as seen:
        ak.token_logprobs(logits, labels, backend="torch", **kw)
    assert 0 < max(seen.sizes) <= 8 * V * 32  # the unpacked [8, W, 32] bits at most
    assert max(seen.sizes) < B * T * V


def test_support_is_batch_invariant():
    logits, labels, keep = _data(seed=5)
    bits = pack_bits(keep)
    full = ak.token_logprobs(logits, labels, support=bits, return_entropy=True, backend="torch", batch_invariant=True)
    one = ak.token_logprobs(logits[2:, 3:4], labels[2:, 3:4], support=bits[2:, 3:4], return_entropy=True,
                            backend="torch", batch_invariant=True)  # fmt: skip
    assert torch.equal(one[0][0, 0], full[0][2, 3]) and torch.equal(one[1][0, 0], full[1][2, 3])


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(6)
    for vocab in (1, 31, 32, 33, 100):
        mask = torch.rand(4, vocab, generator=g) < 0.5
        mask[:, -1] = True
        bits = pack_bits(mask)
        assert bits.dtype == torch.int32 and bits.shape == (4, -(-vocab // 32))
        assert torch.equal(unpack_bits(bits, vocab), mask)
        v = vocab - 1  # the documented layout: bit v % 32 of word v // 32
        assert bool(((bits[:, v // 32] >> (v % 32)) & 1).bool().all())


@pytest.mark.parametrize("kw,exc,match", [
    (dict(support=torch.zeros(B, T, 3, dtype=torch.int64)), TypeError, "support must be an int32 tensor"),
    (dict(support=[[0]]), TypeError, "support must be an int32 tensor"),
    (dict(support=torch.zeros(B, T, 2, dtype=torch.int32)), ValueError, r"support must have shape .*\(3, 5, 3\)"),
    (dict(support=torch.zeros(B * T, 3, dtype=torch.int32)), ValueError, "support must have shape"),
    (dict(support=torch.zeros(B, T, 3, dtype=torch.int32), top_k=2), ValueError, "not both"),
    (dict(top_k=0), ValueError, r"top_k must be in \[1, V=77\]"),
    (dict(top_k=V + 1), ValueError, r"top_k must be in \[1, V=77\]"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(top_k=True), TypeError, "top_k must be an int"),
])  # fmt: skip
def test_bad_arguments_are_named(kw, exc, match):
    logits, labels, _ = _data()
    with pytest.raises(exc, match=match):
        ak.token_logprobs(logits, labels, **{"backend": "torch", **kw})


# ----------------------------------------------------------------------------------------------
# token_logprobs(support=) on the Triton kernels: awkward shapes, tiles cutting the 32-bit words
# ----------------------------------------------------------------------------------------------
def _awkward(V, kind, seed):
    """``[2, 4, V]`` logits offset by 30, labels (two ignored, one fully ignored batch row) and a kept set:
    ``random`` (40 %), ``one`` (the label only), ``all``, ``edges`` (the first and last token, bit 31)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, V, generator=g) * 3 + 30
    labels = torch.randint(0, V, (2, 4), generator=g)
    if kind == "random":
        keep = torch.rand(2, 4, V, generator=g) < 0.4
    else:
        keep = torch.full((2, 4, V), kind == "all")
    if kind == "edges":
        keep[..., [0, min(31, V - 1), V - 1]] = True
        labels = torch.full((2, 4), V - 1)
    keep.scatter_(-1, labels[..., None], True)
    labels[1] = -100  # a fully masked batch row
    labels[0, 2] = -100
    return logits, labels, keep


@pytest.mark.parametrize("block_v", [16, 64, None])  # 16: tiles of half a word; None: the launcher's config
@pytest.mark.parametrize("V,kind", [(1, "all"), (33, "random"), (77, "one"), (77, "all"), (100, "edges"),
                                    (300, "random")])  # fmt: skip
def test_triton_support_awkward_shapes(V, kind, block_v, monkeypatch):
    """The Triton kernels at V not a multiple of 32 nor of the block, several tiles per row, fully
    ignored rows, a single kept token (logp 0, entropy 0, gradient 0) and the whole vocabulary kept
    (bitwise the unmasked kernel), against fp64 masked ``log_softmax``."""
    if block_v is not None:
        monkeypatch.setattr(_logits_engine, "pick_config", lambda _: (block_v, 1))
    logits, labels, keep = _awkward(V, kind, seed=V)
    got = _ours(logits, labels, "triton", support=pack_bits(keep), temperature=0.7)
    want = _fp64_masked(logits, labels, keep, 0.7)
    for name, a, b in zip(("logp", "entropy"), got, want):
        assert max_rel_error(a, b, floor=1.0) < 2e-6, name
    assert max_rel_error(got[2], want[2]) < 2e-6
    assert bool((got[2][~keep] == 0).all()) and bool((got[2][labels == -100] == 0).all())
    assert bool(torch.isfinite(got[0]).all()) and bool(torch.isfinite(got[1]).all())
    if kind == "one":
        assert bool((got[0] == 0).all()) and bool((got[1] == 0).all()) and bool((got[2] == 0).all())
    if kind == "all":
        plain = _ours(logits, labels, "triton", temperature=0.7)
        for a, b in zip(got, plain):
            assert torch.equal(a, b)


def test_triton_label_outside_support_as_torch():
    """``check_labels=False``: a label outside its row's set gives the torch backend's values and
    gradients (logp ``-inf``; the other rows untouched)."""
    logits, labels, keep = _data(seed=8)
    keep[0, 0, labels[0, 0]] = False
    keep[2, 1, labels[2, 1]] = False
    outs = [_ours(logits, labels, backend, support=pack_bits(keep), check_labels=False)
            for backend in ("triton", "torch")]  # fmt: skip
    assert outs[0][0][0, 0] == float("-inf") and outs[0][0][2, 1] == float("-inf")
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    assert bool(torch.isfinite(outs[0][2]).all()) and bool(torch.isfinite(outs[0][1]).all())


def test_triton_support_strided_logits_and_bits():
    """The shifted slice ``logits[:, :-1]`` read in place, and bits that are a non-contiguous view."""
    logits, labels, keep = _data(seed=9)
    bits = pack_bits(keep).transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    got = _ours(logits[:, :-1], labels[:, :-1], "triton", support=bits[:, :-1])
    want = _fp64_masked(logits[:, :-1], labels[:, :-1], keep[:, :-1], 1.0)
    for a, b in zip(got, want):
        assert max_rel_error(a, b, floor=1.0) < 2e-6


def test_top_k_bits_packs_the_top_k_set():
    logits, _, _ = _data(seed=10)
    for k in (1, 5, V):
        want = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, logits.topk(k, -1).indices, True)
        assert torch.equal(unpack_bits(top_k_bits(logits, k), V).view(B, T, V), want)


# ----------------------------------------------------------------------------------------------
# linear_logprobs(support=): each lm-head tile masked (torch)
# ----------------------------------------------------------------------------------------------
H = 16


def _head_data(seed=7):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    _, labels, keep = _data(seed)
    return hidden, weight, labels, keep


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(chunk_size=4, vocab_block_size=40), dict(), dict(batch_invariant=True)])
def test_linear_support_matches_fp64_masked_log_softmax(kw, backend):
    """Vocab blocks of 40 columns cut the 32-bit words: each tile reads only the words it covers."""
    hidden, weight, labels, keep = _head_data()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = ak.linear_logprobs(h, w, labels, support=pack_bits(keep), return_entropy=True, backend=backend,
                                       temperature=0.8, **kw)  # fmt: skip
    (logp.sum() + 0.7 * entropy.sum()).backward()
    hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    want_logp, want_entropy, _ = _fp64_masked(hd @ wd.T, labels, keep, 0.8)
    ls = torch.log_softmax(((hd @ wd.T) / 0.8).masked_fill(~keep, float("-inf")), -1)
    valid = labels != -100
    ref = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0).sum() + 0.7 * torch.where(
        valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0).sum()  # fmt: skip
    ref.backward()
    assert max_rel_error(logp, want_logp, floor=1.0) < 2e-6 and max_rel_error(entropy, want_entropy, floor=1.0) < 2e-6
    assert max_rel_error(h.grad, hd.grad) < 2e-6 and max_rel_error(w.grad, wd.grad) < 2e-6
    assert bool((w.grad[~keep[valid].any(0)] == 0).all()), "vocab rows kept by no valid token get no gradient"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_label_outside_support_and_refusals(backend):
    hidden, weight, labels, keep = _head_data()
    keep[2, 0, labels[2, 0]] = False
    with pytest.raises(ValueError, match=r"position \(2, 0\) is outside its row's support"):
        ak.linear_logprobs(hidden, weight, labels, support=pack_bits(keep), backend=backend)
    logp = ak.linear_logprobs(hidden, weight, labels, support=pack_bits(keep), backend=backend, check_labels=False)
    assert logp[2, 0] == float("-inf") and bool(torch.isfinite(logp[1:2]).all())
    bits = pack_bits(keep)
    for kw, match in ((dict(backend="reference"), r"support= / top_k= are implemented on .*\('torch', 'triton'\)"),
                      (dict(backend=backend, return_stats=True), "with return_stats=True"),
                      (dict(backend=backend, support=bits[..., :2]), "support must have shape")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ak.linear_logprobs(hidden, weight, labels, **{"support": bits, "check_labels": False, **kw})


@pytest.mark.parametrize("block", [16, 48, 300])  # tiles of half a word, 1.5 words, the whole vocabulary
def test_linear_triton_fold_support_tiles_as_torch(block):
    """The Triton fold with ``support`` on tiles that cut the 32-bit words, bias, softcap and a label
    outside the set (unchecked): the torch fold's values and gradients (2e-6), zero ``grad_weight`` rows for
    tokens no valid row keeps."""
    hidden, weight, labels, keep = _head_data(seed=11)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(12)) * 0.3
    keep[..., 60:70] = False  # tokens kept by no row (bar a label)
    keep.scatter_(-1, labels.clamp(min=0)[..., None], True)
    keep[1, 3, labels[1, 3]] = False
    outs = []
    for backend in ("triton", "torch"):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        logp, entropy = ak.linear_logprobs(h, w, labels, bias=b, support=pack_bits(keep), return_entropy=True,
                                           backend=backend, softcap=3.0, check_labels=False, chunk_size=4,
                                           vocab_block_size=block)  # fmt: skip
        (torch.where(torch.isfinite(logp), logp, 0.0).sum() + 0.7 * entropy.sum()).backward()
        outs.append((logp.detach(), entropy.detach(), h.grad, w.grad, b.grad))
    assert outs[0][0][1, 3] == float("-inf")
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    unused = ~keep[labels != -100].any(0)
    assert bool(unused.any()) and bool((outs[0][3][unused] == 0).all()) and bool((outs[0][4][unused] == 0).all())


# ----------------------------------------------------------------------------------------------
# linear_logprobs(top_k=): the kept set formed in the trainer, streamed over the vocabulary blocks
# ----------------------------------------------------------------------------------------------
def _first_k_ids(row, k):
    """The spec, written out: sort by (value descending, token id ascending), keep the first k ids."""
    order = sorted(range(len(row)), key=lambda v: (-row[v], v))
    return set(order[:k])


def _keep_top_k(z, k):
    flat = z.reshape(-1, z.shape[-1]).tolist()
    keep = torch.zeros(len(flat), z.shape[-1], dtype=torch.bool)
    for r, row in enumerate(flat):
        keep[r, list(_first_k_ids(row, k))] = True
    return keep.view(z.shape)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(chunk_size=4, vocab_block_size=40), dict(), dict(batch_invariant=True)])
def test_linear_top_k_matches_fp64_masked_log_softmax(kw, backend):
    """A running top-k per row across vocab blocks of 40 (the k-th token often in a later block):
    values and gradients of fp64 masked ``log_softmax`` over each row's 9 largest logits."""
    hidden, weight, labels, _ = _head_data(seed=13)
    z64 = hidden.double() @ weight.double().T
    keep = _keep_top_k(z64, 9)
    labels = torch.where(labels == -100, labels, torch.where(keep, z64, float("inf")).argmin(-1))  # the 9th largest
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with NewBuffers() as seen:
        logp, entropy = ak.linear_logprobs(h, w, labels, top_k=9, return_entropy=True, backend=backend,
                                           temperature=0.8, **kw)  # fmt: skip
    (logp.sum() + 0.7 * entropy.sum()).backward()
    hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ls = torch.log_softmax(((hd @ wd.T) / 0.8).masked_fill(~keep, float("-inf")), -1)
    valid = labels != -100
    want_logp = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    want_entropy = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
    (want_logp.sum() + 0.7 * want_entropy.sum()).backward()
    assert max_rel_error(logp, want_logp, floor=1.0) < 2e-6 and max_rel_error(entropy, want_entropy, floor=1.0) < 2e-6
    assert max_rel_error(h.grad, hd.grad) < 2e-6 and max_rel_error(w.grad, wd.grad) < 2e-6
    if "chunk_size" in kw:  # tiles of 4 x 40: nothing of [N, V] (the running top-k is [4, 9 + 40])
        assert max(seen.sizes) < B * T * V / 2, "no [N, V] buffer"
    with pytest.raises(ValueError, match=r"position \(0, 0\) is outside its row's support"):
        ak.linear_logprobs(hidden, weight, torch.where(valid, z64.argmin(-1), -100), top_k=9, backend=backend, **kw)


@pytest.mark.parametrize("k", [3, 6])
def test_top_k_ties_go_to_the_lowest_token_ids_on_every_path(k):
    """Integer hidden states and weights (exact logits, many equal values, ties across vocab blocks):
    ``token_logprobs(top_k=)`` on every backend and ``linear_logprobs(top_k=)`` streamed over blocks of 16
    keep the same set, the k largest with ties at the k-th value to the lowest ids (the written-out spec)."""
    g = torch.Generator().manual_seed(14)
    hidden = torch.randint(-2, 3, (B, T, 4), generator=g).float()
    weight = torch.randint(-1, 2, (V, 4), generator=g).float()
    z = hidden @ weight.T
    keep = _keep_top_k(z, k)
    assert bool(((z == torch.where(keep, z, float("inf")).amin(-1, keepdim=True)) & ~keep).any()), "ties cut by k"
    labels = torch.where(keep, torch.arange(V), -1).amax(-1)  # the kept token with the highest id
    labels[0, 1] = -100
    want = _fp64_masked(z, labels, keep, 1.0)[:2]
    got = [ak.token_logprobs(z, labels, top_k=k, backend=b, return_entropy=True) for b in BACKENDS]
    got += [ak.linear_logprobs(hidden, weight, labels, top_k=k, backend=b, return_entropy=True, vocab_block_size=16,
                               chunk_size=4) for b in ("torch", "triton")]  # fmt: skip
    for logp, entropy in got:
        assert max_rel_error(logp, want[0], floor=1.0) < 2e-6 and max_rel_error(entropy, want[1], floor=1.0) < 2e-6


def test_linear_top_k_refusals():
    hidden, weight, labels, _ = _head_data()
    lora = (torch.zeros(2, H), torch.zeros(V, 2), 1.0)
    for kw, exc, match in ((dict(top_k=3, lora=lora), ValueError, "top_k= is not supported with lora="),
                           (dict(top_k=3, return_stats=True), ValueError, "with return_stats=True"),
                           (dict(top_k=3, backend="reference"), ValueError, "support= / top_k= are implemented"),
                           (dict(top_k=0), ValueError, r"top_k must be in \[1, V=77\]"),
                           (dict(top_k=2.5), TypeError, "top_k must be an int"),
                           (dict(top_k=3, support=pack_bits(torch.ones(B, T, V, dtype=torch.bool))), ValueError,
                            "not both")):  # fmt: skip
        with pytest.raises(exc, match=match):
            ak.linear_logprobs(hidden, weight, labels, **{"backend": "torch", "check_labels": False, **kw})


# ----------------------------------------------------------------------------------------------
# A row with no kept token at all (check_labels=False): one limit on every backend -- logp -inf (as any
# label outside the set), entropy 0, every gradient exactly 0, no NaN; the other rows untouched
# ----------------------------------------------------------------------------------------------
EMPTY = [(0, 3), (2, 0), (2, 4)]  # (2, 4) is also an ignored position: 0, as any ignored row


def _with_empty_rows(seed):
    logits, labels, keep = _data(seed)
    for b, t in EMPTY:
        keep[b, t] = False
    empty = ~keep.any(-1) & (labels != -100)
    assert int(empty.sum()) == 2
    return logits, labels, keep, empty


def _fp64_other_rows(logits_fn, inputs, labels, keep, empty, g_logp, g_ent):
    """fp64 masked ``log_softmax`` of the rows that keep something (the empty rows ignored): logp,
    entropy and the gradients of ``Σ g_logp·logp + Σ g_ent·H`` w.r.t. ``inputs``."""
    xs = [t.detach().double().requires_grad_(True) for t in inputs]
    ls = torch.log_softmax(logits_fn(*xs).masked_fill(~keep, float("-inf")), -1)
    valid = (labels != -100) & ~empty
    logp = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
    grads = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), xs)
    return logp, ent, grads


EMPTY_ROW_BACKENDS = {"triton": ("triton", {}), "triton_tiles16": ("triton", {}), "torch": ("torch", {}),
                      "torch_batch_invariant": ("torch", dict(batch_invariant=True)), "reference": ("reference", {})}


@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])  # which outputs the loss uses
@pytest.mark.parametrize("variant", list(EMPTY_ROW_BACKENDS))
def test_row_with_no_kept_token_is_minus_inf_zero_zero(variant, outputs, monkeypatch):
    """Two rows with no kept token (and an ignored one): the label check names the first; unchecked,
    logp ``-inf``, entropy 0 and a zero gradient row (upstream gradients nonzero), no NaN; the other rows
    within 2e-6 of fp64 masked ``log_softmax``."""
    backend, kw = EMPTY_ROW_BACKENDS[variant]
    if variant == "triton_tiles16":  # tiles of half a word: several empty tiles per row
        monkeypatch.setattr(_logits_engine, "pick_config", lambda _: (16, 1))
    logits, labels, keep, empty = _with_empty_rows(seed=13)
    g = torch.Generator().manual_seed(14)
    g_logp = torch.randn(B, T, generator=g) if outputs != "entropy" else torch.zeros(B, T)
    g_ent = torch.randn(B, T, generator=g) if outputs != "logp" else torch.zeros(B, T)
    with pytest.raises(ValueError, match=r"position \(0, 3\) is outside its row's support"):
        ak.token_logprobs(logits, labels, support=pack_bits(keep), backend=backend, **kw)
    x = logits.clone().requires_grad_(True)
    logp, ent = ak.token_logprobs(x, labels, support=pack_bits(keep), return_entropy=True, backend=backend,
                                  check_labels=False, temperature=0.8, **kw)  # fmt: skip
    used = {"logp": [(logp, g_logp)], "entropy": [(ent, g_ent)], "both": [(logp, g_logp), (ent, g_ent)]}[outputs]
    torch.autograd.backward([o for o, _ in used], [w for _, w in used])
    assert bool(torch.isneginf(logp[empty]).all()), logp[empty]
    assert bool((ent[empty] == 0).all()) and bool((x.grad[empty] == 0).all())
    assert not any(bool(t.isnan().any()) for t in (logp, ent, x.grad))
    want_logp, want_ent, (want_grad,) = _fp64_other_rows(lambda z: z / 0.8, [logits], labels, keep, empty,
                                                         g_logp.double(), g_ent.double())  # fmt: skip
    assert max_rel_error(logp[~empty], want_logp[~empty], floor=1.0) < 2e-6
    assert max_rel_error(ent[~empty], want_ent[~empty], floor=1.0) < 2e-6
    assert max_rel_error(x.grad[~empty], want_grad[~empty]) < 2e-6


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_row_of_minus_inf_logits_is_the_same_limit(backend):
    """The rule is the softmax cores', not ``support``'s: a row whose logits are all ``-inf`` (no
    ``support=``) has no mass either and gets logp ``-inf``, entropy 0, gradient 0."""
    logits, labels, _ = _data(seed=15)
    logits[1, 2] = float("-inf")
    x = logits.clone().requires_grad_(True)
    logp, ent = ak.token_logprobs(x, labels, return_entropy=True, backend=backend)
    torch.autograd.backward([logp, ent], [torch.ones(B, T), torch.ones(B, T)])
    assert logp[1, 2] == float("-inf") and ent[1, 2] == 0 and bool((x.grad[1, 2] == 0).all())
    assert not any(bool(t.isnan().any()) for t in (logp, ent, x.grad))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(chunk_size=4, vocab_block_size=40), dict(), dict(batch_invariant=True)])
def test_linear_row_with_no_kept_token_is_minus_inf_zero_zero(kw, backend):
    """``linear_logprobs``: the empty rows' logp ``-inf``, entropy 0, ``grad_hidden`` rows 0; they add
    nothing to ``grad_weight``; the other rows as fp64 masked ``log_softmax``."""
    hidden, weight, _, _ = _head_data(seed=16)
    _, labels, keep, empty = _with_empty_rows(seed=16)
    g = torch.Generator().manual_seed(17)
    g_logp, g_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, ent = ak.linear_logprobs(h, w, labels, support=pack_bits(keep), return_entropy=True, backend=backend,
                                   check_labels=False, temperature=0.8, **kw)  # fmt: skip
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    assert bool(torch.isneginf(logp[empty]).all()) and bool((ent[empty] == 0).all())
    assert bool((h.grad[empty] == 0).all())
    assert not any(bool(t.isnan().any()) for t in (logp, ent, h.grad, w.grad))
    want_logp, want_ent, (want_h, want_w) = _fp64_other_rows(lambda a, b: (a @ b.T) / 0.8, [hidden, weight], labels,
                                                             keep, empty, g_logp.double(), g_ent.double())  # fmt: skip
    assert max_rel_error(logp[~empty], want_logp[~empty], floor=1.0) < 2e-6
    assert max_rel_error(ent[~empty], want_ent[~empty], floor=1.0) < 2e-6
    assert max_rel_error(h.grad, want_h) < 2e-6 and max_rel_error(w.grad, want_w) < 2e-6


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_linear_stats_of_a_head_with_no_mass(backend):
    """``linear_logprobs(return_stats=True)`` with every logit ``-inf`` (a ``-inf`` bias): the same limit
    in every statistic -- logp ``-inf``, entropy 0, ``log Σp²`` ``-inf`` (``Σp²`` over nothing is 0; it
    was NaN on every backend), ``lse`` ``-inf``, never top-1 -- and zero gradients, no NaN."""
    hidden, weight, _, _ = _head_data(seed=18)
    labels = torch.randint(0, weight.shape[0], hidden.shape[:-1], generator=torch.Generator().manual_seed(18))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    bias = torch.full((weight.shape[0],), float("-inf"))
    out = ak.linear_logprobs(h, w, labels, bias=bias, return_stats=True, backend=backend)
    (out.logp.sum() + out.entropy.sum()).backward()
    assert bool(torch.isneginf(out.logp).all()) and bool((out.entropy == 0).all())
    assert bool(torch.isneginf(out.log_sum_sq_probs).all()) and bool(torch.isneginf(out.lse).all())
    assert not bool(out.is_top1.any())
    assert bool((h.grad == 0).all()) and bool((w.grad == 0).all())
