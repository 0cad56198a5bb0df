"""Reliability of ``token_logprobs``: every bad input gets a clear error naming the argument, every
edge case the right answer, on every backend (torch, triton -- the interpreter on CPU --, reference).

Truth is the eager reference evaluated in float64 on the same inputs. Rules checked here (see
docs/RELIABILITY.md):
- NaN / +inf in a row's logits -> NaN in that row's outputs and gradient, other rows untouched;
- a -inf logit is a vocabulary entry with probability 0 (masked vocabulary): finite outputs,
  zero gradient there;
- ignored rows give 0 and a zero gradient whatever their logits hold (NaN included);
- row offsets beyond 2^31 (and 2^32) elements are addressed correctly (int64 index arithmetic).
"""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import alignkernels
from alignkernels.reference import token_logprobs_reference
from helpers import HAS_CUDA, TRITON_DEVICE

BACKENDS = ["torch", "triton", "reference"]
FAST_BACKENDS = ["torch", "triton"]  # the autograd-Function backends (kernel or chunked torch)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else ("cuda" if HAS_CUDA else "cpu")


def _make(shape, V, dtype=torch.float32, device="cpu", seed=0, scale=3.0, ignore_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * scale).to(dtype).to(device)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return logits, labels.to(device)


def _run(backend, logits, labels, *, upstream=(1.0, 1.0), **kw):
    """Outputs and d(sum(a*logp + b*entropy))/d logits."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = alignkernels.token_logprobs(x, labels, return_entropy=True, backend=backend, **kw)
    a, b = upstream
    loss = (logp * a).sum() + (ent * b).sum() if b else (logp * a).sum()
    loss.backward()
    return logp.detach(), ent.detach(), x.grad


def _truth(logits, labels, *, upstream=(1.0, 1.0), temperature=1.0, ignore_index=-100):
    """fp64 eager reference with 0·log 0 = 0 (a -inf logit has p = 0 and contributes nothing)."""
    x = logits.detach().double().requires_grad_()
    z = x / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    logp = torch.where(valid, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    plogp = logsm.exp() * logsm.masked_fill(logsm == float("-inf"), 0.0)  # no NaN in where's dead branch
    ent = torch.where(valid, -plogp.sum(-1), 0.0)
    a, b = upstream
    ((logp * a).sum() + (ent * b).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


# ==============================================================================================
# Bad inputs: (id, make(logits, labels) -> (args, kwargs), exception, message regex)
# ==============================================================================================
BAD_INPUTS = [
    ("int-logits", lambda x, y: ((x.long(), y), {}), TypeError, "logits must be a floating"),
    ("int32-logits", lambda x, y: ((x.int(), y), {}), TypeError, "logits must be a floating"),
    ("bool-logits", lambda x, y: ((x > 0, y), {}), TypeError, "logits must be a floating"),
    ("complex-logits", lambda x, y: ((x.to(torch.complex64), y), {}), TypeError, "logits must be a floating"),
    ("list-logits", lambda x, y: ((x.tolist(), y), {}), TypeError, "logits must be a torch.Tensor"),
    ("numpy-labels", lambda x, y: ((x, y.numpy()), {}), TypeError, "labels must be a torch.Tensor"),
    ("float-labels", lambda x, y: ((x, y.float()), {}), TypeError, "labels must be an integer"),
    ("bool-labels", lambda x, y: ((x, y > 0), {}), TypeError, "labels must be an integer"),
    ("scalar-logits", lambda x, y: ((x[0, 0, 0], y[0, 0]), {}), ValueError, "logits must have at least 1"),
    ("labels-short", lambda x, y: ((x, y[:, :-1]), {}), ValueError, "labels must have shape"),
    ("labels-extra-dim", lambda x, y: ((x, y[..., None]), {}), ValueError, "labels must have shape"),
    ("labels-flattened", lambda x, y: ((x, y.reshape(-1)), {}), ValueError, "labels must have shape"),
    ("labels-as-logits-shape", lambda x, y: ((x, torch.zeros(x.shape, dtype=torch.long)), {}), ValueError,
     "labels must have shape"),
    ("V=0", lambda x, y: ((x[..., :0], y), {}), ValueError, "non-empty last"),
    ("label=V", lambda x, y: ((x, torch.full_like(y, x.shape[-1])), {}), ValueError, r"labels must be in \[0, 11\)"),
    ("label=-1", lambda x, y: ((x, torch.full_like(y, -1)), {}), ValueError, "found -1"),
    ("label=2^40", lambda x, y: ((x, torch.full_like(y, 2**40)), {}), ValueError, "labels must be in"),
    ("label=ignore-of-other", lambda x, y: ((x, torch.full_like(y, -100)), {"ignore_index": 0}), ValueError,
     "found -100"),
    ("labels-meta", lambda x, y: ((x, y.to("meta")), {}), ValueError, "same device"),
    ("logits-meta", lambda x, y: ((x.to("meta"), y), {}), ValueError, "same device"),
    ("T=0", lambda x, y: ((x, y), {"temperature": 0.0}), ValueError, "temperature"),
    ("T<0", lambda x, y: ((x, y), {"temperature": -1.0}), ValueError, "temperature"),
    ("T=nan", lambda x, y: ((x, y), {"temperature": float("nan")}), ValueError, "temperature"),
    ("T=inf", lambda x, y: ((x, y), {"temperature": float("inf")}), ValueError, "temperature"),
    ("T=str", lambda x, y: ((x, y), {"temperature": "hot"}), TypeError, "temperature must be a number"),
    ("backend-unknown", lambda x, y: ((x, y), {"backend": "cudnn"}), ValueError, "backend must be one of"),
    ("backend-cuda-on-cpu", lambda x, y: ((x, y), {"backend": "cuda"}), ValueError, "needs CUDA tensors"),
    ("fp64-triton", lambda x, y: ((x.double(), y), {"backend": "triton"}), TypeError, "float16/bfloat16/float32"),
]
BAD_IDS = [(c.values[0] if hasattr(c, "values") else c)[0] for c in BAD_INPUTS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_raises_clear_error(case, backend):
    _, make, exc, match = case
    logits, labels = _make((2, 3), 11)
    args, kwargs = make(logits, labels)
    kwargs = {"backend": backend, **kwargs}
    if HAS_CUDA and kwargs["backend"] == "cuda":
        pytest.skip("cuda backend exists here")
    with pytest.raises(exc, match=match):
        alignkernels.token_logprobs(*args, **kwargs)


# ==============================================================================================
# Layouts: non-contiguous, transposed, expanded (stride 0)
# ==============================================================================================
def _layouts():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 5, 41, generator=g) * 2
    labels = torch.randint(0, 41, (4, 5), generator=g)
    row = torch.randn(41, generator=g)
    yield "vocab-strided", torch.randn(4, 5, 82, generator=g)[..., ::2], labels
    yield "transposed-vocab", torch.randn(41, 4, 5, generator=g).permute(1, 2, 0), labels
    yield "batch-transposed", base.transpose(0, 1), labels.transpose(0, 1)
    yield "expand-leading-stride0", base[0:1].expand(4, 5, 41), labels
    yield "expand-row-stride0", row.expand(4, 5, 41), labels
    yield "expand-vocab-stride0", torch.randn(4, 5, 1, generator=g).expand(4, 5, 41), labels
    yield "labels-expanded", base, labels[0:1].expand(4, 5)
    yield "offset-view", torch.randn(9, 41, generator=g)[3:7], labels[:, 0]


LAYOUTS = list(_layouts())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_noncontiguous_and_expanded_inputs(backend, case):
    _, logits, labels = case
    logits, labels = logits.to(_device(backend)), labels.to(_device(backend))
    logp, ent, grad = _run(backend, logits, labels, upstream=(1.0, 0.5))
    t_logp, t_ent, t_grad = _truth(logits, labels, upstream=(1.0, 0.5))
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), t_ent, rtol=1e-5, atol=1e-5)
    # autograd sums the gradient over expanded (stride-0) copies, exactly like for the reference
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-5, atol=1e-5)
    assert grad.shape == logits.shape


# ==============================================================================================
# Sizes: empty batches, V = 1, all ignored, huge V
# ==============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)], ids=["N0", "B2T0", "B0T3"])
def test_empty_batch(backend, shape):
    logits, labels = _make(shape, 17, device=_device(backend))
    logp, ent, grad = _run(backend, logits, labels)
    assert logp.shape == labels.shape and ent.shape == labels.shape and logp.dtype == torch.float32
    assert grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_of_one(backend):
    logits, labels = _make((3, 2), 1, device=_device(backend))
    logits[0, 0, 0] = 1e4
    labels[1, 1] = -100
    logp, ent, grad = _run(backend, logits, labels)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [0.0, 1e4, -1e4, float("nan"), float("inf")], ids=["0", "1e4", "-1e4", "nan", "inf"])
def test_all_tokens_ignored_give_zero_and_zero_gradient(backend, fill):
    if backend == "reference" and not math.isfinite(fill):
        pytest.skip("reference = eager log_softmax; documented to propagate NaN into ignored rows' grad")
    logits, labels = _make((2, 3), 29, device=_device(backend))
    logits.fill_(fill)
    labels.fill_(-100)
    logp, ent, grad = _run(backend, logits, labels)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_vocab_262144_few_rows(backend):
    logits, labels = _make((2,), 262144, device=_device(backend), seed=5)
    labels[1] = 262143  # last entry of the last tile
    logp, ent, grad = _run(backend, logits, labels, upstream=(1.0, 0.3))
    t_logp, t_ent, t_grad = _truth(logits, labels, upstream=(1.0, 0.3))
    # the fp32 eager reference itself drifts ~2e-5 relative at V = 262144 (plain fp32 sums)
    tol = dict(rtol=1e-4, atol=5e-5) if backend == "reference" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), t_logp, **tol)
    torch.testing.assert_close(ent.double(), t_ent, **tol)
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-4, atol=1e-8)


# ==============================================================================================
# NaN / Inf: affected rows only, never silently 0
# ==============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "+inf"])
@pytest.mark.parametrize("where", ["middle", "label", "first", "last"])
def test_nan_or_inf_poisons_only_its_row(backend, bad, where):
    logits, labels = _make((5,), 300, device=_device(backend), seed=2)
    col = {"middle": 150, "label": int(labels[2]), "first": 0, "last": 299}[where]
    logits[2, col] = bad
    logp, ent, grad = _run(backend, logits, labels)
    assert torch.isnan(logp[2]), "the affected row must be NaN, not a number"
    assert torch.isnan(ent[2])
    assert not torch.isfinite(grad[2]).any(), "the affected row's gradient must not be silently finite/0"
    others = [0, 1, 3, 4]
    t_logp, t_ent, t_grad = _truth(logits[others], labels[others])
    torch.testing.assert_close(logp[others].double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[others].double(), t_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[others].double(), t_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_ignored_row_leaks_nowhere(backend):
    """Padding rows can hold NaN (e.g. fully masked attention rows): outputs 0, gradient exactly 0."""
    if backend == "reference":
        pytest.skip("reference = eager log_softmax; documented to propagate NaN into ignored rows' grad")
    logits, labels = _make((4,), 64, device=_device(backend))
    logits[1] = float("nan")
    logits[3, 7] = float("inf")
    labels[1] = labels[3] = -100
    logp, ent, grad = _run(backend, logits, labels)
    assert torch.all(logp[[1, 3]] == 0) and torch.all(ent[[1, 3]] == 0)
    assert torch.all(grad[[1, 3]] == 0)
    t_logp, _, t_grad = _truth(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(logp[[0, 2]].double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[[0, 2]].double(), t_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_minus_inf_logp_and_gradient(backend):
    """-inf logits (masked vocabulary, e.g. from a logits processor) are probability-0 entries."""
    logits, labels = _make((3,), 50, device=_device(backend))
    logits[:, 10:20] = float("-inf")
    logits[2, 5] = float("-inf")
    labels[2] = 5  # the label itself is masked out: logp = -inf, gradient g at the label
    logp, _, grad = _run(backend, logits, labels, upstream=(1.0, 0.0))
    t_logp, _, t_grad = _truth(logits, labels, upstream=(1.0, 0.0))
    assert torch.isfinite(logp[:2]).all() and logp[2] == float("-inf")
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_minus_inf_entropy(backend):
    logits, labels = _make((3,), 50, device=_device(backend))
    logits[:, 10:20] = float("-inf")
    logp, ent, grad = _run(backend, logits, labels, upstream=(1.0, 1.0))
    t_logp, t_ent, t_grad = _truth(logits, labels, upstream=(1.0, 1.0))
    torch.testing.assert_close(ent.double(), t_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-5, atol=1e-7)


# ==============================================================================================
# Temperatures near 0, extreme logits
# ==============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 1e3])
def test_extreme_temperatures(backend, temperature):
    logits, labels = _make((4,), 257, device=_device(backend), seed=7, scale=1.0)
    logp, ent, grad = _run(backend, logits, labels, temperature=temperature)
    t_logp, t_ent, t_grad = _truth(logits, labels, temperature=temperature)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    # logp scales like 1/T: relative tolerance; entropy -> 0 for T -> 0 and must keep its digits
    # (T = 1e-2 here: true entropies 1.5e-5 .. 1e-46)
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), t_ent, rtol=1e-4, atol=1e-6)
    scale = t_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_label_at_temperature_near_zero(backend):
    """T = 1e-5, logits ~ N(0, 3): z = x / T ~ 3e5 (fp32 ulp 0.03). For the argmax label logp is
    O(1e-3) or O(1) and must keep its digits: every backend forms z - max as one rounding of the exact
    x/T - max, never rounding z itself, so the truth is fp64 x / T of the same fp32 logits."""
    T = 1e-5
    logits, labels = _make((6,), 64, device=_device(backend), seed=17)
    labels.copy_(logits.argmax(-1))
    logits[:, 1] = logits.amax(-1) - 1e-4  # a runner-up 10 units of z below the max
    labels[0] = 1
    logp, ent, grad = _run(backend, logits, labels, temperature=T)
    t_logp, t_ent, t_grad = _truth(logits.double() / T, labels)
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double() * T, t_grad, rtol=1e-3, atol=1e-3 * t_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+1e4", "-1e4"])
def test_logits_offset_by_1e4(backend, sign):
    """softmax is shift-invariant: logits ~ ±1e4 + N(0, 3) must give the answer of N(0, 3), up to the
    rounding of the inputs themselves (ulp(1e4) = 1e-3 in fp32)."""
    logits, labels = _make((4,), 1000, device=_device(backend), seed=11)
    logits = logits + sign * 1e4
    logp, ent, _ = _run(backend, logits, labels)
    t_logp, t_ent, _ = _truth(logits, labels)
    torch.testing.assert_close(logp.double(), t_logp, rtol=0, atol=4e-3)
    torch.testing.assert_close(ent.double(), t_ent, rtol=0, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_spread_1e4(backend):
    """Logits ~ N(0, 1e4): one-hot-like softmax; logp is -O(1e4), entropy ~ 0, gradient finite."""
    logits, labels = _make((6,), 500, device=_device(backend), seed=13, scale=1e4)
    labels[0] = int(logits[0].argmax())
    logp, ent, grad = _run(backend, logits, labels)
    t_logp, t_ent, t_grad = _truth(logits, labels)
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-6, atol=4e-3)
    torch.testing.assert_close(ent.double(), t_ent, rtol=0, atol=1e-3)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), t_grad, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_max_logits(backend):
    """bf16 max (3.39e38) logits: two equal maxima -> entropy log 2, logp of a max = -log 2. (Was a strict
    xfail: one fp32 lse = m + log s ~ 3e38 rounds log s away; every backend now keeps (row_max, log_sum).)"""
    big = torch.finfo(torch.bfloat16).max
    logits, labels = _make((3,), 40, dtype=torch.bfloat16, device=_device(backend))
    logits[0, :2] = big  # two tied maxima
    logits[1, :] = -big
    logits[1, 3] = big  # one max, everything else at -max (z - m overflows to -inf)
    labels[0], labels[1] = 1, 3
    logp, ent, grad = _run(backend, logits, labels)
    t_logp, t_ent, t_grad = _truth(logits, labels)
    assert torch.isfinite(ent).all(), f"entropy {ent.tolist()}"
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), t_ent, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad.float()).all()
    torch.testing.assert_close(grad.double(), t_grad, rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_labels_are_nan_in_their_row_only(backend):
    logits, labels = _make((5,), 23, device=_device(backend))
    labels[1], labels[3] = 23, -7
    logp, _, grad = _run(backend if backend != "reference" else "torch", logits, labels, upstream=(1.0, 0.0),
                         check_labels=False)  # fmt: skip
    assert torch.isnan(logp[[1, 3]]).all()
    keep = [0, 2, 4]
    t_logp, _, t_grad = _truth(logits[keep], labels[keep], upstream=(1.0, 0.0))
    torch.testing.assert_close(logp[keep].double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[keep].double(), t_grad, rtol=1e-5, atol=1e-7)


# ==============================================================================================
# int64 index arithmetic: row offsets beyond 2^31 and 2^32 elements without 8 GB of RAM
# ==============================================================================================
_ROW_STRIDE = (1 << 30) + 3  # 5 rows -> last row starts at 4·(2^30 + 3) > 2^32 elements


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_row_offsets_beyond_2_pow_32_elements(backend):
    """A [5, V] bf16 view whose rows are 2^30 + 3 elements apart: row 4 starts past 2^32 elements
    (8.6 GB of address space). ``torch.empty`` only reserves virtual memory; only the 5 rows (and
    the pages they sit on) are ever touched, so this runs in a few MB of RAM. A kernel computing
    ``row * stride`` in 32 bits reads the wrong row (or faults) here."""
    if backend == "triton" and HAS_CUDA:
        pytest.skip("on a GPU the real-size test below covers this")
    psutil = pytest.importorskip("psutil")
    V = 96
    n_rows = 5
    rss_before = psutil.Process().memory_info().rss
    try:
        storage = torch.empty((n_rows - 1) * _ROW_STRIDE + V, dtype=torch.bfloat16)
    except RuntimeError as err:  # address space refused (strict overcommit)
        pytest.skip(f"cannot reserve 8.6 GB of virtual memory: {err}")
    view = storage.as_strided((n_rows, V), (_ROW_STRIDE, 1))
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(n_rows, V, generator=g) * 3).bfloat16()
    view.copy_(rows)  # touches only the 5 rows
    labels = torch.randint(0, V, (n_rows,), generator=g)
    logp, ent, grad = _run(backend, view, labels, upstream=(1.0, 0.5))
    t_logp, t_ent, t_grad = _truth(rows, labels, upstream=(1.0, 0.5))
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), t_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), t_grad, rtol=1.6e-2, atol=4e-3 * t_grad.abs().max().item())
    # 3-D [outer, inner] addressing: outer stride past 2^31 elements
    view3 = storage.as_strided((2, 2, V), (2 * _ROW_STRIDE, _ROW_STRIDE, 1))
    logp3 = alignkernels.token_logprobs(view3, labels[:4].view(2, 2), backend=backend)
    torch.testing.assert_close(logp3.reshape(-1).double(), t_logp[:4], rtol=1e-5, atol=1e-5)
    assert psutil.Process().memory_info().rss - rss_before < 512 * 2**20, "the big view was touched"
    del storage, view, view3


_TTIR_SCRIPT = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bench.kernel_report import iter_compile_cases
    report, seen = {}, set()
    for case_id, case in iter_compile_cases():
        name = case["kernel"].fn.__name__ if hasattr(case["kernel"], "fn") else case["kernel"].__name__
        if name in seen:
            continue
        seen.add(name)
        src = ASTSource(fn=case["kernel"], signature=case["signature"], constexprs=case["constexprs"])
        options = {"num_warps": case["num_warps"]}
        ttir = triton.compile(src, target=GPUTarget("cuda", 80, 32), options=options).asm["ttir"]
        pid = re.findall(r"(%[\\w.]+) = tt.get_program_id x : i32", ttir)
        uses = [l.strip() for l in ttir.splitlines() for p in pid
                if re.search(re.escape(p) + r"\\b", l) and "tt.get_program_id" not in l]
        report[name] = dict(pid=len(pid), uses=uses)
    json.dump(report, sys.stdout)
    """
)


def test_every_kernel_widens_the_row_index_to_int64_before_any_arithmetic():
    """Compile every Triton kernel (first config) to TTIR and check that the row index
    (``program_id(0)``) is used only by a sign extension to i64: every row offset, row x stride
    product and row pointer is then 64-bit. Covers the backward kernels the big-view test cannot
    (their gradient would be 8 GB)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: bench importable
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert {"token_logprobs_fwd_kernel", "token_logprobs_bwd_kernel", "linear_logprobs_fwd_kernel",
            "linear_logprobs_bwd_kernel"} <= set(report)  # fmt: skip
    for name, r in report.items():
        assert r["pid"] == 1, f"{name}: expected one program_id(0), got {r}"
        assert r["uses"] and all(re.search(r"arith.extsi %\S+ : i32 to i64", u) for u in r["uses"]), (
            f"{name}: program_id(0) used in 32-bit arithmetic: {r['uses']}"
        )



@pytest.mark.gpu
def test_gpu_real_n_times_v_above_2_pow_31():
    """The real thing on a GPU: N·V = 8200 · 262144 > 2^31 bf16 logits (4.3 GB), forward and
    backward (the gradient is another 4.3 GB), checked row-by-row against the reference on the
    rows past the 2^31 boundary."""
    V, N = 262144, 8200
    assert N * V > 2**31
    torch.manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    x = logits.requires_grad_()
    logp, ent = alignkernels.token_logprobs(x, labels, return_entropy=True, backend="triton")
    (logp.sum() + ent.sum()).backward()
    tail = slice(N - 16, N)  # rows whose offsets exceed 2^31 elements
    r_logp, r_ent, r_grad = _truth(logits.detach()[tail], labels[tail])
    torch.testing.assert_close(logp[tail].double(), r_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent[tail].double(), r_ent, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad[tail].double(), r_grad, rtol=1.6e-2, atol=1e-4)
