"""``batch_invariant=True`` on the fused losses: a token's logp, entropy and ``grad_hidden`` row are
bitwise the same whatever batch it is computed in.

Property (hypothesis, derandomized): a pool of 48 tokens, each with its own hidden state, label,
sampling log-prob and advantage, is computed once as one packed batch; random sub-batches (1..48
tokens, shuffled, packed ``[1, n]`` or padded ``[B, T]`` with junk hidden states / ids / advantages
in the padding, random ``chunk_size``, gradients on or off) must reproduce every token's per-token
outputs and gradient row bit for bit. The losses are taken in configurations whose per-token
gradient depends on that token only (``reduction="sum"``; ``dapo`` with a fixed
``num_items_in_batch``; ``loss_agg_mode="token-sum"``), so a token's gradient row is a function of
the token alone and may be compared. Three-GEMM head (``ops/three_gemm.py``
``batch_invariant_plan``) and four-GEMM head (``linear_logprobs``), torch and triton (interpreter),
also with a trainable LoRA adapter on the head (``lora=``; ``ops/_lora.py`` ``LoraConcat`` / ``LoraTiles``).

The weight gradient is a sum over rows: it is promised (and checked) bitwise equal only for the
same valid rows in the same order, whatever padding / packing / ``chunk_size`` surrounds them.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignkernels as ak
from alignkernels.flops import MatmulFlopCounter
from alignkernels.ops import _lmhead_engine as engine
from alignkernels.ops import three_gemm
from helpers import TRITON_DEVICE, max_rel_error

POOL, H, V = 48, 16, 300
SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture
def small_tiles(monkeypatch):
    """The fixed plans shrunk so that tiny batches span several tiles: 16-row chunks (three GEMMs and
    ``linear_logprobs``), 128-column vocabulary blocks (``linear_logprobs``: three blocks at V = 300)."""
    monkeypatch.setattr(engine, "BATCH_INVARIANT_ROWS", {"cpu": 16, "cuda": 16})
    monkeypatch.setattr(engine, "BATCH_INVARIANT_BLOCK", 128)
    monkeypatch.setattr(three_gemm, "BATCH_INVARIANT_ROWS", {"cpu": 16, "cuda": 16})


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _pool(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(POOL, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (POOL,), generator=g)
    true_logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, labels[:, None]).squeeze(1)
    old_logp = (true_logp + 0.3 * torch.randn(POOL, generator=g, dtype=torch.float64)).float()  # some ratios clip
    adv = torch.randn(POOL, generator=g)
    lora_A, lora_B = torch.randn(3, H, generator=g) * 0.3, torch.randn(V, 3, generator=g) * 0.3  # rank 3, with lora=
    return {k: v.to(device) for k, v in dict(hidden=hidden, weight=weight, labels=labels, old=old_logp, adv=adv,
                                             lora_A=lora_A, lora_B=lora_B).items()}  # fmt: skip


LORA_SCALING = 0.7


@st.composite
def layouts(draw, pool_size=POOL):
    """Tokens ``idx`` (shuffled) at positions ``pos`` of a packed ``[1, n]`` or padded ``[B, T]`` batch."""
    n = draw(st.sampled_from([1, 2, 3, 15, 16, 17, 31, 33, pool_size]))
    idx = draw(st.permutations(range(pool_size)))[:n]
    if draw(st.booleans()):
        shape, pos = (1, n), [(0, i) for i in range(n)]
    else:
        B = draw(st.integers(1, n))
        T = math.ceil(n / B) + draw(st.integers(0, 3))
        cells = draw(st.permutations([(b, t) for b in range(B) for t in range(T)]))
        shape, pos = (B, T), sorted(cells[:n])
    return dict(idx=idx, shape=shape, pos=pos, seed=draw(st.integers(0, 2**20)),
                chunk_size=draw(st.sampled_from([None, 1, 5, 64])), grad=draw(st.booleans()))  # fmt: skip


def _batch(pool, lay):
    """The layout filled from the pool; junk everywhere else (label / mask marks it)."""
    g = torch.Generator().manual_seed(lay["seed"])
    device, shape = pool["hidden"].device, lay["shape"]
    x = dict(hidden=(torch.randn(*shape, H, generator=g) * 5).to(device),
             ids=torch.randint(0, V, shape, generator=g).to(device), labels=torch.full(shape, -100, device=device),
             old=(-torch.rand(shape, generator=g) * 9).to(device), adv=(torch.randn(shape, generator=g) * 7).to(device))
    for (b, t), i in zip(lay["pos"], lay["idx"]):
        x["hidden"][b, t], x["ids"][b, t], x["labels"][b, t] = pool["hidden"][i], pool["labels"][i], pool["labels"][i]
        x["old"][b, t], x["adv"][b, t] = pool["old"][i], pool["adv"][i]
    x["mask"] = (x["labels"] != -100).long()
    return x


LOSSES = {
    # name -> (hidden, weight, batch dict, backend, kw) -> (loss, per-token tensors compared bitwise)
    "cross_entropy": lambda h, w, x, backend, kw: _ce(h, w, x, backend, kw),
    "grpo_dapo": lambda h, w, x, backend, kw: (ak.fused_linear_grpo_loss(
        h, w, x["ids"], x["adv"], x["mask"], old_logp=x["old"], loss_type="dapo", num_items_in_batch=100,
        epsilon_high=0.28, backend=backend, **kw)[0], {}),
    "grpo_four_gemm": lambda h, w, x, backend, kw: (ak.fused_linear_grpo_loss(
        h, w, x["ids"], x["adv"], x["mask"], old_logp=x["old"], loss_type="dapo", num_items_in_batch=100,
        head_path="four_gemm", backend=backend, **kw)[0], {}),
    "ppo_token_sum": lambda h, w, x, backend, kw: (ak.fused_linear_ppo_loss(
        h, w, x["ids"], x["old"], x["adv"], x["mask"], loss_agg_mode="token-sum", backend=backend, **kw)[0], {}),
    "verl_vanilla": lambda h, w, x, backend, kw: (ak.fused_linear_verl_policy_loss(
        h, w, x["ids"], x["old"], x["adv"], x["mask"], loss_agg_mode="token-sum", backend=backend, **kw)[0], {}),
}  # fmt: skip


def _ce(h, w, x, backend, kw):
    out = ak.fused_linear_cross_entropy(h, w, x["labels"], reduction="sum", return_stats=True, backend=backend, **kw)
    return out.loss, dict(logp=out.logp, entropy=out.entropy, is_top1=out.is_top1)


def _run(loss, pool, x, backend, grad, chunk_size=None, weight_grad=False, lora=False):
    h = x["hidden"].clone().requires_grad_(grad)
    w = pool["weight"].clone().requires_grad_(grad and weight_grad)
    kw = dict(batch_invariant=True, chunk_size=chunk_size)
    if lora:  # the adapter trains (its gradient GEMMs run too)
        kw["lora"] = (pool["lora_A"].clone().requires_grad_(grad), pool["lora_B"].clone().requires_grad_(grad),
                      LORA_SCALING)  # fmt: skip
    if grad:
        value, per_token = LOSSES[loss](h, w, x, backend, kw)
        value.backward()
        return per_token, h.grad, w.grad
    with torch.no_grad():
        _, per_token = LOSSES[loss](h, w, x, backend, kw)
    return per_token, None, None


def _check(loss, backend, lay, full, lora=False):
    pool, (want, want_grad) = full
    x = _batch(pool, lay)
    per_token, gh, _ = _run(loss, pool, x, backend, lay["grad"], lay["chunk_size"], lora=lora)
    b, t = zip(*lay["pos"])
    what = f"{loss} {backend} n={len(lay['idx'])} shape={lay['shape']} grad={lay['grad']} chunk={lay['chunk_size']}"
    for name, got in per_token.items():
        assert torch.equal(got[b, t], want[name][0, lay["idx"]]), (name, what)
        assert bool((got[x["labels"] == -100] == 0).all()), (name, what)
    if lay["grad"]:
        assert torch.equal(gh[b, t], want_grad[0, lay["idx"]]), what
        assert bool((gh[x["mask"] == 0] == 0).all()), what


_FULL: dict = {}


def _full(loss, backend, lora=False):
    """The pool as one packed batch (cached per loss, backend and lora); its values checked against fp64."""
    if (loss, backend, lora) not in _FULL:
        pool = _pool(_device(backend))
        lay = dict(idx=list(range(POOL)), shape=(1, POOL), pos=[(0, i) for i in range(POOL)], seed=0)
        per_token, gh, _ = _run(loss, pool, _batch(pool, lay), backend, True, lora=lora)
        if "logp" in per_token:  # the bits compared below are the right ones: fp64 eager reference
            ref_lora = dict(lora=(pool["lora_A"].cpu().double(), pool["lora_B"].cpu().double(), LORA_SCALING)) \
                if lora else {}  # fmt: skip
            ref = ak.linear_logprobs(pool["hidden"].cpu().double(), pool["weight"].cpu().double(), pool["labels"].cpu(),
                                     return_entropy=True, backend="reference", **ref_lora)  # fmt: skip
            assert max_rel_error(per_token["logp"][0], ref[0], floor=1.0) < 2e-6
            assert max_rel_error(per_token["entropy"][0], ref[1], floor=1.0) < 2e-6
        _FULL[(loss, backend, lora)] = pool, (per_token, gh)
    return _FULL[(loss, backend, lora)]


@pytest.mark.parametrize("loss", list(LOSSES))
@given(lay=layouts())
@settings(max_examples=12, **SETTINGS)
def test_fused_loss_rows_are_batch_invariant_torch(loss, lay, small_tiles):
    _check(loss, "torch", lay, _full(loss, "torch"))


@pytest.mark.parametrize("loss", ["cross_entropy", "grpo_dapo", "grpo_four_gemm"])
@given(lay=layouts())
@settings(max_examples=3, **SETTINGS)
def test_fused_loss_rows_are_batch_invariant_triton(loss, lay, small_tiles):
    _check(loss, "triton", lay, _full(loss, "triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["cross_entropy", "grpo_dapo", "grpo_four_gemm"])
@given(lay=layouts())
@settings(max_examples=4, **SETTINGS)
def test_fused_loss_rows_are_batch_invariant_with_lora(loss, backend, lay, small_tiles):
    """A LoRA adapter on the head: three-GEMM head (``LoraConcat``, K = H + r, ``u`` per chunk of the
    padded rows) and four-GEMM head (``LoraTiles``)."""
    _check(loss, backend, lay, _full(loss, backend, lora=True), lora=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_gradient_is_layout_invariant(backend, small_tiles):
    """``grad_weight`` sums over the rows: the same 33 valid rows in the same order, packed ``[1, 33]``
    or scattered over a padded ``[5, 9]`` batch with junk, ``chunk_size`` 1 or 64, give the same bits."""
    pool = _pool(_device(backend))
    idx = list(range(33))
    packed = dict(idx=idx, shape=(1, 33), pos=[(0, i) for i in idx], seed=1)
    cells = [(b, t) for b in range(5) for t in range(9) if (b * 9 + t) % 4 != 3][:33]  # row-major: same order
    padded = dict(idx=idx, shape=(5, 9), pos=cells, seed=2)
    for loss in ("cross_entropy", "grpo_dapo"):
        _, _, gw_packed = _run(loss, pool, _batch(pool, packed), backend, True, chunk_size=1, weight_grad=True)
        _, _, gw_padded = _run(loss, pool, _batch(pool, padded), backend, True, chunk_size=64, weight_grad=True)
        assert torch.equal(gw_packed, gw_padded), loss


def test_padded_plan_flops_are_counted():
    """The three-GEMM head pads the valid rows to whole chunks of R rows (R = 512 on the CPU at this V):
    ``6·ceil(n/R)·R·H·V`` matmul FLOPs with gradients, ``2·ceil(n/R)·R·H·V`` under ``no_grad``,
    against ``6·n·H·V`` / ``2·n·H·V`` by default."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g).requires_grad_(True)
    for n in (1, 512, 600):
        hidden = torch.randn(n, H, generator=g).requires_grad_(True)
        labels = torch.randint(0, V, (n,), generator=g)
        padded = math.ceil(n / 512) * 512
        for invariant, rows in ((True, padded), (False, n)):
            with MatmulFlopCounter() as flops:
                ak.fused_linear_cross_entropy(hidden, weight, labels, backend="torch", batch_invariant=invariant)
            assert flops.total == 6 * rows * H * V, (n, invariant, flops.by_op)
            with torch.no_grad(), MatmulFlopCounter() as flops:
                ak.fused_linear_cross_entropy(hidden, weight, labels, backend="torch", batch_invariant=invariant)
            assert flops.total == 2 * rows * H * V, (n, invariant, flops.by_op)


def test_dpo_sequence_logps_are_batch_invariant(small_tiles):
    """DPO (``linear_logprobs`` with ``return_stats``): three pairs in one ``[6, 10]`` batch give the
    ``logps/chosen`` / ``logps/rejected`` (means over pairs) of the three pairs run alone in ``[2, 7]``
    batches: each pair's sequence log-prob is a sum of bitwise-equal per-token log-probs."""
    pool = _pool("cpu")
    T = 6
    g = torch.Generator().manual_seed(3)
    labels = torch.full((6, T + 4), -100)
    hidden = torch.randn(6, T + 4, H, generator=g) * 5  # junk in the padding
    for r in range(6):  # rows 0-2 chosen, 3-5 rejected; pair i = rows (i, i + 3)
        labels[r, :T] = pool["labels"][r * T:(r + 1) * T]
        hidden[r, :T] = pool["hidden"][r * T:(r + 1) * T]

    def metrics(rows, width):
        B = len(rows) // 2
        _, m = ak.fused_linear_dpo_loss(hidden[rows][:, :width], pool["weight"], labels[rows][:, :width],
                                        ref_chosen_logps=torch.zeros(B), ref_rejected_logps=torch.zeros(B),
                                        batch_invariant=True)  # fmt: skip
        return m

    batch = metrics(list(range(6)), T + 4)
    alone = [metrics([i, i + 3], T + 1) for i in range(3)]
    for key in ("logps/chosen", "logps/rejected"):
        assert torch.equal(batch[key], torch.stack([m[key] for m in alone]).mean()), key


@pytest.mark.parametrize("loss", list(LOSSES) + ["dpo"])
def test_refusals_are_named(loss):
    pool = _pool("cpu")
    x = _batch(pool, dict(idx=[0, 1, 2], shape=(1, 3), pos=[(0, 0), (0, 1), (0, 2)], seed=0))
    h, w = x["hidden"], pool["weight"]

    def call(**kw):
        if loss == "dpo":
            labels = torch.cat([x["labels"], x["labels"]])
            return ak.fused_linear_dpo_loss(torch.cat([h, h]), w, labels, ref_chosen_logps=torch.zeros(1),
                                            ref_rejected_logps=torch.zeros(1), **kw)  # fmt: skip
        backend = kw.pop("backend", "torch")
        return LOSSES[loss](h, w, x, backend, kw)

    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        call(batch_invariant="yes")
    with pytest.raises(ValueError, match=r"batch_invariant=True is implemented on the backends .* got backend='reference'"):
        call(batch_invariant=True, backend="reference")
    lora = (torch.zeros(2, H), torch.zeros(V, 2), 1.0)  # lora= runs (test_..._with_lora), not on reference
    with pytest.raises(ValueError, match=r"batch_invariant=True is implemented on .* got backend='reference'"):
        call(batch_invariant=True, lora=lora, backend="reference")


@pytest.mark.gpu
def test_gpu_fused_cross_entropy_rows_are_batch_invariant():
    """On CUDA (cuBLAS GEMMs at the plan's one shape, Triton folds), bf16: a shuffled sub-batch of a
    2000-token pool reproduces every token's logp, entropy and grad_hidden row bit for bit -- the check
    that cuBLAS's kernel for that shape reduces every output tile in the same order."""
    device = "cuda"
    n, h, v = 2000, 1024, 32000
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).bfloat16()
    weight = (torch.randn(v, h, device=device, generator=g) * 0.03).bfloat16()
    labels = torch.randint(0, v, (n,), device=device, generator=g)

    def run(rows):
        x = hidden[rows].clone().requires_grad_(True)
        out = ak.fused_linear_cross_entropy(x, weight, labels[rows], reduction="sum", return_stats=True,
                                            backend="triton", batch_invariant=True)  # fmt: skip
        out.loss.backward()
        return out.logp, out.entropy, x.grad

    full = run(torch.arange(n, device=device))
    perm = torch.randperm(n, device=device, generator=g)
    for k in (1, 300, 1500):
        part = run(perm[:k])
        for name, got, want in zip(("logp", "entropy", "grad_hidden"), part, full):
            assert torch.equal(got, want[perm[:k]]), (name, k)
