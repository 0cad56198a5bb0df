"""csrc/token_logprobs.cu executed on the CUDA emulator, through ``_cuda_backend``, against the
fp64 eager reference: every case of the GPU-marked CUDA tests at CI-sized shapes (few rows)."""
from __future__ import annotations

import pytest
import torch

from alignkernels import _cuda_backend, token_logprobs
from alignkernels.reference import token_logprobs_reference
from cuemu import emulator

# Values vs the fp64 reference on the same (rounded) inputs; gradients, written in the logits'
# dtype, relative to the gradient's scale (the GPU tests' tolerances).
VALUE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 4e-3), torch.float16: (2e-3, 1e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, V): one warp per row up to 2048, a 256-thread block to 16384, 512 beyond.
SHAPES = [(3, 1), (6, 20), (5, 1000), (3, 4096), (3, 4097), (2, 50257)]


def reference(logits, labels, temperature, g_logp, g_entropy):
    """fp64 eager logp, entropy and d/d logits of sum(g_logp·logp + g_entropy·entropy)."""
    x = logits.detach().double().requires_grad_(True)
    logp, ent = token_logprobs_reference(x, labels, temperature=temperature, return_entropy=True)
    loss = 0
    if g_logp is not None:
        loss = loss + (logp * g_logp.double()).sum()
    if g_entropy is not None:
        loss = loss + (ent * g_entropy.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logp, ent, grad


def run_cuda(logits, labels, temperature, g_logp, g_entropy, ignore_index=-100):
    """Forward + backward on the emulator, inputs in guarded memory (a read past their end fails)."""
    logits, flat = emulator.device(logits), emulator.device(labels.reshape(-1))
    logp, row_max, log_sum, ent = _cuda_backend.token_logprobs_forward(logits, flat, temperature, ignore_index)
    grad = _cuda_backend.token_logprobs_backward(logits, flat, row_max, log_sum, ent, g_logp, g_entropy,
                                                 temperature, ignore_index)  # fmt: skip
    return logp, ent, grad, row_max, log_sum


def check(logits, labels, temperature=0.7, which=("logp", "entropy"), value_tol=None, grad_tol=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    g_logp = torch.randn(n, generator=g) if "logp" in which else None
    g_ent = torch.randn(n, generator=g) if "entropy" in which else None
    logp, ent, grad, row_max, log_sum = run_cuda(logits, labels, temperature, g_logp, g_ent)
    ref_logp, ref_ent, ref_grad = reference(logits, labels.reshape(-1).long().reshape(labels.shape), temperature,
                                            None if g_logp is None else g_logp.reshape(labels.shape),
                                            None if g_ent is None else g_ent.reshape(labels.shape))  # fmt: skip
    tol = value_tol or VALUE_TOL[logits.dtype]
    torch.testing.assert_close(logp.double(), ref_logp.reshape(-1), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), ref_ent.reshape(-1), rtol=tol, atol=tol)
    rtol, atol = grad_tol or GRAD_TOL[logits.dtype]
    scale = ref_grad.abs().max().item() or 1.0
    assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.is_contiguous()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol * scale)
    ignored = labels.reshape(-1) == -100
    for out in (logp, ent, row_max, log_sum):
        assert (out[ignored] == 0).all()
    assert (grad.reshape(-1, logits.shape[-1])[ignored] == 0).all()
    return logp, ent, grad, row_max, log_sum


def make(rows, V, dtype, seed=0, scale=3.0, labels_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[::3] = -100  # ignored rows
    return logits, labels.to(labels_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,V", SHAPES)
def test_forward_backward_matches_reference(emulated, rows, V, dtype):
    logits, labels = make(rows, V, dtype, labels_dtype=torch.int32 if V % 2 else torch.int64)
    logp, ent, grad, row_max, log_sum = check(logits, labels)
    # The saved pair is the centred state: logsumexp = row_max + log_sum.
    valid = labels != -100
    lse = torch.logsumexp(logits.double() / 0.7, dim=-1)
    torch.testing.assert_close((row_max.double() + log_sum.double())[valid], lse[valid], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(row_max[valid].double(), (logits.double() / 0.7).amax(-1)[valid], rtol=1e-6, atol=0)


@pytest.mark.parametrize("which", [("logp",), ("entropy",), ("logp", "entropy")], ids="+".join)
@pytest.mark.parametrize("V", [1000, 4097])
def test_upstream_gradient_through_one_or_both_outputs(emulated, which, V):
    logits, labels = make(4, V, torch.float32, seed=1)
    check(logits, labels, temperature=1.3, which=which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [1001, 4097])
def test_strided_rows_of_a_sliced_sequence(emulated, V, dtype):
    """``logits[:, :-1]``: rows read in place through (stride_outer, stride_inner); with odd V the
    rows start at every offset from a 16-byte boundary."""
    g = torch.Generator().manual_seed(2)
    full = (torch.randn(2, 4, V, generator=g) * 2).to(dtype)
    logits = full[:, :-1]
    labels = torch.randint(0, V, (2, 3), generator=g)
    labels[0, 1] = -100
    assert not logits.is_contiguous()
    check(logits, labels)


@pytest.mark.parametrize("V", [1000, 4100])
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_row_starts(emulated, V, offset):
    """Rows starting off a 16-byte boundary: element-wise head, packed body, ragged tail; and in
    backward input and output rows with different alignment (element-wise path)."""
    g = torch.Generator().manual_seed(3)
    storage = torch.randn(3 * V + offset, generator=g).to(torch.bfloat16)
    logits = storage[offset:].view(3, V)
    assert logits.data_ptr() % 16 != 0
    labels = torch.tensor([5, V - 1, 0])
    check(logits, labels)


def test_int32_and_int64_labels_agree(emulated):
    logits, labels = make(6, 3001, torch.float32, seed=4)
    a = run_cuda(logits, labels.int(), 1.0, torch.ones(6), torch.ones(6))
    b = run_cuda(logits, labels.long(), 1.0, torch.ones(6), torch.ones(6))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fully_ignored_rows_read_nothing_and_give_zeros(emulated):
    logits = torch.full((5, 300), float("nan"))  # never read: NaN would show
    labels = torch.full((5,), -100)
    logp, ent, grad, row_max, log_sum = run_cuda(logits, labels, 1.0, torch.ones(5), torch.ones(5))
    for out in (logp, ent, grad, row_max, log_sum):
        assert (out == 0).all()


@pytest.mark.parametrize("V", [100, 5000])
def test_out_of_range_labels_with_the_check_off(emulated, V):
    """A label outside [0, V) gives NaN logp (no out-of-bounds read), a finite entropy and the
    gradient without a one-hot column."""
    logits, _ = make(4, V, torch.float32, seed=5)
    labels = torch.tensor([3, V, -5, -100])
    g_logp, g_ent = torch.randn(4), torch.randn(4)
    logp, ent, grad, _, _ = run_cuda(logits, labels, 1.0, g_logp, g_ent)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2]) and logp[3] == 0
    assert torch.isfinite(ent[:3]).all() and ent[3] == 0
    z = logits.double()
    p = torch.softmax(z, -1)
    mean_z = (p * z).sum(-1, keepdim=True)
    expected = -p * (g_logp.double()[:, None] + g_ent.double()[:, None] * (z - mean_z))
    expected[0, 3] += g_logp[0].item()
    expected[3] = 0
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [500, 20000])
def test_minus_inf_logits(emulated, V, dtype):
    """Masked vocabulary entries (-inf) add nothing and get a zero gradient, no NaN anywhere; a
    label on a masked entry gives logp = -inf."""
    logits, labels = make(4, V, dtype, seed=6)
    logits[:, ::7] = float("-inf")
    logits[1, : V // 2] = float("-inf")
    labels[2] = 14  # a masked entry
    logp, ent, grad, _, _ = run_cuda(logits, labels, 0.8, torch.randn(4), torch.randn(4))
    assert logp[2] == float("-inf") and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert (grad[:, ::7][torch.arange(4) != 2] == 0).all()
    keep = torch.tensor([0, 1, 3])
    check(logits[keep], labels[keep], temperature=0.8)


@pytest.mark.parametrize("temperature", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("V", [1, 3, 50257])
def test_large_offsets_and_temperatures_are_exact(emulated, V, offset, temperature):
    """fp32 logits at ±1e4 with T in {0.01, 1, 100}: logp, entropy and d logits within
    2e-6 of fp64 on the same inputs (the centred pair and the fused d = fma(x, 1/T, -max))."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, V, generator=g) * 2 + offset).float()
    labels = torch.randint(0, V, (2,), generator=g)
    check(logits, labels, temperature=temperature, value_tol=2e-6, grad_tol=(2e-6, 2e-6))


def test_public_op_on_the_emulated_backend(emulated):
    """``token_logprobs(backend="cuda")`` end to end (autograd included) on CPU tensors."""
    logits, labels = make(5, 700, torch.float32, seed=8)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, labels, temperature=0.9, return_entropy=True, backend="cuda")
    (logp.sum() + 0.5 * ent.sum()).backward()
    ref_logp, ref_ent, ref_grad = reference(logits, labels, 0.9, torch.ones(5), torch.full((5,), 0.5))
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert emulated.stats()["launches"] > 0


def test_results_do_not_depend_on_block_or_warp_order(emulated):
    logits, labels = make(9, 3000, torch.float32, seed=9)
    emulated.set_seed(1)
    first = run_cuda(logits, labels, 1.0, torch.ones(9), torch.ones(9))
    emulated.set_seed(2)
    second = run_cuda(logits, labels, 1.0, torch.ones(9), torch.ones(9))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_free_schedule_gives_bitwise_the_same_results(emulated, monkeypatch):
    """All threads of a block at once (real races, if any) vs warps one at a time: the reduction
    order is fixed by the kernel, so the bits must not change."""
    logits, labels = make(4, 5000, torch.bfloat16, seed=10)
    serial = run_cuda(logits, labels, 0.9, torch.ones(4), torch.ones(4))
    monkeypatch.setenv("CUEMU_SCHEDULE", "free")
    free = run_cuda(logits, labels, 0.9, torch.ones(4), torch.ones(4))
    for a, b in zip(serial, free):
        assert torch.equal(a, b)


def test_large_vocabulary_at_an_offset_and_low_temperature(emulated):
    """The largest vocabulary (Qwen, V = 151936) at +1e4, T = 0.01: still within 2e-6 of fp64."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(1, 151936, generator=g) * 2 + 1e4).float()
    labels = torch.randint(0, 151936, (1,), generator=g)
    check(logits, labels, temperature=0.01, value_tol=2e-6, grad_tol=(2e-6, 2e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logp_nonpositive_and_entropy_nonnegative(emulated, dtype):
    """Peaked and flat rows at offsets of ±1e4 (±300 in fp16) and T from 1e-4 to 1e3: ``logp <= 0`` and
    ``entropy >= 0`` exactly (``softmax.cuh``'s ``log_prob`` / ``finalize`` clamp the ulp the roundings of
    exp and log can put on the wrong side of 0)."""
    g = torch.Generator().manual_seed(11)
    rows, V = 24, 37
    offsets = (0.0, 300.0, -300.0) if dtype == torch.float16 else (0.0, 1e4, -1e4)
    for offset in offsets:
        for spread in (1e-3, 1.0, 30.0):
            x = torch.randn(rows, V, generator=g) * spread + offset
            labels = x.argmax(-1)
            x[torch.arange(rows), labels] += torch.tensor([0.0, 1.0, 50.0]).repeat(rows // 3) * spread
            labels[::5] = torch.randint(0, V, labels[::5].shape, generator=g)
            for temperature in (1e-4, 1e-2, 0.7, 1e3):
                logp, ent, _, _, _ = run_cuda(x.to(dtype), labels, temperature, torch.ones(rows), torch.ones(rows))
                assert (logp <= 0).all() and (ent >= 0).all(), (offset, spread, temperature, logp.max(), ent.min())


# ----------------------------------------------------------------------------------------------
# support= (the sampler's kept tokens, packed int32 words) on the CUDA kernels
# ----------------------------------------------------------------------------------------------
def _masked_reference(logits, labels, keep, temperature, g_logp, g_entropy):
    """fp64 eager ``log_softmax`` over the kept tokens only: logp, entropy and the gradient."""
    x = logits.detach().double().requires_grad_(True)
    ls = torch.log_softmax((x / temperature).masked_fill(~keep, float("-inf")), -1)
    valid = labels != -100
    logp = torch.where(valid, ls.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = torch.where(valid, -(ls.exp() * torch.where(keep, ls, 0.0)).sum(-1), 0.0)
    (grad,) = torch.autograd.grad((logp * g_logp.double()).sum() + (ent * g_entropy.double()).sum(), x)
    return logp, ent, grad


@pytest.mark.parametrize("rows,V,dtype,sliced", [(5, 77, torch.float32, False), (4, 301, torch.bfloat16, True),
                                                 (2, 3001, torch.float32, True)])  # fmt: skip
def test_support_matches_fp64_masked_log_softmax(emulated, rows, V, dtype, sliced):
    """Warp-per-row and block-per-row configs, 16-byte packs whose columns cross the 32-bit words,
    misaligned row starts (``logits[:, :-1]``), an ignored row: values and gradients of the
    renormalised distribution, exactly zero gradient outside the kept set."""
    from alignkernels.ops._support import pack_bits

    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(rows, 3, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (rows, 3), generator=g)
    keep = torch.rand(rows, 3, V, generator=g) < 0.3
    keep.scatter_(-1, labels[..., None], True)
    labels[0, 1] = -100
    if sliced:
        logits, labels, keep = logits[:, :-1], labels[:, :-1], keep[:, :-1]
    g_logp, g_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, labels, temperature=0.8, return_entropy=True, backend="cuda",
                               support=pack_bits(keep))  # fmt: skip
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    ref_logp, ref_ent, ref_grad = _masked_reference(logits, labels, keep, 0.8, g_logp, g_ent)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=2e-6, atol=2e-6)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=rtol, atol=atol * ref_grad.abs().max().item())
    assert bool((x.grad[~keep] == 0).all()) and bool((x.grad[labels == -100] == 0).all())
    assert emulated.stats()["launches"] > 0


def test_support_label_outside_and_top_k_as_torch(emulated):
    """A label outside its row's set (``check_labels=False``: logp ``-inf``) and ``top_k=``: the torch
    backend's values and gradients; the label check names the position."""
    from alignkernels.ops._support import pack_bits

    logits, labels = make(6, 90, torch.float32, seed=11)
    keep = torch.rand(6, 90, generator=torch.Generator().manual_seed(12)) < 0.4
    keep[torch.arange(6), labels.clamp(min=0)] = True  # rows 0 and 3 are ignored
    keep[4, labels[4]] = False
    with pytest.raises(ValueError, match=r"position \(4,\) is outside its row's support"):
        token_logprobs(logits, labels, support=pack_bits(keep), backend="cuda")
    for kw in (dict(support=pack_bits(keep), check_labels=False), dict(top_k=7, check_labels=False)):
        outs = []
        for backend in ("cuda", "torch"):
            x = logits.clone().requires_grad_(True)
            logp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend, **kw)
            (torch.where(torch.isfinite(logp), logp, 0.0).sum() + 0.5 * ent.sum()).backward()
            outs.append((logp.detach(), ent.detach(), x.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        assert bool(torch.isneginf(outs[0][0]).any())  # a label outside the kept set: -inf, as torch


@pytest.mark.parametrize("rows,V,dtype", [(6, 77, torch.float32), (4, 3001, torch.bfloat16)])  # warp / block per row
def test_support_row_with_no_kept_token(emulated, rows, V, dtype):
    """A row with no kept token (``check_labels=False``): logp ``-inf``, entropy 0, a gradient row of
    exactly 0 (the label's column included), no NaN -- the torch and Triton backends' limit
    (``tests/ops/test_support.py``); the other rows as fp64 masked ``log_softmax``."""
    from alignkernels.ops._support import pack_bits

    logits, labels = make(rows, V, dtype, seed=V)  # rows 0 and 3 are ignored
    g = torch.Generator().manual_seed(V + 1)
    keep = torch.rand(rows, V, generator=g) < 0.3
    keep[torch.arange(rows), labels.clamp(min=0)] = True
    keep[1] = False
    keep[3] = False  # also ignored: 0, as any ignored row
    empty = torch.zeros(rows, dtype=torch.bool)
    empty[1] = True
    g_logp, g_ent = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, labels, return_entropy=True, backend="cuda", support=pack_bits(keep),
                               check_labels=False, temperature=0.8)  # fmt: skip
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    assert logp[1] == float("-inf") and ent[1] == 0 and bool((x.grad[1] == 0).all())
    assert not any(bool(t.isnan().any()) for t in (logp, ent, x.grad))
    others = torch.where(empty, -100, labels)
    ref_logp, ref_ent, ref_grad = _masked_reference(logits, others, keep, 0.8, g_logp, g_ent)
    torch.testing.assert_close(logp[~empty].double(), ref_logp[~empty], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ent[~empty].double(), ref_ent[~empty], rtol=2e-6, atol=2e-6)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=rtol, atol=atol * ref_grad.abs().max().item())
