"""Reliability of ``linear_logprobs`` (hidden states + lm_head -> per-token log-probs): clear errors
for bad inputs, right answers on edge cases, NaN isolation, on the torch, triton (interpreter on CPU)
and reference backends. Truth: the materialised computation in float64."""
import math

import pytest
import torch

import alignkernels
from helpers import HAS_CUDA, TRITON_DEVICE

BACKENDS = ["torch", "triton", "reference"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else ("cuda" if HAS_CUDA else "cpu")


def _make(shape, H, V, dtype=torch.float32, device="cpu", seed=0, bias=False, ignore_frac=0.0, w_scale=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (w_scale if w_scale is not None else 2.0 / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    to = dict(dtype=dtype, device=device)
    return hidden.to(**to), weight.to(**to), (b.to(**to) if b is not None else None), labels.to(device)


def _run(backend, hidden, weight, labels, bias=None, upstream=(1.0, 1.0), **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    logp, ent = alignkernels.linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend=backend, **kw)
    loss = (logp * upstream[0]).sum() + ((ent * upstream[1]).sum() if upstream[1] else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _truth(hidden, weight, labels, bias=None, upstream=(1.0, 1.0), temperature=1.0, logit_scale=1.0, softcap=None):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    z = h @ w.T + (b if b is not None else 0.0)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logsm = torch.log_softmax(z, -1)
    valid = labels != -100
    safe = torch.where(valid, labels, 0).long()
    logp = torch.where(valid, logsm.gather(-1, safe[..., None])[..., 0], 0.0)
    ent = torch.where(valid, -(logsm.exp() * logsm.masked_fill(logsm == float("-inf"), 0.0)).sum(-1), 0.0)
    ((logp * upstream[0]).sum() + (ent * upstream[1]).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _close(got, want, rtol=1e-5, atol=1e-5, scale=False):
    if want is None:
        assert got is None
        return
    a = atol * (max(want.abs().max().item(), 1.0) if scale and want.numel() else 1.0)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=a)


# ==============================================================================================
# Bad inputs
# ==============================================================================================
def _kw(**kw):
    return dict(kw)


BAD_INPUTS = [
    ("int-hidden", lambda h, w, y: ((h.long(), w, y), {}), TypeError, "hidden must be a floating"),
    ("int-weight", lambda h, w, y: ((h, w.int(), y), {}), TypeError, "weight must be a floating"),
    ("bool-hidden", lambda h, w, y: ((h > 0, w, y), {}), TypeError, "hidden must be a floating"),
    ("list-hidden", lambda h, w, y: ((h.tolist(), w, y), {}), TypeError, "hidden must be a torch.Tensor"),
    ("float-labels", lambda h, w, y: ((h, w, y.float()), {}), TypeError, "labels must be an integer"),
    ("bool-labels", lambda h, w, y: ((h, w, y > 3), {}), TypeError, "labels must be an integer"),
    ("int-bias", lambda h, w, y: ((h, w, y), _kw(bias=torch.zeros(w.shape[0], dtype=torch.long))), TypeError,
     "bias must be a floating"),
    ("scalar-hidden", lambda h, w, y: ((h[0, 0, 0], w, y[0, 0]), {}), ValueError, "hidden must have at least 1"),
    ("weight-1d", lambda h, w, y: ((h, w[0], y), {}), ValueError, "weight must be 2-D"),
    ("weight-3d", lambda h, w, y: ((h, w[None], y), {}), ValueError, "weight must be 2-D"),
    ("weight-transposed", lambda h, w, y: ((h, w.T.contiguous(), y), {}), ValueError, "must equal weight.shape"),
    ("V=0", lambda h, w, y: ((h, w[:0], y), {}), ValueError, "non-empty vocabulary"),
    ("H-mismatch", lambda h, w, y: ((h[..., :-1], w, y), {}), ValueError, "must equal weight.shape"),
    ("labels-short", lambda h, w, y: ((h, w, y[:, :-1]), {}), ValueError, "labels must have shape"),
    ("labels-flat", lambda h, w, y: ((h, w, y.reshape(-1)), {}), ValueError, "labels must have shape"),
    ("dtype-mismatch", lambda h, w, y: ((h.double(), w, y), {}), TypeError, "same dtype"),
    ("bias-shape", lambda h, w, y: ((h, w, y), _kw(bias=torch.zeros(w.shape[0] + 1))), ValueError,
     "bias must have shape"),
    ("bias-2d", lambda h, w, y: ((h, w, y), _kw(bias=torch.zeros(1, w.shape[0]))), ValueError, "bias must have shape"),
    ("bias-dtype", lambda h, w, y: ((h, w, y), _kw(bias=torch.zeros(w.shape[0], dtype=torch.float64))), TypeError,
     "bias must have the weight's dtype"),
    ("weight-meta", lambda h, w, y: ((h, w.to("meta"), y), {}), ValueError, "same device"),
    ("labels-meta", lambda h, w, y: ((h, w, y.to("meta")), {}), ValueError, "same device"),
    ("bias-meta", lambda h, w, y: ((h, w, y), _kw(bias=torch.zeros(w.shape[0], device="meta"))), ValueError,
     "same device"),
    ("label=V", lambda h, w, y: ((h, w, torch.full_like(y, w.shape[0])), {}), ValueError,
     r"labels must be in \[0, 13\)"),
    ("label=-1", lambda h, w, y: ((h, w, torch.full_like(y, -1)), {}), ValueError, "found -1"),
    ("T=0", lambda h, w, y: ((h, w, y), _kw(temperature=0.0)), ValueError, "temperature"),
    ("T=nan", lambda h, w, y: ((h, w, y), _kw(temperature=float("nan"))), ValueError, "temperature"),
    ("T=-inf", lambda h, w, y: ((h, w, y), _kw(temperature=-float("inf"))), ValueError, "temperature"),
    ("logit_scale=nan", lambda h, w, y: ((h, w, y), _kw(logit_scale=float("nan"))), ValueError, "logit_scale"),
    ("logit_scale=inf", lambda h, w, y: ((h, w, y), _kw(logit_scale=float("inf"))), ValueError, "logit_scale"),
    ("softcap=0", lambda h, w, y: ((h, w, y), _kw(softcap=0.0)), ValueError, "softcap"),
    ("softcap<0", lambda h, w, y: ((h, w, y), _kw(softcap=-30.0)), ValueError, "softcap"),
    ("softcap=nan", lambda h, w, y: ((h, w, y), _kw(softcap=float("nan"))), ValueError, "softcap"),
    ("chunk_size=0", lambda h, w, y: ((h, w, y), _kw(chunk_size=0)), ValueError, "chunk_size"),
    ("chunk_size=-4", lambda h, w, y: ((h, w, y), _kw(chunk_size=-4)), ValueError, "chunk_size"),
    ("chunk_size=2.5", lambda h, w, y: ((h, w, y), _kw(chunk_size=2.5)), ValueError, "chunk_size"),
    ("chunk_size=True", lambda h, w, y: ((h, w, y), _kw(chunk_size=True)), ValueError, "chunk_size"),
    ("vocab_block=0", lambda h, w, y: ((h, w, y), _kw(vocab_block_size=0)), ValueError, "vocab_block_size"),
    ("backend-unknown", lambda h, w, y: ((h, w, y), _kw(backend="xla")), ValueError, "backend must be one of"),
    ("fp64-triton", lambda h, w, y: ((h.double(), w.double(), y), _kw(backend="triton")), TypeError,
     "float16/bfloat16/float32"),
]
BAD_IDS = [c[0] for c in BAD_INPUTS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_raises_clear_error(case, backend):
    _, make, exc, match = case
    hidden, weight, _, labels = _make((2, 3), 8, 13)
    args, kwargs = make(hidden, weight, labels)
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(exc, match=match):
        alignkernels.linear_logprobs(*args, **kwargs)


# ==============================================================================================
# Layouts, sizes
# ==============================================================================================
def _layouts():
    g = torch.Generator().manual_seed(4)
    H, V = 12, 37
    w = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (3, 4), generator=g)
    yield "hidden-transposed", torch.randn(4, 3, H, generator=g).transpose(0, 1), w, labels
    yield "hidden-H-strided", torch.randn(3, 4, 2 * H, generator=g)[..., ::2], w, labels
    yield "hidden-expanded-stride0", torch.randn(1, 4, H, generator=g).expand(3, 4, H), w, labels
    yield "hidden-row-expanded", torch.randn(H, generator=g).expand(3, 4, H), w, labels
    yield "weight-transposed-view", torch.randn(3, 4, H, generator=g), torch.randn(H, V, generator=g).T * 0.5, labels
    yield "weight-row-strided", torch.randn(3, 4, H, generator=g), torch.randn(2 * V, H, generator=g)[::2] * 0.5, labels
    yield "weight-expanded", torch.randn(3, 4, H, generator=g), torch.randn(1, H, generator=g).expand(V, H), labels
    yield "labels-expanded", torch.randn(3, 4, H, generator=g), w, labels[:1].expand(3, 4)


LAYOUTS = list(_layouts())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_noncontiguous_and_expanded_inputs(backend, case):
    _, hidden, weight, labels = case
    d = _device(backend)
    hidden, weight, labels = hidden.to(d), weight.to(d), labels.to(d)
    got = _run(backend, hidden, weight, labels, upstream=(1.0, 0.5))
    want = _truth(hidden, weight, labels, upstream=(1.0, 0.5))
    for g_, w_ in zip(got, want):
        _close(g_, w_, rtol=1e-5, atol=1e-5, scale=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 5)], ids=["N0", "B2T0", "B0T5"])
def test_empty_batch(backend, shape):
    hidden, weight, bias, labels = _make(shape, 8, 13, device=_device(backend), bias=True)
    logp, ent, gh, gw, gb = _run(backend, hidden, weight, labels, bias=bias)
    assert logp.shape == labels.shape and ent.shape == labels.shape
    assert gh.shape == hidden.shape
    for g_ in (gw, gb):
        assert g_ is None or (torch.all(g_ == 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_of_one(backend):
    hidden, weight, bias, labels = _make((4,), 8, 1, device=_device(backend), bias=True)
    logp, ent, gh, gw, gb = _run(backend, hidden, weight, labels, bias=bias)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    for g_ in (gh, gw, gb):
        assert torch.all(g_ == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [0.0, 1e4, float("nan"), float("inf")], ids=["0", "1e4", "nan", "inf"])
def test_all_ignored_zero_outputs_and_gradients(backend, fill):
    if backend == "reference" and not math.isfinite(fill):
        pytest.skip("reference = eager matmul + log_softmax: NaN hidden in ignored rows reaches grad_weight")
    hidden, weight, bias, labels = _make((2, 3), 8, 13, device=_device(backend), bias=True)
    hidden.fill_(fill)
    labels.fill_(-100)
    logp, ent, gh, gw, gb = _run(backend, hidden, weight, labels, bias=bias)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    for g_ in (gh, gw, gb):
        assert torch.all(g_ == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_vocab_262144_few_rows(backend):
    hidden, weight, bias, labels = _make((3,), 8, 262144, device=_device(backend), bias=True, seed=9)
    labels[2] = 262143
    got = _run(backend, hidden, weight, labels, bias=bias, upstream=(1.0, 0.3))
    want = _truth(hidden, weight, labels, bias=bias, upstream=(1.0, 0.3))
    tol = dict(rtol=1e-4, atol=5e-5) if backend == "reference" else dict(rtol=1e-5, atol=1e-5)
    _close(got[0], want[0], **tol)
    _close(got[1], want[1], **tol)
    for g_, w_ in zip(got[2:], want[2:]):  # fp32 GEMM reductions over V = 262144 terms
        _close(g_, w_, rtol=1e-3, atol=1e-3, scale=True)


# ==============================================================================================
# NaN / Inf isolation
# ==============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_hidden_row_poisons_only_its_row(backend, bad):
    """A non-finite hidden state makes its own row NaN (logp, entropy, grad_hidden row); the other
    rows' outputs and grad_hidden rows are exact. grad_weight / grad_bias sum over all rows, so they
    are NaN -- as in any eager computation -- and the test says so rather than hiding it."""
    hidden, weight, bias, labels = _make((5,), 8, 40, device=_device(backend), bias=True)
    hidden[2, 3] = bad
    logp, ent, gh, gw, gb = _run(backend, hidden, weight, labels, bias=bias)
    assert torch.isnan(logp[2]) and torch.isnan(ent[2])
    assert not torch.isfinite(gh[2]).any()
    keep = [0, 1, 3, 4]
    want = _truth(hidden[keep], weight, labels[keep], bias=bias)
    _close(logp[keep], want[0])
    _close(ent[keep], want[1])
    _close(gh[keep], want[2], atol=1e-5, scale=True)
    assert not torch.isfinite(gw).all() and not torch.isfinite(gb).all()  # shared parameters: NaN, not 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_ignored_rows_reaches_nothing(backend):
    """Padding rows often hold garbage (NaN from fully masked attention rows): they are dropped before
    the matmul, so every output and every gradient -- grad_weight included -- stays exact."""
    hidden, weight, bias, labels = _make((2, 4), 8, 40, device=_device(backend), bias=True)
    hidden[0, 0] = float("nan")
    hidden[1, 3] = float("inf")
    labels[0, 0] = labels[1, 3] = -100
    logp, ent, gh, gw, gb = _run(backend, hidden, weight, labels, bias=bias)
    assert logp[0, 0] == 0 and logp[1, 3] == 0 and torch.all(gh[0, 0] == 0) and torch.all(gh[1, 3] == 0)
    clean = hidden.clone()
    clean[0, 0] = clean[1, 3] = 0.0
    want = _truth(clean, weight, labels, bias=bias)
    for g_, w_ in zip((logp, ent, gh, gw, gb), want):
        _close(g_, w_, atol=1e-5, scale=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_masks_vocabulary_logp(backend):
    """A -inf bias entry removes a token from the vocabulary: logp of the other tokens stays exact
    and its gradient is finite (0 on the masked tokens)."""
    hidden, weight, bias, labels = _make((4,), 8, 30, device=_device(backend), bias=True)
    bias[5:9] = float("-inf")
    labels[(labels >= 5) & (labels < 9)] = 0
    got = _run(backend, hidden, weight, labels, bias=bias, upstream=(1.0, 0.0))
    want = _truth(hidden, weight, labels, bias=bias, upstream=(1.0, 0.0))
    _close(got[0], want[0])
    for g_, w_ in zip(got[2:4], want[2:4]):  # grad_hidden, grad_weight
        assert torch.isfinite(g_).all()
        _close(g_, w_, atol=1e-5, scale=True)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_minus_inf_bias_masks_vocabulary_entropy(backend):
    hidden, weight, bias, labels = _make((4,), 8, 30, device=_device(backend), bias=True)
    bias[5:9] = float("-inf")
    labels[(labels >= 5) & (labels < 9)] = 0
    got = _run(backend, hidden, weight, labels, bias=bias, upstream=(1.0, 1.0))
    want = _truth(hidden, weight, labels, bias=bias, upstream=(1.0, 1.0))
    _close(got[1], want[1])
    for g_, w_ in zip(got[2:4], want[2:4]):
        _close(g_, w_, atol=1e-5, scale=True)


# ==============================================================================================
# Extreme values
# ==============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-4, 1e3])
def test_extreme_temperatures(backend, temperature):
    hidden, weight, bias, labels = _make((5,), 8, 70, device=_device(backend), seed=3)
    got = _run(backend, hidden, weight, labels, temperature=temperature)
    want = _truth(hidden, weight, labels, temperature=temperature)
    assert all(torch.isfinite(g_).all() for g_ in got[:4])
    _close(got[0], want[0], rtol=1e-5, atol=1e-5)
    _close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for g_, w_ in zip(got[2:4], want[2:4]):
        _close(g_, w_, rtol=1e-4, atol=1e-5, scale=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_order_1e4(backend):
    """Weights scaled so logits are ~N(0, 1e4): one-hot softmax, exact logp, finite gradients."""
    hidden, weight, bias, labels = _make((6,), 16, 90, device=_device(backend), seed=8, w_scale=2500.0)
    logits = hidden @ weight.T
    labels[0] = int(logits[0].argmax())
    got = _run(backend, hidden, weight, labels)
    want = _truth(hidden, weight, labels)
    # the fp32 logits themselves carry ulp(1e4) ~ 1e-3 of rounding
    _close(got[0], want[0], rtol=1e-5, atol=1e-2)
    _close(got[1], want[1], rtol=0, atol=1e-2)
    for g_, w_ in zip(got[2:4], want[2:4]):
        assert torch.isfinite(g_).all()
        _close(g_, w_, rtol=1e-3, atol=1e-3, scale=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_saturates_without_nan(backend):
    """Gemma-style softcap with logits far past the cap: tanh saturates, no NaN/Inf anywhere."""
    hidden, weight, bias, labels = _make((4,), 8, 50, device=_device(backend), w_scale=1e3)
    got = _run(backend, hidden, weight, labels, softcap=30.0)
    want = _truth(hidden, weight, labels, softcap=30.0)
    assert all(torch.isfinite(g_).all() for g_ in got[:4])
    _close(got[0], want[0], rtol=1e-5, atol=1e-4)
    _close(got[1], want[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_bad_label_is_nan_in_its_row_only(backend):
    """With ``check_labels=False`` an out-of-range label gives NaN in its row (as ``token_logprobs``
    does), never a plausible number, and leaves the other rows exact."""
    hidden, weight, bias, labels = _make((5,), 8, 21, device=_device(backend))
    labels[1], labels[3] = 21, -7
    logp = alignkernels.linear_logprobs(hidden, weight, labels, backend=backend, check_labels=False)
    keep = [0, 2, 4]
    want = _truth(hidden[keep], weight, labels[keep])
    _close(logp[keep], want[0])
    assert torch.isnan(logp[[1, 3]]).all(), f"got {logp[[1, 3]].tolist()}"
