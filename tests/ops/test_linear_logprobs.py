"""``linear_logprobs``: log-probs, entropy, TRL's statistics and all three gradients from hidden
states + lm_head, against the materialised reference, TRL's ``ChunkedLogProbFunction`` and
``gradcheck``; the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU (see conftest)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from alignkernels import linear_logprobs
from alignkernels.ops import _lmhead_engine as engine
from alignkernels.ops.linear_logprobs import LinearLogprobsOutput
from alignkernels.reference import linear_logprobs_reference, linear_logprobs_stats_reference
from helpers import GRAD_FLOOR, HAS_CUDA, TRITON_DEVICE, max_rel_error

BACKENDS = ("torch", "triton")


def _inputs(N, H, V, dtype=torch.float32, *, bias=True, ignore_every=5, seed=0, weight_scale=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * weight_scale).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return tuple(t.to(device) if t is not None else None for t in (hidden, weight, b, labels))


def _run(hidden, weight, bias, labels, *, backend, upstream_seed=1, **kwargs):
    """Forward with both outputs, backward with random upstream gradients on both; returns
    (logp, entropy, grad_hidden, grad_weight, grad_bias), computed from fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp, entropy = linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                                    backend=backend, **kwargs)  # fmt: skip
    g = torch.Generator().manual_seed(upstream_seed)
    g_logp = torch.randn(logp.shape, generator=g, dtype=logp.dtype).to(logp.device)
    g_entropy = torch.randn(entropy.shape, generator=g, dtype=entropy.dtype).to(entropy.device)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    return logp.detach(), entropy.detach(), *(t.grad if t is not None else None for t in leaves)


def _assert_close(actual, expected, rel, name):
    """|actual - expected| <= rel * max|expected| (elementwise), with a readable message."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(expected.abs().max().item(), 1e-6)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{name}: max abs err {err:.3e} > {rel:.1e} * {scale:.3e}"


def _compare(ours, ref, rel_out, rel_grad, has_bias=True):
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for i, (name, a, r) in enumerate(zip(names, ours, ref)):
        if name == "grad_bias" and not has_bias:
            assert a is None and r is None
            continue
        _assert_close(a, r, rel_out if i < 2 else rel_grad, name)


TRANSFORMS = {
    "plain": dict(),
    "bias": dict(),  # bias toggled separately below
    "softcap": dict(softcap=2.5),
    "logit_scale": dict(logit_scale=1.7),
    "temperature": dict(temperature=0.7),
    "all": dict(softcap=4.0, logit_scale=0.8, temperature=1.3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TRANSFORMS))
def test_fp32_matches_reference(backend, case):
    """Small tiles (several vocab blocks and token chunks) so the online merge is exercised."""
    with_bias = case in ("bias", "all")
    hidden, weight, bias, labels = _inputs(37, 33, 1000, bias=with_bias)
    kwargs = dict(TRANSFORMS[case], chunk_size=16, vocab_block_size=256)
    ours = _run(hidden, weight, bias, labels, backend=backend, **kwargs)
    ref = _run(hidden, weight, bias, labels, backend="reference", **TRANSFORMS[case])
    _compare(ours, ref, 1e-5, 1e-5, has_bias=with_bias)
    ignored = labels == -100
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    assert (ours[2][ignored] == 0).all(), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_matches_fp32_reference(backend, dtype):
    """Half inputs vs the fp32 reference on the same (rounded) values. Tolerance: logp/entropy 1e-4
    of their scale (the logits are computed in fp32 from half inputs on every backend), gradients
    2e-2 (they are rounded to the input dtype; the Triton path also rounds dx to it, like eager)."""
    hidden, weight, bias, labels = _inputs(29, 72, 777, dtype=dtype)
    kwargs = dict(softcap=6.0, logit_scale=1.1, temperature=0.9)
    ours = _run(hidden, weight, bias, labels, backend=backend, chunk_size=8, vocab_block_size=256, **kwargs)
    ref = _run(hidden.float(), weight.float(), bias.float(), labels, backend="reference", **kwargs)
    assert ours[2].dtype == ours[3].dtype == ours[4].dtype == dtype
    _compare(ours, ref, 1e-4, 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_few_rows(backend):
    """V = 50257 (not a power of two), H = 72, 3 rows (one ignored), default tiling."""
    hidden, weight, bias, labels = _inputs(3, 72, 50257, ignore_every=2, weight_scale=0.2)
    ours = _run(hidden, weight, bias, labels, backend=backend, softcap=30.0)
    ref = _run(hidden, weight, bias, labels, backend="reference", softcap=30.0)
    _compare(ours, ref, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(backend):
    hidden, weight, bias, labels = _inputs(1, 16, 301, ignore_every=0)
    ours = _run(hidden, weight, bias, labels, backend=backend, vocab_block_size=128)
    ref = _run(hidden, weight, bias, labels, backend="reference")
    _compare(ours, ref, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_labels_ignored(backend):
    hidden, weight, bias, labels = _inputs(6, 16, 100)
    labels[:] = -100
    logp, entropy, g_h, g_w, g_b = _run(hidden, weight, bias, labels, backend=backend)
    for name, t in dict(logp=logp, entropy=entropy, grad_hidden=g_h, grad_weight=g_w, grad_bias=g_b).items():
        assert t is not None and torch.isfinite(t).all() and (t == 0).all(), name
    stats = linear_logprobs(hidden, weight, labels, bias=bias, return_stats=True, backend=backend)
    assert all((x == 0).all() for x in stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_int32_labels_custom_ignore_index(backend):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 24, generator=g)
    weight = torch.randn(130, 24, generator=g) * 0.3
    labels = torch.randint(0, 130, (2, 7), generator=g, dtype=torch.int32)
    labels[0, :3] = -1
    labels[1, 5:] = -1
    ours = _run(hidden, weight, None, labels, backend=backend, ignore_index=-1, vocab_block_size=128)
    ref = _run(hidden, weight, None, labels, backend="reference", ignore_index=-1)
    assert ours[0].shape == ours[1].shape == (2, 7) and ours[2].shape == (2, 7, 24)
    _compare(ours, ref, 1e-5, 1e-5, has_bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_alone(backend):
    """Upstream gradient on logp only (entropy not requested), and on entropy only."""
    hidden, weight, bias, labels = _inputs(11, 20, 300)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    linear_logprobs(h1, w1, labels, bias=b1, backend=backend, vocab_block_size=128).sum().backward()
    linear_logprobs_reference(h2, w2, labels, bias=b2).sum().backward()
    for a, r, name in ((h1, h2, "hidden"), (w1, w2, "weight"), (b1, b2, "bias")):
        _assert_close(a.grad, r.grad, 1e-5, f"logp-only grad_{name}")
    h1.grad = w1.grad = b1.grad = h2.grad = w2.grad = b2.grad = None
    linear_logprobs(h1, w1, labels, bias=b1, backend=backend, return_entropy=True, vocab_block_size=128)[1].sum().backward()
    linear_logprobs_reference(h2, w2, labels, bias=b2, return_entropy=True)[1].sum().backward()
    for a, r, name in ((h1, h2, "hidden"), (w1, w2, "weight"), (b1, b2, "bias")):
        _assert_close(a.grad, r.grad, 1e-5, f"entropy-only grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_masks_tokens(backend):
    """A -inf bias entry removes a token (even a whole vocab block): finite logp, entropy and
    gradients, equal to the reference with those tokens dropped from the vocabulary."""
    hidden, weight, bias, labels = _inputs(9, 12, 300)
    masked = torch.zeros(300, dtype=torch.bool)
    masked[0:128] = True  # the whole first vocab block
    masked[200:210] = True
    bias[masked] = float("-inf")
    labels[(labels >= 0) & masked[labels.clamp(min=0)]] = 250
    ours = _run(hidden, weight, bias, labels, backend=backend, vocab_block_size=128, chunk_size=4)
    keep = ~masked
    remap = torch.cumsum(keep.long(), 0) - 1
    kept_labels = torch.where(labels == -100, labels, remap[labels.clamp(min=0)])
    ref = _run(hidden, weight[keep], bias[keep], kept_labels, backend="reference")
    _compare(ours[:3], ref[:3], 1e-5, 1e-5)
    assert (ours[3][masked] == 0).all() and (ours[4][masked] == 0).all()
    _assert_close(ours[3][keep], ref[3], 1e-5, "grad_weight")
    _assert_close(ours[4][keep], ref[4], 1e-5, "grad_bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_label_is_nan_in_its_row(backend):
    hidden, weight, _, labels = _inputs(5, 8, 40, bias=False, ignore_every=0)
    labels[1], labels[3] = 40, -7
    logp = linear_logprobs(hidden, weight, labels, backend=backend, check_labels=False)
    assert torch.isnan(logp[[1, 3]]).all()
    keep = [0, 2, 4]
    _assert_close(logp[keep], linear_logprobs_reference(hidden[keep], weight, labels[keep]), 1e-5, "logp")


def test_frozen_weight_grad_hidden_only():
    hidden, weight, _, labels = _inputs(9, 12, 200, bias=False)
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, labels, backend="torch").sum().backward()
    h2 = hidden.clone().requires_grad_()
    linear_logprobs_reference(h2, weight, labels).sum().backward()
    _assert_close(h.grad, h2.grad, 1e-5, "grad_hidden")


def test_gradcheck_fp64_torch_backend():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, -100, 10, 0, 7])

    def fn(h, w, b):
        return linear_logprobs(h, w, labels, bias=b, softcap=2.0, logit_scale=1.3, temperature=0.8,
                               return_entropy=True, backend="torch", chunk_size=2, vocab_block_size=4)  # fmt: skip

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ignored_rows_cost_no_flops(monkeypatch):
    """Only valid rows reach the matmuls (forward and backward)."""
    rows_seen = []
    original = engine.mm_into

    def counting_mm(out, a, b, bias=None):
        rows_seen.append(a.shape[0])
        return original(out, a, b, bias=bias)

    monkeypatch.setattr(engine, "mm_into", counting_mm)
    hidden, weight, bias, labels = _inputs(40, 8, 500, ignore_every=0)
    labels[:30] = -100
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, labels, bias=bias, backend="torch", vocab_block_size=128).sum().backward()
    n_blocks = 4  # ceil(500 / 128)
    assert sum(rows_seen) == 10 * n_blocks * 2  # 10 valid rows x 4 blocks x (forward + recompute)


# --------------------------------------------------------------------------------------------
# Statistics: against TRL's ChunkedLogProbFunction (its torch fallback on CPU) and the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_transforms", [False, True], ids=["plain", "softcap-scale-temp-bias"])
def test_stats_match_trl_chunked_logprob(backend, with_transforms):
    trl_kernels = pytest.importorskip("trl.kernels")
    hidden, weight, bias, labels = _inputs(45, 24, 700, bias=with_transforms, weight_scale=0.3)
    # make some labels the argmax, and one a tie with an earlier token (first argmax wins: not top-1)
    raw = hidden @ weight.T + (bias if bias is not None else 0)
    labels[1:12] = raw[1:12].argmax(-1)
    weight[699] = weight[int(labels[2])]
    if bias is not None:
        bias[699] = bias[int(labels[2])]
    labels[3] = raw[3].argmax(-1)
    labels[2] = 699  # ties with an earlier argmax -> is_top1 False
    kwargs = dict(softcap=5.0, logit_scale=1.3, temperature=0.7) if with_transforms else {}
    out = linear_logprobs(hidden, weight, labels, bias=bias, return_stats=True, backend=backend,
                          chunk_size=16, vocab_block_size=256, **kwargs)  # fmt: skip
    assert isinstance(out, LinearLogprobsOutput)

    valid = labels != -100
    trl_out = trl_kernels.ChunkedLogProbFunction.apply(
        hidden[valid], weight, bias, labels[valid], kwargs.get("temperature", 1.0), 256, kwargs.get("softcap"),
        kwargs.get("logit_scale", 1.0), ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    )  # fmt: skip
    for name, ours, theirs in zip(("logp", "entropy", "log_sum_sq_probs", "mean_logit"), out, trl_out):
        _assert_close(ours[valid], theirs, 1e-5, name)
    assert torch.equal(out.is_top1[valid], trl_out[4])
    assert out.is_top1[valid].sum() >= 10 and not out.is_top1[2]
    ref = linear_logprobs_stats_reference(hidden, weight, labels, bias=bias, **kwargs)
    for name, ours, r in zip(LinearLogprobsOutput._fields, out, ref):
        if name == "is_top1":
            assert torch.equal(ours, r)
        else:
            _assert_close(ours, r, 1e-5, name)
    assert not out.is_top1[~valid].any() and (out.lse[~valid] == 0).all()


def test_stats_logp_entropy_stay_differentiable():
    hidden, weight, bias, labels = _inputs(10, 16, 150)
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight, labels, bias=bias, return_stats=True, backend="torch")
    assert out.logp.requires_grad and out.entropy.requires_grad
    assert not out.mean_logit.requires_grad and not out.lse.requires_grad and out.is_top1.dtype == torch.bool
    (out.logp + out.entropy).sum().backward()
    h2 = hidden.clone().requires_grad_()
    lp, ent = linear_logprobs_reference(h2, weight, labels, bias=bias, return_entropy=True)
    (lp + ent).sum().backward()
    _assert_close(h.grad, h2.grad, 1e-5, "grad_hidden")


def test_reference_backend_dispatch():
    hidden, weight, bias, labels = _inputs(8, 8, 64)
    a = linear_logprobs(hidden, weight, labels, bias=bias, backend="reference", return_entropy=True)
    b = linear_logprobs(hidden, weight, labels, bias=bias, backend="torch", return_entropy=True)
    for x, y in zip(a, b):
        _assert_close(x, y, 1e-5, "reference vs torch")
    stats = linear_logprobs(hidden, weight, labels, bias=bias, backend="reference", return_stats=True)
    assert isinstance(stats, LinearLogprobsOutput)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _bad(**overrides):
    hidden, weight, bias, labels = _inputs(4, 8, 32)
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "labels")}
    return args["hidden"], args["weight"], args["labels"], kwargs


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(weight=torch.randn(32, 8, 2)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(32, 9)), ValueError, "weight.shape\\[1\\]"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer"),
        (dict(weight=torch.randn(32, 8, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(bias=torch.randn(31)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(32, dtype=torch.float64)), TypeError, "bias must have the weight's dtype"),
        (dict(labels=torch.tensor([0, 1, 32, -100])), ValueError, "labels must be in \\[0, 32\\)"),
        (dict(labels=torch.tensor([0, -5, 1, 2])), ValueError, "labels must be in"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-2.0), ValueError, "temperature"),
        (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
        (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_input_raises(overrides, exc, match):
    hidden, weight, labels, kwargs = _bad(**overrides)
    with pytest.raises(exc, match=match):
        linear_logprobs(hidden, weight, labels, **kwargs)


def test_devices_differ_raises():
    hidden, weight, _, labels = _inputs(4, 8, 32, bias=False)
    meta_weight = torch.empty(32, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        linear_logprobs(hidden, meta_weight, labels, check_labels=False)


def test_triton_backend_rejects_fp64():
    hidden, weight, _, labels = _inputs(4, 8, 32, dtype=torch.float64, bias=False)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        linear_logprobs(hidden, weight, labels, backend="triton")


# --------------------------------------------------------------------------------------------
# CPU memory: torch path vs eager, each in a fresh subprocess, peak RSS above the inputs
# --------------------------------------------------------------------------------------------
_MEMORY_WORKER = r"""
import json, sys, time
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from alignkernels import linear_logprobs

mode, real_matmul = sys.argv[1], sys.argv[2] == "1"
N, H, V = (int(x) for x in sys.argv[3:6])


class FillInsteadOfMatmul(TorchDispatchMode):
    # Replaces every GEMM by a write of its full output (same tensors allocated and touched, same
    # memory behaviour), so the test measures allocations in seconds instead of running ~4 TFLOP
    # of fp32 GEMMs on a small CPU. Every other op (softmax, the tile folds, ...) runs for real.
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.mm.default:
            return torch.full((args[0].shape[0], args[1].shape[1]), 0.01, dtype=args[0].dtype)
        if func in (aten.mm.out, aten.addmm.out):
            return kwargs["out"].fill_(0.01)
        if func is aten.addmm_.default:
            return args[0]
        if func is aten.addmm.default:
            return args[0].expand(args[1].shape[0], args[2].shape[1]).clone()
        return func(*args, **kwargs)


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])


torch.manual_seed(0)
hidden = torch.randn(N, H, requires_grad=True)
weight = (torch.randn(V, H) * 0.02).requires_grad_()
labels = torch.randint(0, V, (N,))


def eager():  # materialised logits + log_softmax (+ their gradients in backward)
    logits = hidden @ weight.T
    return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


def ours():
    return linear_logprobs(hidden, weight, labels, backend="torch")


fn = eager if mode == "eager" else ours
# Warm-up on a tiny problem first: lazy imports (the dispatch mode pulls in a few modules) must not
# count as the op's memory.
tiny = (hidden[:2].detach().requires_grad_(), weight[:64].detach().requires_grad_(), labels[:2] % 64)
with FillInsteadOfMatmul():
    (torch.log_softmax(tiny[0] @ tiny[1].T, -1).sum() + linear_logprobs(*tiny, backend="torch").sum()).backward()
(torch.log_softmax(tiny[0] @ tiny[1].T, -1).sum() + linear_logprobs(*tiny, backend="torch").sum()).backward()
del tiny
baseline = status_kb("VmRSS")
try:  # reset the high-water mark VmHWM to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:  # then VmHWM is the process-lifetime peak: over-estimates, never under-estimates
    pass
start = time.perf_counter()
if real_matmul:
    fn().sum().backward()
else:
    with FillInsteadOfMatmul():
        fn().sum().backward()
elapsed = time.perf_counter() - start
assert weight.grad is not None and hidden.grad is not None
print(json.dumps({"extra_mb": (status_kb("VmHWM") - baseline) / 1024, "seconds": elapsed}))
"""


def _peak_extra_mb(mode, shape, real_matmul):
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_WORKER, mode, "1" if real_matmul else "0", *map(str, shape)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_measurement_with_filled_gemms_matches_real_gemms():
    """The memory test below replaces GEMMs by writes of their outputs; on a shape where real GEMMs
    are cheap, both give the same peak up to the BLAS library's own packing/thread workspace, which
    only real GEMMs allocate (seen from ~10 MB to 37 MB depending on the environment: a bounded
    additive term, negligible against the >= 5x ratio the memory test asserts)."""
    blas_workspace_mb = 64
    shape = (1024, 256, 16384)
    for mode in ("eager", "ours"):
        filled = _peak_extra_mb(mode, shape, real_matmul=False)["extra_mb"]
        real = _peak_extra_mb(mode, shape, real_matmul=True)["extra_mb"]
        assert filled <= 1.1 * real + 16, ("filling overstates the GEMMs' memory", mode, filled, real)
        assert real <= 1.1 * filled + blas_workspace_mb, ("filling misses more than BLAS workspace", mode, filled, real)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_memory_vs_eager():
    """N=4096, H=512, V=131072 fp32, forward + backward (grads for hidden and weight): peak extra
    memory of the torch path vs eager. GEMMs are replaced by writes of their outputs unless
    ALIGNKERNELS_MEMTEST_REAL_MATMUL=1 (then it takes minutes on a small CPU)."""
    real = os.environ.get("ALIGNKERNELS_MEMTEST_REAL_MATMUL", "0") == "1"
    shape = (4096, 512, 131072)
    eager = _peak_extra_mb("eager", shape, real)
    ours = _peak_extra_mb("ours", shape, real)
    ratio = eager["extra_mb"] / ours["extra_mb"]
    print(f"\nCPU peak extra memory N=4096 H=512 V=131072 fp32 fwd+bwd: eager {eager['extra_mb']:.0f} MB, "
          f"linear_logprobs(torch) {ours['extra_mb']:.0f} MB -> {ratio:.1f}x less "
          f"(eager {eager['seconds']:.1f}s, ours {ours['seconds']:.1f}s, real GEMMs: {real})")  # fmt: skip
    assert eager["extra_mb"] > 2 * 2048  # sanity: eager really holds several 2 GB [N, V] fp32 tensors
    assert ratio >= 5.0


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_realistic_size_bf16_vs_reference_in_chunks():
    """N=4096, H=4096, V=128256 bf16 on the GPU (Triton backend) vs the fp32 reference computed
    chunk by chunk of rows (rows are independent, grad_weight sums over chunks)."""
    device = "cuda"
    N, H, V = 4096, 4096, 128256
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device=device, generator=g) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    labels[:512] = -100
    g_logp = torch.randn(N, device=device, generator=g)
    g_entropy = torch.randn(N, device=device, generator=g)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, entropy = linear_logprobs(h, w, labels, return_entropy=True, backend="triton")
    (logp * g_logp + entropy * g_entropy).sum().backward()
    torch.cuda.synchronize()
    extra_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    # gradients (bf16: 64 MB + 1 GB) + workspace (<= ~1 GB)
    assert extra_gb < 2.6, extra_gb

    w_ref = weight.float().requires_grad_()
    grad_w_ref = torch.zeros(V, H, device=device)
    for r0 in range(0, N, 512):
        rows = slice(r0, r0 + 512)
        h_ref = hidden[rows].float().requires_grad_()
        lp, ent = linear_logprobs_reference(h_ref, w_ref, labels[rows], return_entropy=True)
        (lp * g_logp[rows] + ent * g_entropy[rows]).sum().backward()
        grad_w_ref += w_ref.grad
        w_ref.grad = None
        _assert_close(logp[rows], lp.detach(), 1e-4, "logp")
        _assert_close(entropy[rows], ent.detach(), 1e-4, "entropy")
        _assert_close(h.grad[rows], h_ref.grad, 2e-2, "grad_hidden")
    _assert_close(w.grad, grad_w_ref, 2e-2, "grad_weight")


def test_process_group_needs_the_shard_layout():
    hidden, weight, labels = torch.randn(3, 8), torch.randn(11, 8), torch.randint(0, 11, (3,))
    with pytest.raises(ValueError, match="vocab_start= and vocab_size="):
        linear_logprobs(hidden, weight, labels, process_group=object())


# --------------------------------------------------------------------------------------------
# Precision at large |z|: logits at offsets ±1e4, temperature 0.01 / 1 / 100, vs fp64 eager
# --------------------------------------------------------------------------------------------
def offset_head(rows, V, offset, seed=0):
    """Hidden/weight whose fp32 GEMM is exact: ``h[r] = [1, e_r]`` and ``W[:, 0] = offset``, the other
    weights multiples of 1/16, so ``logits[r, v] = offset + W[v, 1 + r]`` -- and ``grad_weight[:, 1 + r]``
    is exactly d logp / d logits of row r (one product each)."""
    g = torch.Generator().manual_seed(V + seed)
    hidden = torch.cat((torch.ones(rows, 1), torch.eye(rows)), 1)
    weight = torch.cat((torch.full((V, 1), float(offset)), (torch.randn(V, rows, generator=g) * 48).round() / 16), 1)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[0] = weight[:, 1].argmax()  # the likeliest token
    return hidden, weight, labels


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("V", [1, 3, 50257, 151936])
@pytest.mark.parametrize("temperature", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("offset", [-1e4, 0.0, 1e4])
def test_precision_at_large_logits(backend, V, temperature, offset):
    hidden, weight, labels = offset_head(2 if V > 1000 else 3, V, offset)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    h, w = hidden.to(dev, copy=True).requires_grad_(), weight.to(dev, copy=True).requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp, ent = linear_logprobs(h, w, labels.to(dev), temperature=temperature, return_entropy=True, backend=backend)
    logp_r, ent_r = linear_logprobs_reference(h64, w64, labels, temperature=temperature, return_entropy=True)
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    (logp * g_logp.to(dev) + ent * g_ent.to(dev)).sum().backward()
    (logp_r * g_logp + ent_r * g_ent).sum().backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in (w, w64)]  # V = 1: no graph to W
    errors = {"logp": max_rel_error(logp, logp_r, floor=1.0), "entropy": max_rel_error(ent, ent_r, floor=1.0),
              "d logits": max_rel_error(grads[0][:, 1:], grads[1][:, 1:],
                                         floor=GRAD_FLOOR if V > 1 else 1 / temperature)}  # fmt: skip
    # eager fp32 (the reference backend): ATen's CPU log_softmax sums a row in fp32 lanes: ~2e-6 at V = 50k, ~5e-6 at 152k
    tol = 1e-5 if backend == "reference" and V > 10_000 and not HAS_CUDA else 2e-6
    assert max(errors.values()) < tol, errors
