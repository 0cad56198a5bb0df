"""token_logprobs: every backend against the eager reference, values and gradients."""
import pytest
import torch

import alignkernels
from alignkernels.reference import token_logprobs_reference
from helpers import GRAD_FLOOR, HAS_CUDA, TRITON_DEVICE, max_rel_error

# (rtol, atol) for values and gradients, per input dtype. Outputs are accumulated in fp32 in
# every backend; half-precision inputs only change the gradient's rounding (it is written in the
# logits' dtype), so the gradient tolerance is one or two ulps of that dtype.
VALUE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2e-5), torch.float16: (1e-5, 2e-5)}
# Gradient atol is relative to the gradient's scale (max |grad|): entries far below the row's
# largest are absolute-error dominated (fp32 cancellation in p·(z - Σp·z)).
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 4e-3), torch.float16: (2e-3, 1e-3)}

BACKENDS = ["torch", "triton"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else ("cuda" if HAS_CUDA else "cpu")


def _make(shape, V, dtype, device, ignore_frac=0.25, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * scale).to(dtype).to(device)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return logits, labels.to(device)


def _check(backend, logits, labels, temperature=1.0, dtype=torch.float32, with_entropy=True):
    x = logits.detach().clone().requires_grad_()
    x_ref = logits.detach().clone().requires_grad_()
    logp, ent = alignkernels.token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
    # The truth: the eager reference evaluated in fp64 (the fp32 reference itself is ~1e-5 off at V=152k).
    logp_r, ent_r = token_logprobs_reference(x_ref.double(), labels, temperature=temperature, return_entropy=True)
    logp_r, ent_r = logp_r.float(), ent_r.float()
    rtol, atol = VALUE_TOL[dtype]
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    torch.testing.assert_close(logp, logp_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(ent, ent_r, rtol=rtol, atol=atol)
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(labels.shape, generator=g).to(logp.device)
    g_ent = torch.randn(labels.shape, generator=g).to(logp.device)
    if with_entropy:
        (logp * g_logp + ent * g_ent).sum().backward()
        (logp_r * g_logp + ent_r * g_ent).sum().backward()
    else:
        (logp * g_logp).sum().backward()
        (logp_r * g_logp).sum().backward()
    rtol, atol = GRAD_TOL[dtype]
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    scale = x_ref.grad.abs().max().item() or 1.0
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=rtol, atol=atol * scale)
    return logp, ent, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "shape,V",
    [((1,), 7), ((5,), 1000), ((2, 3), 50257), ((3,), 4096), ((2,), 4097), ((4, 5), 300)],
    ids=["N1-V7", "N5-V1000", "B2T3-V50257", "V4096", "V4097", "B4T5-V300"],
)
def test_matches_reference(backend, dtype, shape, V):
    logits, labels = _make(shape, V, dtype, _device(backend))
    _check(backend, logits, labels, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_temperature(backend, temperature):
    logits, labels = _make((3, 4), 513, torch.float32, _device(backend))
    _check(backend, logits, labels, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_gradient(backend):
    logits, labels = _make((6,), 777, torch.float32, _device(backend))
    _check(backend, logits, labels, with_entropy=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    logits, labels = _make((6,), 777, torch.float32, _device(backend))
    x = logits.clone().requires_grad_()
    _, ent = alignkernels.token_logprobs(x, labels, return_entropy=True, backend=backend)
    ent.sum().backward()
    x_ref = logits.clone().requires_grad_()
    _, ent_r = token_logprobs_reference(x_ref, labels, return_entropy=True)
    ent_r.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_positions_ignored(backend):
    logits, labels = _make((3, 4), 129, torch.float32, _device(backend))
    labels[:] = -100
    logp, ent, grad = _check(backend, logits, labels)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    assert torch.all(grad == 0) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_huge_logits_stay_finite(backend):
    # An ignored row never has its lse computed by the kernel: its gradient must still be 0, not NaN.
    logits, labels = _make((4,), 100, torch.float32, _device(backend))
    logits[1] = 1e4
    labels[1] = -100
    _, _, grad = _check(backend, logits, labels)
    assert torch.all(grad[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_slice_is_read_in_place(backend):
    # logits[:, :-1] -- the usual causal-LM shift -- is strided in the leading dims.
    logits, labels = _make((3, 6), 257, torch.float32, _device(backend))
    sliced = logits[:, :-1]
    assert not sliced.is_contiguous()
    _check(backend, sliced, labels[:, 1:].contiguous())


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_strided_layouts(backend):
    logits, labels = _make((4, 3, 5), 64, torch.float32, _device(backend))
    _check(backend, logits[:, 1:, ::2], labels[:, 1:, ::2])  # non-mergeable leading dims -> copy path
    _check(backend, logits.transpose(0, 1), labels.transpose(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_label_dtypes(backend, label_dtype):
    logits, labels = _make((5,), 333, torch.float32, _device(backend))
    _check(backend, logits, labels.to(label_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, labels = _make((8,), 50, torch.float32, _device(backend), ignore_frac=0.0)
    labels[::2] = 0
    logp = alignkernels.token_logprobs(logits, labels, ignore_index=0, backend=backend)
    assert torch.all(logp[::2] == 0) and torch.all(logp[1::2] < 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_label_is_nan_not_a_crash(backend):
    logits, labels = _make((3,), 40, torch.float32, _device(backend), ignore_frac=0.0)
    labels[1] = 40
    logp = alignkernels.token_logprobs(logits, labels, backend=backend, check_labels=False)
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()


def test_backends_agree_bitwise_with_themselves():
    logits, labels = _make((4, 3), 999, torch.float32, TRITON_DEVICE)
    a = alignkernels.token_logprobs(logits, labels, backend="triton")
    b = alignkernels.token_logprobs(logits, labels, backend="triton")
    assert torch.equal(a, b)


def test_torch_backend_gradcheck_fp64():
    logits, labels = _make((3, 2), 11, torch.float64, "cpu", ignore_frac=0.2, scale=1.0)
    labels[0, 0] = -100
    x = logits.clone().requires_grad_()

    def f(t):
        return alignkernels.token_logprobs(t, labels, temperature=0.8, return_entropy=True, backend="torch")

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_backend_chunks_many_rows(monkeypatch):
    # Force many small chunks so chunk boundaries (including inside a [B, T] slice) are exercised.
    import alignkernels.ops._logits_engine as engine

    monkeypatch.setattr(engine, "TORCH_CHUNK_ELEMENTS", 3 * 97)
    logits, labels = _make((4, 7), 97, torch.float32, "cpu")
    _check("torch", logits, labels)
    _check("torch", logits[:, :-1], labels[:, 1:].contiguous())


def test_reference_backend_and_auto():
    logits, labels = _make((2, 3), 31, torch.float32, "cpu")
    ref = token_logprobs_reference(logits, labels)
    torch.testing.assert_close(alignkernels.token_logprobs(logits, labels, backend="reference"), ref)
    torch.testing.assert_close(alignkernels.token_logprobs(logits, labels), ref, rtol=1e-5, atol=1e-6)


def test_env_var_forces_backend(monkeypatch):
    from alignkernels.ops._logits_engine import TOKEN_KERNELS

    logits, labels = _make((2,), 31, torch.float32, "cpu")
    seen = []
    original = TOKEN_KERNELS["torch"]

    class Counting(type(original)):
        def forward(self, *args):
            seen.append(1)
            return super().forward(*args)

    monkeypatch.setitem(TOKEN_KERNELS, "torch", Counting())
    monkeypatch.setenv("ALIGNKERNELS_BACKEND", "reference")
    alignkernels.token_logprobs(logits, labels)
    assert not seen
    monkeypatch.setenv("ALIGNKERNELS_BACKEND", "torch")
    alignkernels.token_logprobs(logits, labels)
    assert seen


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        (lambda x, y: (x, y[:, :-1]), ValueError, "labels must have shape"),
        (lambda x, y: (x, y.float()), TypeError, "labels must be an integer"),
        (lambda x, y: (x.long(), y), TypeError, "logits must be a floating"),
        (lambda x, y: (x, torch.full_like(y, 50)), ValueError, r"labels must be in \[0, 50\)"),
        (lambda x, y: (x, torch.full_like(y, -1)), ValueError, "found -1"),
        (lambda x, y: (x.numpy(), y), TypeError, "logits must be a torch.Tensor"),
        (lambda x, y: (x, y.to("meta")), ValueError, "same device"),
    ],
    ids=["shape", "float-labels", "int-logits", "label-too-big", "negative-label", "numpy", "device"],
)
def test_bad_input_errors(make_args, exc, match):
    logits, labels = _make((2, 3), 50, torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        alignkernels.token_logprobs(*make_args(logits, labels))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    logits, labels = _make((2,), 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="temperature"):
        alignkernels.token_logprobs(logits, labels, temperature=temperature)


def test_bad_backend_name():
    logits, labels = _make((2,), 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        alignkernels.token_logprobs(logits, labels, backend="cudnn")


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, labels = _make((2,), 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        alignkernels.token_logprobs(logits, labels, backend="triton")


# ----------------------------------------------------------------------------------------------
# Real GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("V", [32000, 128256, 151936])
def test_gpu_realistic_sizes(dtype, V):
    logits, labels = _make((4, 512), V, dtype, "cuda")
    _check("triton", logits, labels, temperature=0.9, dtype=dtype)
    _check("torch", logits, labels, temperature=0.9, dtype=dtype)


def test_process_group_needs_the_shard_layout():
    logits, labels = _make((2,), 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="vocab_start= and vocab_size="):
        alignkernels.token_logprobs(logits, labels, process_group=object())


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_gradient_has_no_onehot(backend):
    # With the check off, a label outside [0, V) (e.g. a label owned by another vocab shard) gets
    # no one-hot term in the gradient: d logits = -g * p, identically on every backend.
    logits, labels = _make((3,), 40, torch.float32, _device(backend), ignore_frac=0.0)
    labels[1] = -1
    x = logits.clone().requires_grad_()
    logp = alignkernels.token_logprobs(x, labels, backend=backend, check_labels=False)
    torch.autograd.backward([logp[1]], [torch.ones(())])
    p = torch.softmax(logits[1].double(), -1).float()
    torch.testing.assert_close(x.grad[1], -p, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Precision at large |z|: offset logits and low / high temperature, every backend, vs fp64 eager
# ----------------------------------------------------------------------------------------------
PRECISION_TOL = 2e-6
OFFSETS = [-1e4, 0.0, 1e4]
TEMPERATURES = [0.01, 1.0, 100.0]


def precision_errors(op, x, labels, temperature, grad_floor=GRAD_FLOOR, **kwargs):
    """Max relative errors of (logp, entropy, d logits through both outputs) of ``op`` on fp32
    ``x`` against the fp64 eager reference on the same inputs."""
    a = x.detach().clone().requires_grad_()
    b = x.detach().cpu().double().requires_grad_()
    logp, ent = op(a, labels, temperature=temperature, return_entropy=True, **kwargs)
    logp_r, ent_r = token_logprobs_reference(b, labels.cpu(), temperature=temperature, return_entropy=True)
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    (logp * g_logp.to(logp.device) + ent * g_ent.to(logp.device)).sum().backward()
    (logp_r * g_logp + ent_r * g_ent).sum().backward()
    return (max_rel_error(logp, logp_r, floor=1.0), max_rel_error(ent, ent_r, floor=1.0),
            max_rel_error(a.grad, b.grad, floor=grad_floor))  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("V", [1, 3, 50257, 151936])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_precision_at_large_logits(backend, V, temperature, offset):
    rows = 2 if V > 1000 else 3  # row 0: the argmax label (near-delta at T = 0.01); row 1: a random one
    g = torch.Generator().manual_seed(V)
    x = torch.randn(rows, V, generator=g) * 3 + offset
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[0] = x[0].argmax()  # the likeliest token: its gradient is the one that cancels most
    errors = precision_errors(alignkernels.token_logprobs, x.to(_device(backend)), labels.to(_device(backend)),
                              temperature, grad_floor=GRAD_FLOOR if V > 1 else 1 / temperature,
                              backend=backend)  # fmt: skip
    # (V = 1: the exact gradient is 0; fp32 leaves ~1 ulp of p = 1, i.e. ~6e-8 / T: compared to 1/T)
    # The reference backend is eager fp32: ATen's CPU log_softmax sums a row in fp32 lanes, ~5e-6 off
    # at V = 152k (whatever the offset); everything else holds 2e-6.
    tol = 1e-5 if backend == "reference" and V > 10_000 and not HAS_CUDA else PRECISION_TOL
    assert max(errors) < tol, dict(zip(("logp", "entropy", "grad"), errors))
