"""``fused_linear_cross_entropy``: the SFT loss in three GEMMs == the fp64 eager loss, TRL's SFT
semantics, and the matmul FLOPs it dispatches (6·n·H·V, against 8·n·H·V for a log-prob head +
autograd)."""
import pytest
import torch

import alignkernels
from alignkernels.flops import MatmulFlopCounter
from alignkernels.losses.fused import fused_linear_cross_entropy
from alignkernels.reference import transform_logits
from helpers import TRITON_DEVICE

BACKENDS = ["torch", "triton"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _inputs(shape=(3, 13), H=24, V=301, *, dtype=torch.float32, device="cpu", seed=0, ignore_frac=0.3, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g) * 0.7
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    if len(shape) == 2:
        labels[-1] = -100  # a fully ignored sequence
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    return to(hidden), to(weight), to(b), labels.to(device)


def _truth(hidden, weight, bias, labels, *, temperature=1.0, softcap=None, logit_scale=1.0, loss_type="nll",
           num_items_in_batch=None, reduction="mean"):  # fmt: skip
    """fp64 eager loss + gradients (TRL SFTTrainer.compute_loss on materialised logits)."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = h @ w.T + (b if b is not None else 0.0)
    z = transform_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    logp_all = torch.log_softmax(z, -1)
    mask = labels != -100
    logp = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    per_token = -logp if loss_type == "nll" else -logp * logp.detach().exp()
    if reduction == "sum":
        den = 1.0
    else:
        den = torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch).double().clamp(min=1)
    loss = per_token.sum() / den
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return loss.detach(), entropy.detach(), grads


def _close(got, want, rtol=1e-5, atol=1e-6, scale=False):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if scale:
        atol = atol * max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


CONFIGS = [
    dict(),
    dict(softcap=3.0, temperature=0.7, logit_scale=1.3),
    dict(loss_type="dft"),
    dict(num_items_in_batch=57),
    dict(reduction="sum", temperature=1.5),
]
CONFIG_IDS = ["plain", "softcap-temp-scale", "dft", "num_items", "sum"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_matches_fp64_eager(backend, kwargs, chunk_size):
    hidden, weight, bias, labels = _inputs(device=_device(backend))
    loss, entropy = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend,
                                               chunk_size=chunk_size, return_entropy=True, **kwargs)  # fmt: skip
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    want_loss, want_entropy, want_grads = _truth(hidden, weight, bias, labels, **kwargs)
    _close(loss, want_loss)
    _close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-5, atol=1e-5, scale=True)


def test_fp64_finite_differences():
    """Central differences of the fp64 torch backend (the gradient is formed in the forward, so
    ``gradcheck``'s repeated backward of one graph does not apply: see the next test)."""
    hidden, weight, bias, labels = _inputs((2, 3), H=5, V=11, dtype=torch.float64)
    kw = dict(backend="torch", softcap=2.0, temperature=0.8, chunk_size=2)
    grads = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **kw),
                                [hidden, weight, bias])  # fmt: skip
    eps = 1e-6
    for x, g in zip((hidden, weight, bias), grads):
        for i in range(0, x.numel(), 7):
            with torch.no_grad():
                x.view(-1)[i] += eps
                up = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
                x.view(-1)[i] -= 2 * eps
                down = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
                x.view(-1)[i] += eps
            assert abs((up - down).item() / (2 * eps) - g.view(-1)[i].item()) < 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_logits_low_temperature_exact(backend):
    """Logits exactly representable in fp32 (quarter-integer inputs), offset by 4096 through the bias,
    temperature 1/16 (exact division): z ~ 65536, where one fp32 lse carries ~4e-3 of rounding.
    The centred state (row max, log Σe^(z−m)) keeps logp, entropy and gradients at ~1e-6."""
    g = torch.Generator().manual_seed(3)
    H, V, N = 8, 203, 17
    device = _device(backend)
    hidden = (torch.randint(-4, 5, (N, H), generator=g) / 4.0).to(device).requires_grad_()
    weight = (torch.randint(-4, 5, (V, H), generator=g) / 16.0).to(device).requires_grad_()
    bias = torch.full((V,), 4096.0).to(device).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    kw = dict(temperature=1.0 / 16)
    loss, entropy = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend,
                                               return_entropy=True, **kw)  # fmt: skip
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    want_loss, want_entropy, want_grads = _truth(hidden, weight, bias, labels, **kw)
    _close(loss, want_loss, rtol=1e-5, atol=1e-5)
    _close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        _close(got, want, rtol=1e-5, atol=1e-5, scale=True)


def test_half_inputs_triton():
    """fp16 under the interpreter (bf16 on a GPU too): GEMMs in the input dtype, stats in fp32."""
    dtypes = [torch.float16] + ([torch.bfloat16] if TRITON_DEVICE == "cuda" else [])
    for dtype in dtypes:
        hidden, weight, bias, labels = _inputs(dtype=dtype, device=TRITON_DEVICE)
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend="triton", chunk_size=7)
        grads = torch.autograd.grad(loss, [hidden, weight, bias])
        want_loss, _, want_grads = _truth(hidden, weight, bias, labels)
        assert loss.dtype == torch.float32
        _close(loss, want_loss, rtol=2e-3, atol=1e-3)
        for got, want in zip(grads, want_grads):
            assert got.dtype == dtype
            _close(got, want, rtol=2e-2, atol=2e-2, scale=True)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_fully_ignored_batch_is_zero_without_nan(backend):
    hidden, weight, bias, labels = _inputs(device=_device(backend))
    labels = torch.full_like(labels, -100)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend)
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_bias_removes_tokens(backend):
    hidden, weight, bias, labels = _inputs((9,), V=40, device=_device(backend), ignore_frac=0.0)
    with torch.no_grad():
        bias[::3] = float("-inf")
    labels = torch.where(labels % 3 == 0, labels + 1, labels)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend)
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    keep = torch.arange(40) % 3 != 0
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach()[keep].clone().requires_grad_()
    remap = torch.cumsum(keep.long(), 0) - 1
    want = fused_linear_cross_entropy(h2, w2, remap.to(labels.device)[labels], bias=bias.detach()[keep],
                                      backend="reference")  # fmt: skip
    wh, ww = torch.autograd.grad(want, [h2, w2])
    _close(loss, want)
    _close(gh, wh, scale=True, atol=1e-5)
    _close(gw[keep], ww, scale=True, atol=1e-5)
    assert (gw[~keep] == 0).all()


def test_matches_trl_sft_loss_and_stats():
    """TRL 1.16's fused head (``ChunkedLogProbFunction``) + SFTTrainer's reduction and metrics."""
    kernels = pytest.importorskip("trl.kernels")
    hidden, weight, bias, labels = _inputs()
    out = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True, num_items_in_batch=31)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    mask = labels != -100
    per_token = kernels.ChunkedLogProbFunction.apply(h2[mask], w2, b2, labels[mask], 1.0, 4096, None, 1.0,
                                                     ("entropy", "is_top1"))  # fmt: skip
    log_probs, entropy, _, _, is_top1 = per_token
    loss_trl = -log_probs.sum() / torch.as_tensor(31).clamp(min=1)
    grads_trl = torch.autograd.grad(loss_trl, [h2, w2, b2])
    _close(out.loss, loss_trl)
    for got, want in zip(grads, grads_trl):
        _close(got, want, atol=1e-5, scale=True)
    _close(out.entropy[mask], entropy, atol=1e-5)
    assert torch.equal(out.is_top1[mask], is_top1)
    assert int(out.num_tokens) == int(mask.sum())


def _flops(fn):
    with MatmulFlopCounter() as counter:
        fn()
    return counter.total


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_gemms_of_flops(backend):
    """Forward + backward dispatch 6·n·H·V matmul FLOPs (n = valid tokens), a log-prob head plus
    autograd 8·n·H·V: counted, not timed."""
    hidden, weight, bias, labels = _inputs((4, 16), H=32, V=257, device=_device(backend), seed=5, bias=False)
    n = int((labels != -100).sum())
    unit = 2 * n * 32 * 257
    ours = _flops(lambda: fused_linear_cross_entropy(hidden, weight, labels, backend=backend, chunk_size=9).backward())
    four = _flops(lambda: alignkernels.linear_logprobs(hidden, weight, labels, backend=backend).sum().backward())
    assert abs(ours / unit - 3.0) < 0.01, ours / unit
    assert abs(four / unit - 4.0) < 0.02, four / unit


def test_flop_counter_sees_inplace_and_out_variants():
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    acc = torch.zeros(4, 6)
    with MatmulFlopCounter() as counter:
        acc.addmm_(a, b)
        torch.mm(a, b, out=acc)
        torch.addmm(acc, a, b, out=acc)
        torch.baddbmm(torch.zeros(2, 4, 6), a.expand(2, 4, 5), b.expand(2, 5, 6))
        _ = a @ b
    assert counter.total == 4 * 2 * 4 * 5 * 6 + 2 * 2 * 4 * 5 * 6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch"),
        (dict(loss_type="focal"), ValueError, "loss_type"),
        (dict(backend="cuda"), ValueError, "fused_linear_cross_entropy has no backend='cuda'"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    hidden, weight, bias, labels = _inputs()
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_tensors_name_themselves():
    hidden, weight, bias, labels = _inputs()
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(hidden, weight, labels.masked_fill(labels == -100, 301))
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(TypeError, match="same dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(TypeError, match="bias must have the weight's dtype"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=bias.detach().double())


def test_upstream_gradient_scales():
    hidden, weight, bias, labels = _inputs()
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    g1 = torch.autograd.grad(loss * 3.0, [hidden, weight, bias])
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    g2 = torch.autograd.grad(loss, [hidden, weight, bias])
    for a, b in zip(g1, g2):
        _close(a, 3.0 * b, scale=True)


def test_exported():
    assert alignkernels.fused_linear_cross_entropy is fused_linear_cross_entropy
