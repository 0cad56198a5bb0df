"""Numerics on every backend against fp64: the softcap at any cap, masked (``-inf``) vocabularies,
``logp <= 0`` / ``entropy >= 0`` on every op, and the GPU-only precision hazards shown by
construction on the CPU (the lm-head engine's ``out_dtype`` probe, the three-GEMM head's
``grad_hidden`` rounding, ``is_top1`` of a NaN row).

Inputs of the softcap tests make the fp32 GEMM exact (hidden in quarters, weights in eighths, small
``H``): what is left of the error is the transform and the softmax, not the GEMM's rounding (which
at a cap of 1e-3 alone moves ``u = x / c`` by ~1e-4)."""
from __future__ import annotations

import warnings

import pytest
import torch

import alignkernels
import alignkernels.reference
from alignkernels.reference import transform_logits
from helpers import GRAD_FLOOR, TRITON_DEVICE, max_rel_error

CAPS = [1e-3, 1e-1, 1.0, 30.0, 1e3, 1e6]
# Relative error vs fp64 allowed for fp32 results (values in nats, floor 1; gradients relative to
# their largest entry). Before the fix the Triton softcap was 1e-5 off at a cap of 1e3 and 1e-2 at 1e6.
FP32_REL = 2e-6


def _exact_gemm_inputs(N=7, H=16, V=67, seed=0, device="cpu"):
    """``hidden @ weight.T + bias`` is exact in fp32: multiples of 1/32 below 2^10."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-4, 5, (N, H), generator=g) / 4.0
    weight = torch.randint(-8, 9, (V, H), generator=g) / 8.0
    bias = torch.randint(-16, 17, (V,), generator=g) / 32.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    return hidden.to(device), weight.to(device), bias.to(device), labels.to(device)


def _head_truth(hidden, weight, bias, labels, upstream, **tr):
    """fp64 eager logp, entropy and their gradients (w.r.t. hidden, weight, bias) on the same inputs."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    z = transform_logits(h @ w.T + b, **tr)
    logsm = torch.log_softmax(z, -1)
    valid = labels != -100
    logp = torch.where(valid, logsm.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logsm.exp() * logsm.masked_fill(logsm == float("-inf"), 0.0)).sum(-1), 0.0)
    grads = torch.autograd.grad((logp * upstream[0]).sum() + (ent * upstream[1]).sum(), (h, w, b))
    return (logp.detach(), ent.detach(), *grads)


def _head_ours(backend, hidden, weight, bias, labels, upstream, **kw):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    h, w, b = (t.detach().to(device).requires_grad_() for t in (hidden, weight, bias))
    logp, ent = alignkernels.linear_logprobs(h, w, labels.to(device), bias=b, return_entropy=True, backend=backend,
                                             **kw)  # fmt: skip
    grads = torch.autograd.grad((logp * upstream[0].to(device)).sum() + (ent * upstream[1].to(device)).sum(),
                                (h, w, b))  # fmt: skip
    return (logp.detach(), ent.detach(), *grads)


# ---------------------------------------------------------------------------------------------------
# Softcap: relative accuracy at every cap, on every backend that has it (linear_logprobs, fused CE)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("regime", ["logits-O(1)", "u-O(1)"])
@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"cap={c:g}")
def test_softcap_matches_fp64_at_every_cap(backend, regime, cap):
    """``logits-O(1)``: raw logits of a few units, so the cap ranges from saturating (1e-3) to far above
    them (1e6, ``u ~ 1e-6``); ``u-O(1)``: ``logit_scale = cap / 4`` puts ``u = logit_scale·x / cap``
    across the curve (series branch, exp branch, saturation) at every cap."""
    hidden, weight, bias, labels = _exact_gemm_inputs()
    g = torch.Generator().manual_seed(1)
    upstream = (torch.randn(7, generator=g), torch.randn(7, generator=g))
    tr = dict(softcap=cap, temperature=0.7, logit_scale=1.0 if regime == "logits-O(1)" else cap / 4)
    got = _head_ours(backend, hidden, weight, bias, labels, upstream, **tr)
    want = _head_truth(hidden, weight, bias, labels, upstream, **tr)
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        floor = 1.0 if name in ("logp", "entropy") else GRAD_FLOOR
        err = max_rel_error(a, b, floor=floor)
        assert err < FP32_REL, f"{name}: {err:.2e} relative to fp64 at softcap={cap:g} ({backend}, {regime})"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cap", [1e-3, 1.0, 1e3, 1e6], ids=lambda c: f"cap={c:g}")
def test_softcap_fused_cross_entropy_matches_fp64(backend, cap):
    """The three-GEMM head applies the same transform: loss and gradients vs fp64."""
    hidden, weight, bias, labels = _exact_gemm_inputs()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    h, w, b = (t.detach().to(device).requires_grad_() for t in (hidden, weight, bias))
    loss = alignkernels.fused_linear_cross_entropy(h, w, labels.to(device), bias=b, softcap=cap, temperature=0.7,
                                                   backend=backend)  # fmt: skip
    got = (loss.detach(), *torch.autograd.grad(loss, (h, w, b)))
    n = (labels != -100).sum()
    logp, _, *grads = _head_truth(hidden, weight, bias, labels, (-torch.ones(7) / n, torch.zeros(7)), softcap=cap,
                                  temperature=0.7)  # fmt: skip
    for name, a, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, (-logp.sum() / n, *grads)):
        err = max_rel_error(a, want, floor=1.0 if name == "loss" else GRAD_FLOOR)
        assert err < FP32_REL, f"{name}: {err:.2e} relative to fp64 at softcap={cap:g} ({backend})"


# ---------------------------------------------------------------------------------------------------
# Masked vocabularies (-inf logits): probability 0, one semantics on every backend and op
# ---------------------------------------------------------------------------------------------------
BACKENDS = ["torch", "triton", "reference"]
MASKED = [3, 7, 11, 40]  # vocabulary entries at -inf (bias -inf / logits -inf)
# rows 0 and 2: label on a masked entry -> logp = -inf, entropy finite, gradient that of fp64 eager


def _masked_inputs(V=50, N=5, H=16):
    hidden, weight, bias, _ = _exact_gemm_inputs(N=N, H=H, V=V, seed=3)
    bias[MASKED] = float("-inf")
    labels = torch.tensor([3, 5, 40, 9, -100])
    return hidden, weight, bias, labels


def _check_masked(got, want, names):
    for name, a, b in zip(names, got, want):
        a = a.detach().cpu().double()
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{name}: -inf where the truth has it"
        finite = torch.isfinite(b)
        assert torch.isfinite(a[finite]).all() and not a.isnan().any(), f"{name}: NaN or inf off the masked labels"
        err = max_rel_error(a[finite], b[finite], floor=1.0 if name in ("logp", "entropy", "loss") else GRAD_FLOOR)
        assert err < FP32_REL, f"{name}: {err:.2e} relative to fp64"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_label_token_logprobs(backend):
    hidden, weight, bias, labels = _masked_inputs()
    logits = hidden @ weight.T + bias
    upstream = (torch.randn(5, generator=torch.Generator().manual_seed(2)), torch.ones(5))
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = logits.to(device).requires_grad_()
    logp, ent = alignkernels.token_logprobs(x, labels.to(device), return_entropy=True, backend=backend)
    up_logp = torch.where(torch.isneginf(logp.cpu()), 0.0, upstream[0])  # an inf loss has no useful gradient
    (grad,) = torch.autograd.grad((logp * up_logp.to(device)).sum() + (ent * upstream[1].to(device)).sum(), x)
    xd = logits.double().requires_grad_()
    t_logp, t_ent = alignkernels.token_logprobs(xd, labels, return_entropy=True, backend="reference")
    (t_grad,) = torch.autograd.grad((t_logp * up_logp.double()).sum() + (t_ent * upstream[1].double()).sum(), xd)
    assert torch.isneginf(t_logp[[0, 2]]).all()
    _check_masked((logp, ent, grad), (t_logp, t_ent, t_grad), ("logp", "entropy", "grad_logits"))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_label_linear_logprobs_and_stats(backend, lora):
    """Values, entropy and TRL's statistics (``return_stats``), and gradients through the entropy and
    the finite log-probs: the reference's entropy was NaN on every row with a -inf logit."""
    hidden, weight, bias, labels = _masked_inputs()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    kw = {}
    if lora:
        g = torch.Generator().manual_seed(5)
        lora_a, lora_b = torch.randn(2, 16, generator=g) / 4, torch.randn(50, 2, generator=g) / 4
        kw["lora"] = (lora_a.to(device), lora_b.to(device), 0.5)
        weight_eff = weight + 0.5 * lora_b @ lora_a  # the merged head
    else:
        weight_eff = weight
    h, w, b = (t.detach().to(device).requires_grad_() for t in (hidden, weight, bias))
    out = alignkernels.linear_logprobs(h, w, labels.to(device), bias=b, return_stats=True, backend=backend, **kw)
    up = torch.where(torch.isneginf(out.logp.detach().cpu()), 0.0, 1.0)
    grads = torch.autograd.grad((out.logp * up.to(device)).sum() + out.entropy.sum(), (h, b))
    hd, wd, bd = (t.detach().double().requires_grad_() for t in (hidden, weight_eff, bias))
    truth = alignkernels.linear_logprobs(hd, wd, labels, bias=bd, return_stats=True, backend="reference")
    t_grads = torch.autograd.grad((truth.logp * up.double()).sum() + truth.entropy.sum(), (hd, bd))
    assert torch.isfinite(truth.entropy).all() and torch.isneginf(truth.logp[[0, 2]]).all()
    _check_masked((out.logp, out.entropy, out.log_sum_sq_probs, *grads),
                  (truth.logp, truth.entropy, truth.log_sum_sq_probs, *t_grads),
                  ("logp", "entropy", "log_sum_sq_probs", "grad_hidden", "grad_bias"))  # fmt: skip
    assert torch.equal(out.is_top1.cpu(), truth.is_top1)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_label_fused_cross_entropy(backend, loss_type):
    """nll: a label on a masked entry makes the loss +inf (the torch backend gave a finite 3e29 from
    a -1e30 log-prob), gradients stay those of fp64 eager; DFT: that token costs ``p·log p = 0``."""
    hidden, weight, bias, labels = _masked_inputs()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    h, w, b = (t.detach().to(device).requires_grad_() for t in (hidden, weight, bias))
    out = alignkernels.fused_linear_cross_entropy(h, w, labels.to(device), bias=b, loss_type=loss_type,
                                                  backend=backend, return_stats=True)  # fmt: skip
    grads = torch.autograd.grad(out.loss, (h, w, b))
    hd, wd, bd = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    valid = labels != -100
    logsm = torch.log_softmax(hd @ wd.T + bd, -1)  # eager fp64: its backward is finite at a -inf log-prob
    logp = logsm[valid].gather(1, labels[valid][:, None])[:, 0]
    ent = alignkernels.reference.entropy_of_log_softmax(logsm[valid]).detach()
    p = logp.detach().exp()
    token = -logp if loss_type == "nll" else torch.where(p > 0, -logp * p, 0.0)
    t_loss = token.sum() / valid.sum()
    t_grads = torch.autograd.grad(t_loss, (hd, wd, bd))
    assert (t_loss == float("inf")) if loss_type == "nll" else torch.isfinite(t_loss)
    _check_masked((out.loss, out.logp[valid], out.entropy[valid], *grads), (t_loss, logp.detach(), ent, *t_grads),
                  ("loss", "logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# GPU-only precision hazards, shown by construction on the CPU
# ---------------------------------------------------------------------------------------------------
def _probe_with(monkeypatch, failure):
    """``mixed_mm_supported`` on a stand-in CUDA device whose ``torch.mm(out_dtype=)`` raises ``failure``
    (None: works). The probe's tensors are made on the CPU."""
    from alignkernels.ops import _lmhead_engine as engine

    real_zeros, real_mm = torch.zeros, torch.mm

    def zeros(*args, device=None, **kw):
        return real_zeros(*args, **kw)

    def mm(a, b, **kw):
        if "out_dtype" in kw and failure is not None:
            raise failure
        return real_mm(a.float(), b.float())

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch, "mm", mm)
    try:
        return engine.mixed_mm_supported("cuda:0")
    finally:
        monkeypatch.setattr(torch, "zeros", real_zeros)
        monkeypatch.setattr(torch, "mm", real_mm)


def test_out_dtype_probe_does_not_cache_an_oom_as_unsupported(monkeypatch):
    """An OOM while probing ``torch.mm(out_dtype=)`` is raised and not remembered: the next probe that
    works says "supported" (before: any error was cached as "unsupported" and every later half GEMM
    was silently rounded to bf16 before widening)."""
    from alignkernels.ops import _lmhead_engine as engine

    monkeypatch.setattr(engine, "_MIXED_MM_OK", {})
    with pytest.raises(torch.OutOfMemoryError):
        _probe_with(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"))
    with pytest.raises(torch.AcceleratorError):
        _probe_with(monkeypatch, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert _probe_with(monkeypatch, None) is True


def test_out_dtype_probe_warns_once_when_unsupported(monkeypatch):
    """A torch without ``out_dtype`` (TypeError) is "unsupported", cached, with one RuntimeWarning
    naming the precision cost; later calls neither probe nor warn again."""
    from alignkernels.ops import _lmhead_engine as engine

    monkeypatch.setattr(engine, "_MIXED_MM_OK", {})
    with pytest.warns(RuntimeWarning, match="out_dtype.*rounding"):
        assert _probe_with(monkeypatch, TypeError("mm() got an unexpected keyword argument 'out_dtype'")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _probe_with(monkeypatch, None) is False  # cached: no probe, no warning
    assert engine.mixed_mm_supported("cpu") is False  # CPU: no mixed GEMM kernel, nothing probed


class _CublasLikeGemms(torch.utils._python_dispatch.TorchDispatchMode):
    """GEMMs of a CUDA library on the CPU: ``out_dtype=float32`` accumulates and writes fp32 (bf16
    products are exact in fp32); a bf16-output GEMM reduces in bf16 (fp32 partial sums over 32-wide K
    slices, each rounded to bf16 and summed in bf16) -- what a reduced-precision bf16 reduction may
    do. Records the operands of every GEMM whose reduction runs over ``k`` elements."""

    def __init__(self, k):
        super().__init__()
        self.k, self.seen = k, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.mm.dtype, aten.mm.dtype_out):
            a, b, out_dtype = args[:3]
            self._record(a, b)
            result = (a.float() @ b.float()).to(out_dtype)
            return kwargs["out"].copy_(result) if "out" in kwargs else result
        if func in (aten.addmm.dtype, aten.addmm.dtype_out):
            acc, a, b, out_dtype = args[:4]
            self._record(a, b)
            result = (acc.float() + a.float() @ b.float()).to(out_dtype)
            return kwargs["out"].copy_(result) if "out" in kwargs else result
        if func in (aten.mm.default, aten.mm.out) and args[0].dtype == torch.bfloat16:
            a, b = args[:2]
            self._record(a, b)
            result = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
            for k0 in range(0, a.shape[1], 32):
                result += (a[:, k0:k0 + 32].float() @ b[k0:k0 + 32].float()).bfloat16()
            return kwargs["out"].copy_(result) if "out" in kwargs else result
        return func(*args, **kwargs)

    def _record(self, a, b):
        if a.shape[1] == self.k:
            self.seen.append((a.clone(), b.clone()))


@pytest.mark.parametrize("head_path", ["three_gemm", "four_gemm"])
def test_bf16_grad_hidden_is_fp32_gemm_rounded_once(monkeypatch, head_path):
    """With bf16 operands kept for the GEMMs (the CUDA path, emulated on the CPU by
    :class:`_CublasLikeGemms`), ``grad_hidden`` is the fp32 GEMM over the whole vocabulary rounded to
    bf16 once -- bit for bit -- on both head paths. Before: the three-GEMM head wrote it straight from a
    bf16-output GEMM (here 5e-3 relative off)."""
    from alignkernels.ops import _lmhead_engine as engine

    monkeypatch.setattr(engine, "mixed_mm_supported", lambda device: True)
    monkeypatch.setattr(engine.HeadPrecision, "operand", lambda self, t, compute_dtype: t)  # operands kept, as on CUDA
    g = torch.Generator().manual_seed(0)
    N, H, V = 6, 32, 288
    hidden = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 4).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g)
    gemms = _CublasLikeGemms(k=V)
    with gemms:
        if head_path == "three_gemm":
            loss = alignkernels.fused_linear_cross_entropy(hidden, weight, labels, backend="torch", reduction="sum")
        else:
            loss = -alignkernels.linear_logprobs(hidden, weight, labels, backend="torch",
                                                 vocab_block_size=V).sum()  # fmt: skip
        (grad,) = torch.autograd.grad(loss, hidden)
    grad_gemms = [(a, b) for a, b in gemms.seen if a.shape == (N, V) and b.shape == (V, H)]
    assert len(grad_gemms) == 1, "one GEMM over the vocabulary forms grad_hidden"
    dz, w = grad_gemms[0]
    want = (dz.float() @ w.float()).bfloat16()
    assert torch.equal(grad, want), f"grad_hidden is {max_rel_error(grad, want):.1e} off the fp32 GEMM rounded once"


def _nan_row_inputs():
    """Inputs of the NaN-row tests: labels of rows 0 and 2 on the largest logit off column 5, row 1 on
    column 5 (the test makes it NaN with a NaN bias entry), row 3 elsewhere."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(4, 16, generator=g), torch.randn(50, 16, generator=g) / 4
    z = hidden @ weight.T
    z[:, 5] = float("-inf")
    labels = z.argmax(1)
    labels[1], labels[3] = 5, (labels[3] + 1) % 50
    return hidden, weight, labels


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_cross_entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_of_a_nan_row_is_false(backend, op):
    """A row holding a NaN logit has NaN logp and entropy and ``is_top1`` False, whatever the label --
    on every backend (before: triton True where the label is the largest finite logit, ``tl.max``
    dropping the NaN; reference and the torch three-GEMM head True where the label is the NaN column,
    ``argmax`` taking it); a NaN hidden state affects its own row only."""
    hidden, weight, labels = _nan_row_inputs()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    fn = getattr(alignkernels, op)
    bias = torch.zeros(50)
    bias[5] = float("nan")
    out = fn(hidden.to(device), weight.to(device), labels.to(device), bias=bias.to(device), backend=backend,
             return_stats=True)  # fmt: skip
    assert out.logp.isnan().all() and out.entropy.isnan().all()
    assert not out.is_top1.any(), f"is_top1 of NaN rows: {out.is_top1.tolist()}"

    nan_hidden = hidden.clone()
    nan_hidden[2, 7] = float("nan")
    out = fn(nan_hidden.to(device), weight.to(device), labels.to(device), backend=backend, return_stats=True)
    clean = fn(hidden.to(device), weight.to(device), labels.to(device), backend=backend, return_stats=True)
    assert out.logp[2].isnan() and not out.is_top1[2]
    rows = [0, 1, 3]
    assert torch.equal(out.is_top1[rows], clean.is_top1[rows]) and clean.is_top1[0]
    assert torch.equal(out.logp[rows], clean.logp[rows])
