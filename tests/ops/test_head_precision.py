"""``head_precision="input" | "fp32" | "tf32"`` on the lm-head ops (``_lmhead_engine.HeadPrecision``).

* Every op and backend, half inputs: logp, entropy and the input gradients against fp64 eager on the
  *upcast* operands (the numbers of an fp32 lm-head).
* ``fp32`` never allocates a ``[V, H]`` fp32 buffer (a full widened copy of the weight): allocations
  are watched as in ``tests/losses/test_head_autograd.py``.
* TF32 is switched for the head's GEMMs only (the scope restores torch's setting).
* A bad value is a TE / VE naming ``head_precision``.
(The vocab-parallel op: ``tests/ops/test_vocab_parallel.py`` ``check_head_precision``.)
"""
import pytest
import torch

import alignkernels as ak
from alignkernels.ops import three_gemm
from alignkernels.ops._lmhead_engine import HEAD_PRECISIONS
from helpers import TRITON_DEVICE, NewBuffers, max_rel_error

N, H, V = 11, 32, 97
PRECISIONS = ["input", "fp32", "tf32"]


def _data(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def _fp64_head(hidden, weight, labels):
    """fp64 eager log-softmax of the upcast operands: logp, entropy, grad_hidden, grad_weight of
    ``Σ logp + 0.5·Σ entropy``."""
    h = hidden.detach().cpu().double().requires_grad_(True)
    w = weight.detach().cpu().double().requires_grad_(True)
    y = labels.cpu()
    logsm = torch.log_softmax(h @ w.T, dim=-1)
    valid = y != -100
    logp = torch.where(valid, logsm.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
    entropy = torch.where(valid, -(logsm.exp() * logsm).sum(1), 0.0)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_logprobs_matches_fp64_of_upcast_operands(precision, backend, dtype):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden, weight, labels = _data(dtype, device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = ak.linear_logprobs(h, w, labels, return_entropy=True, backend=backend, head_precision=precision,
                                       chunk_size=4, vocab_block_size=32)  # fmt: skip
    (logp.sum() + 0.5 * entropy.sum()).backward()
    ref_logp, ref_entropy, ref_gh, ref_gw = _fp64_head(hidden, weight, labels)
    assert logp.dtype == torch.float32
    assert max_rel_error(logp, ref_logp, floor=1.0) < 2e-6
    assert max_rel_error(entropy, ref_entropy, floor=1.0) < 2e-6
    # gradients come back in the input dtype: one rounding of the fp32 result (half an ulp: 2^-9 / 2^-12)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert max_rel_error(h.grad, ref_gh) < ulp
    assert max_rel_error(w.grad, ref_gw) < ulp


def _fused(op, hidden, weight, labels, **kw):
    mask = labels != -100
    if op == "fused_linear_cross_entropy":
        return ak.fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", **kw)
    ids = labels.clamp(min=0)[None]
    if op == "fused_linear_grpo_loss":  # on-policy, no clipping active: Σ_t -A·logp_t / count
        loss, _ = ak.fused_linear_grpo_loss(hidden[None], weight, ids, torch.ones(1), mask[None], loss_type="dapo", **kw)
        return loss * mask.sum()
    if op == "fused_linear_ppo_loss":  # old_logp = logp: ratio 1, loss = -A·mean(logp·0 + 1)... use its gradient
        return ak.fused_linear_ppo_loss(hidden[None], weight, ids, torch.zeros(1, N), torch.ones(1, N), mask[None],
                                        loss_agg_mode="token-sum", **kw)[0]  # fmt: skip
    chosen = torch.cat([labels[None], labels[None]])  # DPO: chosen = rejected rows, reference sums 0
    return ak.fused_linear_dpo_loss(torch.cat([hidden[None], hidden[None]]), weight, chosen,
                                    ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1), **kw)[0]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("op", ["fused_linear_cross_entropy", "fused_linear_grpo_loss"])
def test_fused_losses_match_fp64_of_upcast_operands(op, backend, precision):
    """Fused CE (nll, sum) is ``-Σ logp`` over the valid tokens; on-policy GRPO (dapo, advantage 1,
    scaled by the token count) has value ``-count`` and the gradient of ``-Σ logp``. Both against
    fp64 of the upcast fp16 operands."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden, weight, labels = _data(torch.float16, device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = _fused(op, h, w, labels, backend=backend, head_precision=precision, chunk_size=4)
    loss.backward()
    hd, wd = hidden.cpu().double().requires_grad_(True), weight.cpu().double().requires_grad_(True)
    y = labels.cpu()
    ref = -torch.log_softmax(hd @ wd.T, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)[y != -100].sum()
    ref.backward()
    want = ref if op == "fused_linear_cross_entropy" else -(y != -100).sum().double()
    assert max_rel_error(loss, want, floor=1.0) < 2e-6
    # one fp16 rounding of the fp32 gradient (GRPO: a second one, autograd scales it by the count in fp16)
    tol = 2.0**-11 if op == "fused_linear_cross_entropy" else 2.0**-10
    assert max_rel_error(h.grad, hd.grad) < tol
    assert max_rel_error(w.grad, wd.grad) < tol


@pytest.mark.parametrize("op", ["fused_linear_ppo_loss", "fused_linear_dpo_loss"])
def test_ppo_dpo_take_head_precision(op):
    """PPO and DPO pass ``head_precision`` to their head: same loss as fp64-checked ``input`` on the CPU
    (where every mode widens), and a bad value is refused by name."""
    hidden, weight, labels = _data(torch.bfloat16)
    losses = [_fused(op, hidden, weight, labels, backend="torch", head_precision=p) for p in PRECISIONS]
    assert torch.isfinite(losses[0])
    assert all(torch.equal(x, losses[0]) for x in losses)
    with pytest.raises(ValueError, match="head_precision"):
        _fused(op, hidden, weight, labels, backend="torch", head_precision="bf16")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_full_fp32_weight_copy_linear_logprobs(precision, backend):
    """Forward and backward (weight trained): the widest fp32 buffer is a tile or a weight block,
    never ``[V, H]``; the same watch sees the ``[V, H]`` bf16 weight gradient (it can fail)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden, weight, labels = _data(torch.bfloat16, device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with NewBuffers() as watch:
        logp, entropy = ak.linear_logprobs(h, w, labels, return_entropy=True, backend=backend,
                                           head_precision=precision, vocab_block_size=32)  # fmt: skip
        (logp.sum() + entropy.sum()).backward()
    assert (V * H, torch.bfloat16) in watch.buffers
    assert 0 < watch.largest(torch.float32) < V * H


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_full_fp32_weight_copy_fused_cross_entropy(precision, backend, monkeypatch):
    """The three-GEMM head widens the (frozen) weight in row blocks (``three_gemm.WeightOperand``):
    no ``[V, H]`` fp32 buffer, and the blocked GEMMs give the loss and grad_hidden of one block."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden, weight, labels = _data(torch.bfloat16, device)
    h_whole = hidden.clone().requires_grad_(True)
    whole = ak.fused_linear_cross_entropy(h_whole, weight, labels, backend=backend, head_precision=precision)
    whole.backward()
    monkeypatch.setattr(three_gemm, "CPU_WEIGHT_BLOCK_ELEMENTS", 32 * H)  # 128-row blocks -> force V = 97 ...
    monkeypatch.setattr(three_gemm, "BLOCK_ALIGN", 16)  # ... into 16-row blocks (7 of them)
    h = hidden.clone().requires_grad_(True)
    with NewBuffers() as watch:
        loss = ak.fused_linear_cross_entropy(h, weight, labels, backend=backend, head_precision=precision)
        loss.backward()
    assert 0 < watch.largest(torch.float32) < V * H
    assert max_rel_error(loss, whole, floor=1.0) < 1e-6
    assert max_rel_error(h.grad, h_whole.grad) < 2.0**-8


def test_tf32_switch_is_scoped_to_the_head_gemms():
    """On CUDA ``fp32`` turns TF32 off and ``tf32`` on for the head's GEMMs and restores torch's
    setting afterwards; ``input`` leaves it; on the CPU nothing is touched. (Only the flag is read
    here: no CUDA device needed.)"""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        for outside in (False, True):
            matmul.allow_tf32 = outside
            for name, inside in (("fp32", False), ("tf32", True), ("input", outside)):
                with HEAD_PRECISIONS[name].gemms("cuda"):
                    assert matmul.allow_tf32 is inside, name
                assert matmul.allow_tf32 is outside
                with HEAD_PRECISIONS[name].gemms("cpu"):
                    assert matmul.allow_tf32 is outside
            with pytest.raises(RuntimeError), HEAD_PRECISIONS["tf32"].gemms("cuda"):
                raise RuntimeError("restored on error too")
            assert matmul.allow_tf32 is outside
    finally:
        matmul.allow_tf32 = saved


@pytest.mark.parametrize("bad,exc", [("fp16", ValueError), ("FP32", ValueError), (None, TypeError), (32, TypeError)])
@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_cross_entropy", "fused_linear_grpo_loss"])
def test_bad_head_precision_is_named(op, bad, exc):
    hidden, weight, labels = _data(torch.float32)
    with pytest.raises(exc, match="head_precision must be one of"):
        if op == "linear_logprobs":
            ak.linear_logprobs(hidden, weight, labels, head_precision=bad)
        else:
            _fused(op, hidden, weight, labels, head_precision=bad)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_full_fp32_weight_copy_fused_cross_entropy_with_lora(precision, monkeypatch):
    """With a LoRA head the three-GEMM head concatenates ``[W, B]`` in the weight's dtype and widens it
    in row blocks like the plain head: no ``[V, H + r]`` (or ``[V, H]``) fp32 buffer; the loss and
    grad_hidden as with one block."""
    hidden, weight, labels = _data(torch.bfloat16, "cpu")
    r = 3
    g = torch.Generator().manual_seed(5)
    lora_A = (torch.randn(r, H, generator=g) * 0.1).to(torch.bfloat16)
    lora_B = (torch.randn(V, r, generator=g) * 0.1).to(torch.bfloat16)
    lora = (lora_A, lora_B, 2.0)
    h_whole = hidden.clone().requires_grad_(True)
    whole = ak.fused_linear_cross_entropy(h_whole, weight, labels, backend="torch", head_precision=precision, lora=lora)
    whole.backward()
    monkeypatch.setattr(three_gemm, "CPU_WEIGHT_BLOCK_ELEMENTS", 32 * H)
    monkeypatch.setattr(three_gemm, "BLOCK_ALIGN", 16)
    h = hidden.clone().requires_grad_(True)
    with NewBuffers() as watch:
        loss = ak.fused_linear_cross_entropy(h, weight, labels, backend="torch", head_precision=precision, lora=lora)
        loss.backward()
    assert 0 < watch.largest(torch.float32) < V * H
    assert max_rel_error(loss, whole, floor=1.0) < 1e-6
    assert max_rel_error(h.grad, h_whole.grad) < 2.0**-8
