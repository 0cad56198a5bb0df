"""``linear_logprobs(..., lora=(lora_A, lora_B, scaling))``: LoRA on the lm_head fused in the tiles,
against an eager PEFT-wrapped head (materialised logits), with a FLOP count proving that a frozen
base weight costs no weight-gradient GEMM, and the refusal of bad adapters."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignkernels import fused_linear_cross_entropy, linear_logprobs
from alignkernels.losses.fused import fused_linear_grpo_loss

peft = pytest.importorskip("peft")

N, H, V, R = 11, 16, 300, 4
SCALING_ALPHA = 6  # PEFT scaling = alpha / r = 1.5


class _Head(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=bias)


def _peft_head(dtype, bias=True, seed=0):
    """A PEFT LoRA-wrapped lm_head with a non-zero lora_B (PEFT initialises it to zero)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_Head(bias), peft.LoraConfig(r=R, lora_alpha=SCALING_ALPHA, lora_dropout=0.0,
                                                             target_modules=["lm_head"]))  # fmt: skip
    model = model.to(dtype)
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.base_layer.weight.mul_(3.0)
        head.lora_B["default"].weight.normal_(0, 0.3)
    return head


def _lora_of(head):
    return (head.lora_A["default"].weight, head.lora_B["default"].weight, head.scaling["default"])


def _inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    g_logp = torch.randn(N, generator=g).to(dtype)
    g_ent = torch.randn(N, generator=g).to(dtype)
    return hidden, labels, g_logp, g_ent


def _eager(head, hidden, labels, *, softcap, temperature, logit_scale):
    """Materialised logits of the PEFT head -> transform -> log_softmax: the eager baseline."""
    z = head(hidden) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logprobs = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != -100
    logp = logprobs.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return logp, entropy


def _grads(head, hidden, outputs, g_logp, g_ent):
    lora_A, lora_B, _ = _lora_of(head)
    loss = (outputs[0] * g_logp).sum() + (outputs[1] * g_ent).sum()
    params = [hidden, lora_A, lora_B] + ([head.base_layer.bias] if head.base_layer.bias is not None else [])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias,softcap,temperature,logit_scale", [(True, 4.0, 0.7, 1.0), (False, None, 1.0, 1.3)])
def test_lora_head_matches_eager_peft(backend, bias, softcap, temperature, logit_scale):
    # fp64 on the torch fold; the Triton interpreter runs fp32 (its kernels take fp32/half tiles)
    dtype, rel = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 2e-5)
    head = _peft_head(dtype, bias=bias)
    head.base_layer.weight.requires_grad_(False)  # PEFT freezes the base
    if bias:
        head.base_layer.bias.requires_grad_(True)  # a trainable bias next to the frozen weight
    hidden, labels, g_logp, g_ent = _inputs(dtype)
    tr = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale)

    h_ref = hidden.clone().requires_grad_()
    ref = _eager(head, h_ref, labels, **tr)
    ref_grads = _grads(head, h_ref, ref, g_logp, g_ent)

    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, head.base_layer.weight, labels, bias=head.base_layer.bias, lora=_lora_of(head),
                          return_entropy=True, backend=backend, chunk_size=4, vocab_block_size=128, **tr)  # fmt: skip
    grads = _grads(head, h, out, g_logp, g_ent)
    names = ["logp", "entropy", "grad_hidden", "grad_lora_A", "grad_lora_B", "grad_bias"]
    for name, a, b in zip(names, (*out, *grads), (*ref, *ref_grads)):
        scale = max(b.abs().max().item(), 1e-6)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rel * scale, f"{name}: {err:.3e} > {rel:.0e} * {scale:.3e}"
    assert ref_grads[1].abs().max() > 0 and ref_grads[2].abs().max() > 0  # the adapter really is in play


def test_lora_stats_and_weight_grad_match_reference():
    """return_stats (TRL's statistics) and the gradient of a trainable base weight, vs the reference backend."""
    head = _peft_head(torch.float64)
    hidden, labels, g_logp, g_ent = _inputs(torch.float64, seed=3)
    lora = _lora_of(head)
    results = []
    for backend in ("torch", "reference"):
        w = head.base_layer.weight.detach().clone().requires_grad_()
        out = linear_logprobs(hidden, w, labels, bias=head.base_layer.bias, lora=lora, return_stats=True,
                              backend=backend, softcap=5.0, vocab_block_size=128)  # fmt: skip
        grad_w, grad_b = torch.autograd.grad((out.logp * g_logp + out.entropy * g_ent).sum(), [w, lora[1]])
        results.append((*out, grad_w, grad_b))
    for name, a, b in zip(["logp", "entropy", "log_sum_sq_probs", "mean_logit", "is_top1", "lse", "grad_weight",
                           "grad_lora_B"], *results):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


# --------------------------------------------------------------------------------------------
# FLOPs: a frozen base weight costs no grad_weight GEMM
# --------------------------------------------------------------------------------------------
_aten = torch.ops.aten
_MATMULS = {_aten.mm, _aten.addmm, _aten.addmm_, _aten.bmm, _aten.baddbmm, _aten.baddbmm_}


class _MatmulFlops(TorchDispatchMode):
    """Counts 2·m·k·n for every dispatched mm / addmm / bmm, functional, in-place and ``out=`` alike."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _MATMULS:
            a, b = (args[0], args[1]) if func.overloadpacket in (_aten.mm, _aten.bmm) else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **kwargs)


def _count(weight_requires_grad):
    head = _peft_head(torch.float32)
    hidden, labels, g_logp, g_ent = _inputs(torch.float32, seed=5)
    weight = head.base_layer.weight.detach().requires_grad_(weight_requires_grad)
    lora_A, lora_B = (t.detach().requires_grad_() for t in _lora_of(head)[:2])
    scaling = _lora_of(head)[2]
    h = hidden.clone().requires_grad_()
    with _MatmulFlops() as counter:
        logp, entropy = linear_logprobs(h, weight, labels, lora=(lora_A, lora_B, scaling), return_entropy=True,
                                        backend="torch", chunk_size=4, vocab_block_size=128)  # fmt: skip
        forward = counter.flops
        ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    assert h.grad is not None and lora_A.grad is not None and lora_B.grad is not None
    assert (weight.grad is not None) == weight_requires_grad
    return forward, counter.flops - forward, int((labels != -100).sum())


def test_frozen_weight_costs_no_grad_weight_gemm():
    fwd_frozen, bwd_frozen, n = _count(False)
    fwd_train, bwd_train, _ = _count(True)
    nvh, nvr, nrh = 2 * n * V * H, 2 * n * V * R, 2 * n * R * H
    # forward: u = s·h·Aᵀ, then per tile h·W[block]ᵀ + u·B[block]ᵀ
    assert fwd_frozen == fwd_train == nrh + nvh + nvr
    # backward (frozen): recompute u and the tiles; dh += dx·W; dU += dx·B; dB += dxᵀ·u; dh += s·dU·A; dA = s·dUᵀ·h
    assert bwd_frozen == nrh + (nvh + nvr) + nvh + nvr + nvr + nrh + nrh
    # a trainable weight adds exactly the one grad_weight GEMM dxᵀ·h
    assert bwd_train - bwd_frozen == nvh


# --------------------------------------------------------------------------------------------
# Fused losses pass the adapter through
# --------------------------------------------------------------------------------------------
def test_fused_grpo_loss_with_lora_equals_merged_head():
    head = _peft_head(torch.float64)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.1 - 5
    lora_A, lora_B, scaling = _lora_of(head)
    weight = head.base_layer.weight.detach()
    loss, _ = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, old_logp=old, lora=(lora_A, lora_B, scaling),
                                     backend="torch")  # fmt: skip
    grads = torch.autograd.grad(loss, [lora_A, lora_B])
    merged = weight + scaling * lora_B @ lora_A  # W + s·B·A, differentiable in A and B
    ref, _ = fused_linear_grpo_loss(hidden, merged, ids, adv, mask, old_logp=old, backend="torch")
    ref_grads = torch.autograd.grad(ref, [lora_A, lora_B])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_fused_cross_entropy_with_lora_equals_merged_head(loss_type):
    head = _peft_head(torch.float64)
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 5, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = -100
    lora_A, lora_B, scaling = _lora_of(head)
    weight = head.base_layer.weight.detach()
    loss = fused_linear_cross_entropy(hidden, weight, labels, lora=(lora_A, lora_B, scaling),
                                                   loss_type=loss_type, softcap=3.0, backend="torch")  # fmt: skip
    grads = torch.autograd.grad(loss, [hidden, lora_A, lora_B])
    merged = weight + scaling * lora_B @ lora_A
    ref = fused_linear_cross_entropy(hidden, merged, labels, loss_type=loss_type, softcap=3.0,
                                                  backend="torch")  # fmt: skip
    ref_grads = torch.autograd.grad(ref, [hidden, lora_A, lora_B])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _eager_cross_entropy(head, hidden, labels, *, softcap):
    """SFT nll from the PEFT head's materialised logits: mean of −log p(label) over valid labels."""
    z = head(hidden)
    z = softcap * torch.tanh(z / softcap)
    logprobs = torch.log_softmax(z, dim=-1)
    valid = labels != -100
    return -(logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid).sum() / valid.sum()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("trainable", ["hidden+adapter", "adapter-only", "all"])
def test_three_gemm_cross_entropy_with_lora_matches_eager_peft(backend, trainable):
    """The LoRA term rides in the three GEMMs (K = H + r): loss and the gradients of hidden, weight,
    bias, lora_A and lora_B against the eager PEFT head (fp64 oracle; the Triton interpreter runs
    fp32, within 2e-6)."""
    dtype, rel = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 2e-6)
    head = _peft_head(torch.float64, bias=True, seed=4)
    hidden, labels, _, _ = _inputs(torch.float64, seed=6)
    wants = {"hidden+adapter": (True, False), "adapter-only": (False, False), "all": (True, True)}[trainable]
    params64 = [hidden.clone().requires_grad_(wants[0]), head.base_layer.weight.detach().clone().requires_grad_(wants[1]),
                head.base_layer.bias, *_lora_of(head)[:2]]  # fmt: skip
    params = [p.detach().to(dtype).requires_grad_(p.requires_grad) for p in params64]
    ref_head = _peft_head(torch.float64, bias=True, seed=4)
    with torch.no_grad():
        ref_head.base_layer.weight.copy_(params64[1])
    ref_params = [params64[0], ref_head.base_layer.weight, ref_head.base_layer.bias, *_lora_of(ref_head)[:2]]
    ref_head.base_layer.weight.requires_grad_(wants[1])
    ref = _eager_cross_entropy(ref_head, params64[0], labels, softcap=4.0)
    want = [p for p in ref_params if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, want)

    h, w, b, lora_A, lora_B = params
    loss = fused_linear_cross_entropy(h, w, labels, bias=b, lora=(lora_A, lora_B, _lora_of(head)[2]), softcap=4.0,
                                      backend=backend, chunk_size=4)  # fmt: skip
    grads = torch.autograd.grad(loss, [p for p in params if p.requires_grad])
    assert len(grads) == len(ref_grads) >= 2
    for i, (a, r) in enumerate(zip((loss, *grads), (ref, *ref_grads))):
        err = (a.double() - r).abs().max().item()
        assert err <= rel * max(r.abs().max().item(), 1e-6), f"output {i}: {err:.3e}"
    assert ref_grads[-1].abs().max() > 0 and ref_grads[-2].abs().max() > 0  # the adapter really is in play


@pytest.mark.parametrize("loss_fn", ["grpo", "ppo"])
def test_fused_policy_loss_three_gemm_path_takes_lora(loss_fn):
    """GRPO/PPO on the three-GEMM head with lora=: the four-GEMM path's loss and gradients (fp64)."""
    from alignkernels.losses.fused import fused_linear_ppo_loss

    head = _peft_head(torch.float64)
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 5, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[0, 4:] = 0
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.1 - 5
    lora = _lora_of(head)
    weight = head.base_layer.weight.detach()
    results = []
    for path in ("three_gemm", "four_gemm"):
        if loss_fn == "grpo":
            loss, metrics = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, old_logp=old, lora=lora,
                                                   head_path=path, backend="torch")  # fmt: skip
        else:
            loss, metrics = fused_linear_ppo_loss(hidden, weight, ids, old, adv[:, None].expand(2, 5), mask,
                                                  lora=lora, head_path=path, backend="torch")  # fmt: skip
        assert metrics["head_path"] == path
        results.append((loss, *torch.autograd.grad(loss, [hidden, lora[0], lora[1]])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert results[1][2].abs().max() > 0


def _sft_lora_flops(weight_requires_grad, path):
    """Matmul FLOPs of one SFT loss + backward with a LoRA head: the three-GEMM ``fused_linear_cross_entropy``
    or ``linear_logprobs`` + autograd (``four_gemm``), counted by ``alignkernels.flops``."""
    from alignkernels.flops import MatmulFlopCounter

    head = _peft_head(torch.float32)
    hidden, labels, _, _ = _inputs(torch.float32, seed=5)
    weight = head.base_layer.weight.detach().requires_grad_(weight_requires_grad)
    lora_A, lora_B = (t.detach().requires_grad_() for t in _lora_of(head)[:2])
    lora = (lora_A, lora_B, _lora_of(head)[2])
    h = hidden.clone().requires_grad_()
    with MatmulFlopCounter() as counter:
        if path == "three_gemm":
            loss = fused_linear_cross_entropy(h, weight, labels, lora=lora, backend="torch", chunk_size=4)
        else:
            logp = linear_logprobs(h, weight, labels, lora=lora, backend="torch", chunk_size=4)
            loss = -logp.sum() / (labels != -100).sum()
        loss.backward()
    return counter.total, int((labels != -100).sum())


def test_three_gemm_lora_flops():
    """K = H + r: GEMMs 1 and 2 carry the adapter, GEMM 3 is the thin dzᵀ·u for a frozen base (the whole
    [dzᵀ·h, dzᵀ·u] for a trainable one); plus u, grad_h's s·dU·A and grad_A (n·r·H each)."""
    frozen, n = _sft_lora_flops(False, "three_gemm")
    trained, _ = _sft_lora_flops(True, "three_gemm")
    nvk, nvr, nrh = 2 * n * V * (H + R), 2 * n * V * R, 2 * n * R * H
    assert frozen == nvk + nvk + nvr + 3 * nrh
    assert trained == 3 * nvk + 3 * nrh
    four_gemm_frozen, _ = _sft_lora_flops(False, "four_gemm")
    assert four_gemm_frozen == 3 * (2 * n * V * H) + 4 * nvr + 4 * nrh  # fwd, recompute, dh; u twice, dU, dB
    assert frozen < four_gemm_frozen


# --------------------------------------------------------------------------------------------
# Refusals: clear errors naming the argument
# --------------------------------------------------------------------------------------------
def _bad_cases():
    A, B = torch.randn(R, H), torch.randn(V, R)
    return [
        ("not a tuple", A, TypeError, "lora must be None or a tuple"),
        ("two entries", (A, B), TypeError, "length 2"),
        ("A not a tensor", ([[1.0]], B, 1.0), TypeError, "lora_A must be a torch.Tensor"),
        ("A 1-D", (torch.randn(H), B, 1.0), ValueError, "lora_A must be 2-D"),
        ("A wrong H", (torch.randn(R, H + 1), B, 1.0), ValueError, r"lora_A must have shape \[r, H\]"),
        ("B wrong V", (A, torch.randn(V - 1, R), 1.0), ValueError, r"lora_B must have shape \[V, r\]"),
        ("B wrong r", (A, torch.randn(V, R + 1), 1.0), ValueError, r"lora_B must have shape \[V, r\]"),
        ("B int", (A, torch.ones(V, R, dtype=torch.long), 1.0), TypeError, "lora_B must be a floating"),
        ("A fp64", (A.double(), B, 1.0), TypeError, "lora_A must have the weight's dtype"),
        ("B on meta", (A, B.to("meta"), 1.0), ValueError, "lora_B must be on hidden's device"),
        ("scaling nan", (A, B, math.nan), ValueError, "lora scaling must be a finite number"),
        ("scaling inf", (A, B, torch.tensor(math.inf)), ValueError, "lora scaling must be a finite number"),
        ("scaling str", (A, B, "2"), TypeError, "lora scaling .* must be a number"),
        ("scaling bool", (A, B, True), TypeError, "lora scaling .* must be a number"),
        ("scaling vector", (A, B, torch.ones(2)), TypeError, "lora scaling must be a number, got a tensor"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_lora_is_refused(case, backend):
    _, lora, exc, match = case
    hidden, labels, _, _ = _inputs(torch.float32)
    with pytest.raises(exc, match=match):
        linear_logprobs(hidden, torch.randn(V, H), labels, lora=lora, backend=backend)


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_lora_is_refused_by_the_three_gemm_head(case):
    """``fused_linear_cross_entropy`` validates ``lora=`` itself now that its three-GEMM head takes it."""
    _, lora, exc, match = case
    hidden, labels, _, _ = _inputs(torch.float32)
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(hidden, torch.randn(V, H), labels, lora=lora, backend="torch")


def test_zero_scaling_and_all_ignored_rows():
    head = _peft_head(torch.float64)
    hidden, labels, _, _ = _inputs(torch.float64)
    lora_A, lora_B, _ = _lora_of(head)
    weight = head.base_layer.weight.detach()
    with_zero = linear_logprobs(hidden, weight, labels, lora=(lora_A, lora_B, 0.0), backend="torch")
    torch.testing.assert_close(with_zero, linear_logprobs(hidden, weight, labels, backend="torch"))
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight, torch.full_like(labels, -100), lora=(lora_A, lora_B, 2.0), backend="torch")
    grads = torch.autograd.grad(out.sum(), [h, lora_A, lora_B])
    assert out.abs().sum() == 0 and all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_three_gemm_lora_all_ignored_rows(backend):
    """Every label ignored: a finite 0 loss and exactly zero gradients for hidden and the adapter."""
    head = _peft_head(torch.float32)
    hidden, labels, _, _ = _inputs(torch.float32)
    lora_A, lora_B, scaling = _lora_of(head)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, head.base_layer.weight.detach(), torch.full_like(labels, -100),
                                      lora=(lora_A, lora_B, scaling), backend=backend)  # fmt: skip
    grads = torch.autograd.grad(loss, [h, lora_A, lora_B])
    assert loss.item() == 0 and all(bool((g == 0).all()) for g in grads)


@pytest.mark.slow
def test_lora_head_under_torch_compile_fullgraph():
    """The LoRA form traces whole (fullgraph) and gives eager's values and gradients."""
    head = _peft_head(torch.float64)
    hidden, labels, g_logp, _ = _inputs(torch.float64, seed=9)
    weight = head.base_layer.weight.detach()
    lora_A, lora_B, scaling = _lora_of(head)
    h = hidden.clone().requires_grad_()

    def loss(h, lora_A, lora_B):
        return (linear_logprobs(h, weight, labels, lora=(lora_A, lora_B, scaling), backend="torch") * g_logp).sum()

    eager = torch.autograd.grad(loss(h, lora_A, lora_B), [h, lora_A, lora_B])
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(h, lora_A, lora_B), [h, lora_A, lora_B])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
