"""``alignkernels.integrations.trl.apply(batch_invariant=..., head_precision=...)``: both options reach
every op the TRL seam calls -- the head-only drop-in (``LinearLogprobsAdapter`` -> ``linear_logprobs``)
and the fused loss (``apply(fused_loss=True)``: the three-GEMM head and its exact recompute) -- and a
token's outputs and ``grad_hidden`` row are then bitwise those of the same token in another batch
(TRL's old-policy pass and its training pass see a token in different micro-batches). Options the
seam cannot honour are refused by name at ``apply()``, leaving TRL untouched. With a LoRA ``lm_head``
(``apply(allow_lora_lm_head=True)``) the same property holds, the adapter's GEMMs on the fixed plan."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import alignkernels.integrations.trl as ak_trl  # noqa: E402
from alignkernels.integrations import transformers as ak_transformers  # noqa: E402
from alignkernels.integrations.lora_head import HeadLora  # noqa: E402
from alignkernels.integrations import trl_fused_loss  # noqa: E402
from alignkernels.ops import _lmhead_engine as engine  # noqa: E402
from alignkernels.ops import three_gemm  # noqa: E402
from alignkernels.reference import linear_logprobs_reference  # noqa: E402

N, H, V = 40, 16, 97


@pytest.fixture(autouse=True)
def _always_remove(monkeypatch):
    monkeypatch.setattr(engine, "BATCH_INVARIANT_ROWS", {"cpu": 16, "cuda": 16})  # batches span 1-3 tiles
    monkeypatch.setattr(three_gemm, "BATCH_INVARIANT_ROWS", {"cpu": 16, "cuda": 16})
    ak_trl.remove()
    yield
    ak_trl.remove()


def _pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g),
            torch.randint(0, V, (N,), generator=g))  # fmt: skip


def _head_only(hidden, weight, bias, targets):
    """TRL's call: ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
    logit_scale, outputs)``; gradient of ``Σ logp + Σ entropy`` w.r.t. hidden."""
    h = hidden.clone().requires_grad_(True)
    logp, entropy, _, _, is_top1 = ak_trl.LinearLogprobsAdapter.apply(h, weight, bias, targets, 0.9, 4096, None, 1.0,
                                                                      ("entropy", "is_top1"))  # fmt: skip
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), h)
    return logp.detach(), entropy.detach(), is_top1, grad


def _fused_sft(hidden, weight, bias, targets):
    """The fused loss's head call inside SFTTrainer's scope (uniform ∂L/∂logp: the three-GEMM gradient
    is used as formed); returns logp, entropy, is_top1 and grad_hidden of ``−Σ logp``."""
    h = hidden.clone().requires_grad_(True)
    with trl_fused_loss.loss_scope(trl_fused_loss.SFTScope(torch.ones(1, targets.numel(), dtype=torch.bool))):
        logp, entropy, _, _, is_top1 = ak_trl.LinearLogprobsAdapter.apply(h, weight, bias, targets, 0.9, 4096, None,
                                                                          1.0, ("entropy", "is_top1"))  # fmt: skip
    (grad,) = torch.autograd.grad(-logp.sum(), h)
    return logp.detach(), entropy.detach(), is_top1, grad


@pytest.mark.parametrize("lora", [False, True], ids=["", "lora"])
@pytest.mark.parametrize("call", [_head_only, _fused_sft], ids=["head_only", "fused_loss"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_batch_invariant_rows_match_across_batches(call, backend, lora, monkeypatch):
    """The pool of 40 rows as one call, then shuffled sub-batches of 1, 7, 17 and 33 rows: every row's
    logp, entropy, is_top1 and grad_hidden bit for bit; the pool's values within 2e-6 of fp64. ``lora``:
    a trainable rank-3 adapter on the head, as the seam finds it for a PEFT ``lm_head`` (``lora_for_weight``)."""
    heads = []
    original = trl_fused_loss.three_gemm_head
    monkeypatch.setattr(trl_fused_loss, "three_gemm_head", lambda *a, **k: heads.append(a[6]) or original(*a, **k))
    ak_trl.apply(fused_loss=call is _fused_sft, backend=backend, batch_invariant=True, allow_lora_lm_head=lora)
    hidden, weight, bias, targets = _pool()
    head_weight = weight
    if lora:
        g = torch.Generator().manual_seed(5)
        adapter = HeadLora((torch.randn(3, H, generator=g) * 0.3).requires_grad_(),
                           (torch.randn(V, 3, generator=g) * 0.3).requires_grad_(), 0.7, "default")  # fmt: skip
        monkeypatch.setattr(ak_trl, "lora_for_weight", lambda w: adapter if w is weight else None)
        head_weight = weight + 0.7 * (adapter.lora_B @ adapter.lora_A).detach()  # the adapted head, for fp64
    full = call(hidden, weight, bias, targets)
    ref = linear_logprobs_reference(hidden.double(), head_weight.double(), targets, bias=bias.double(),
                                    temperature=0.9, return_entropy=True)  # fmt: skip
    assert (full[0].double() - ref[0]).abs().max() < 2e-6 * max(1.0, ref[0].abs().max().item())
    assert (full[1].double() - ref[1]).abs().max() < 2e-6 * max(1.0, ref[1].abs().max().item())
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    for n in (1, 7, 17, 33):
        idx = perm[:n]
        part = call(hidden[idx], weight, bias, targets[idx])
        for name, got, want in zip(("logp", "entropy", "is_top1", "grad_hidden"), part, full):
            assert torch.equal(got, want[idx]), (name, n)
    if call is _fused_sft:  # the three-GEMM head ran, on its fixed padded plan
        assert len(heads) == 5 and all(plan.padded and plan.chunk_rows == 16 for plan in heads)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_apply_passes_both_options_to_every_op(fused_loss, monkeypatch):
    """``head_precision`` and ``batch_invariant`` reach ``linear_logprobs`` (head-only drop-in and the fused
    loss's recompute) and the three-GEMM head's plan."""
    seen = []
    for module in (ak_transformers, trl_fused_loss):
        original = module.linear_logprobs
        monkeypatch.setattr(module, "linear_logprobs",
                            lambda *a, _o=original, **k: seen.append(("lp", k["head_precision"], k["batch_invariant"]))
                            or _o(*a, **k))  # fmt: skip
    original_head = trl_fused_loss.three_gemm_head
    monkeypatch.setattr(trl_fused_loss, "three_gemm_head",
                        lambda *a, **k: seen.append(("head", a[6].precision.name, a[6].padded)) or original_head(*a, **k))
    ak_trl.apply(fused_loss=fused_loss, backend="torch", head_precision="fp32", batch_invariant=True)
    hidden, weight, bias, targets = _pool()
    if fused_loss:
        h = hidden.clone().requires_grad_(True)
        with trl_fused_loss.loss_scope(trl_fused_loss.SFTScope(torch.ones(1, N, dtype=torch.bool))):
            logp = ak_trl.LinearLogprobsAdapter.apply(h, weight, bias, targets, 1.0, None, None, 1.0, ())[0]
        (logp * torch.arange(N)).sum().backward()  # not uniform: the backward recomputes through linear_logprobs
        assert seen == [("head", "fp32", True), ("lp", "fp32", True)]
    else:
        _head_only(hidden, weight, bias, targets)
        assert seen == [("lp", "fp32", True)]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_invariant="yes"), TypeError, "batch_invariant must be a bool"),
    (dict(batch_invariant=True, backend="reference"), ValueError, r"batch_invariant=True .* backend='reference'"),
    (dict(batch_invariant=True, backend="cuda"), ValueError, r"batch_invariant=True .* backend='cuda'"),
    (dict(head_precision="fp16"), ValueError, "head_precision must be one of"),
    (dict(head_precision=32), TypeError, "head_precision must be one of"),
])  # fmt: skip
def test_apply_refuses_what_the_seam_cannot_honour(kwargs, error, match):
    with pytest.raises(error, match=match):
        ak_trl.apply(**kwargs)
    assert not ak_trl.is_applied()
