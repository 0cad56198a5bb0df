"""``apply(fused_loss=True)``: SFTTrainer's and GRPOTrainer's loss on the three-GEMM head, stock vs
patched (fp32, SGD, 3 steps: losses, every logged metric, final parameters at 1e-5), the
configurations that fall back to the head-only drop-in, and the exactness guard of the backward."""
from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import alignkernels.integrations.trl as ak_trl  # noqa: E402
from alignkernels.integrations import trl_fused_loss  # noqa: E402

_spec = importlib.util.spec_from_file_location("_trl_parity_helpers", Path(__file__).with_name("test_trl.py"))
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


@pytest.fixture(autouse=True)
def _always_remove():
    ak_trl.remove()
    yield
    ak_trl.remove()


class _FusedPathCounter:
    """Counts head calls that took the three-GEMM path (``calls``) and backward passes that had to
    recompute because the upstream gradient was not the predicted one (``recomputed``)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.recomputed = 0
        original = trl_fused_loss.sft_logprobs
        original_lp = trl_fused_loss.linear_logprobs

        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls += out is not None
            return out

        def recompute(*args, **kwargs):
            self.recomputed += 1
            return original_lp(*args, **kwargs)

        monkeypatch.setattr(trl_fused_loss, "sft_logprobs", counted)
        monkeypatch.setattr(trl_fused_loss, "linear_logprobs", recompute)


def _sft_factory(tmp_path, model, dataset, **config):
    def make():
        args = trl.SFTConfig(**parity.common_args(output_dir=str(tmp_path)), per_device_train_batch_size=3, **config)
        return trl.SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset,
                              processing_class=parity.tiny_tokenizer())  # fmt: skip

    return make


def _run(make, fused):
    trainer = make()
    if fused:
        ak_trl.apply(trainer, fused_loss=True)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return [dict(x) for x in trainer.state.log_history], params, initial


def _setup(seed):
    model = parity.tiny_causal_lm(seed=seed)
    g = torch.Generator().manual_seed(seed)
    return model, datasets.Dataset.from_dict({"text": [parity.words(g, 6 + i % 5) for i in range(12)]})


@pytest.mark.parametrize(
    "config",
    [dict(), dict(gradient_accumulation_steps=2), dict(completion_only_loss=False, average_tokens_across_devices=False)],
    ids=["plain", "grad-accum-num-items", "no-token-averaging"],
)
def test_sft_fused_loss_stock_vs_patched(tmp_path, monkeypatch, caplog, config):
    model, dataset = _setup(seed=8)
    make = _sft_factory(tmp_path, model, dataset, **config)
    stock = _run(make, fused=False)
    counter = _FusedPathCounter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="alignkernels.integrations.trl"):
        patched = _run(make, fused=True)
    assert counter.calls >= 3, "the fused three-GEMM loss never ran"
    assert counter.recomputed == 0, "the backward fell back to recomputing"
    assert any("SFTTrainer loss -> fused three-GEMM" in r.getMessage() for r in caplog.records)
    parity.compare_runs(stock, patched, min_compared=6)


GRPO_FUSED = [
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="grpo", entropy_coef=0.01),
    dict(loss_type="dr_grpo", delta=1.5),
]


@pytest.mark.parametrize("config", GRPO_FUSED, ids=["dapo", "grpo-entropy-bonus", "dr_grpo-delta"])
def test_grpo_fused_loss_stock_vs_patched(tmp_path, monkeypatch, caplog, config):
    model = parity.tiny_causal_lm()
    make = parity.grpo_factory(tmp_path, model, **config)
    stock = _run(make, fused=False)
    counter = _FusedPathCounter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="alignkernels.integrations.trl"):
        patched = _run(make, fused=True)
    assert counter.calls >= 3 and counter.recomputed == 0
    assert any("GRPOTrainer loss -> fused three-GEMM" in r.getMessage() for r in caplog.records)
    parity.compare_runs(stock, patched)


def test_grpo_non_separable_falls_back(tmp_path, monkeypatch, caplog):
    model = parity.tiny_causal_lm()
    make = parity.grpo_factory(tmp_path, model, loss_type="bnpo", importance_sampling_level="sequence")
    stock = _run(make, fused=False)
    counter = _FusedPathCounter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="alignkernels.integrations.trl"):
        patched = _run(make, fused=True)
    assert counter.calls == 0
    assert any("GRPOTrainer loss -> head-only drop-in (importance_sampling_level='sequence'" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    parity.compare_runs(stock, patched)


def test_sft_dft_falls_back_to_head_only(tmp_path, monkeypatch, caplog):
    model, dataset = _setup(seed=9)
    make = _sft_factory(tmp_path, model, dataset, loss_type="dft")
    stock = _run(make, fused=False)
    counter = _FusedPathCounter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="alignkernels.integrations.trl"):
        patched = _run(make, fused=True)
    assert counter.calls == 0
    assert any("head-only drop-in (loss_type='dft'" in r.getMessage() for r in caplog.records)
    parity.compare_runs(stock, patched, min_compared=6)


def test_without_fused_loss_the_sft_loss_is_untouched(tmp_path, monkeypatch):
    model, dataset = _setup(seed=10)
    counter = _FusedPathCounter(monkeypatch)
    trainer = _sft_factory(tmp_path, model, dataset)()
    ak_trl.apply(trainer)
    trainer.train()
    assert counter.calls == 0 and ak_trl.adapter_calls() > 0


def test_remove_restores_the_trainers():
    original, original_grpo = trl.SFTTrainer.compute_loss, trl.GRPOTrainer._compute_loss
    ak_trl.apply(fused_loss=True)
    assert trl.SFTTrainer.compute_loss is not original and trl.GRPOTrainer._compute_loss is not original_grpo
    ak_trl.remove()
    assert trl.SFTTrainer.compute_loss is original and trl.GRPOTrainer._compute_loss is original_grpo


def _head(seed=0, n=11, H=8, V=37):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, generator=g).requires_grad_(), torch.randn(V, H, generator=g).requires_grad_(),
            torch.randn(V, generator=g).requires_grad_(), torch.randint(0, V, (n,), generator=g))  # fmt: skip


@pytest.mark.parametrize("layout", ["compact", "all-rows-scored"])
@pytest.mark.parametrize("upstream", ["uniform", "per-token", "entropy"])
def test_backward_is_exact_whatever_the_upstream_gradient(upstream, layout):
    """Uniform ∂L/∂logp (a plain sum: the three-GEMM gradient, scaled) and anything else (the
    guard recomputes through linear_logprobs) both give autograd's gradient. ``all-rows-scored``
    is TRL's CPU layout: every row is scored, ignored ones with label 0, then zeroed."""
    import alignkernels

    hidden, weight, bias, targets = _head()
    valid = torch.ones(targets.numel(), dtype=torch.bool)
    if layout == "all-rows-scored":
        valid[[1, 4, 5]] = False
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1))
    with trl_fused_loss.loss_scope(trl_fused_loss.SFTScope(valid[None])):
        logp, entropy, _, _, _ = trl_fused_loss.sft_logprobs(hidden, weight, bias, targets, 0.9, 5.0, 1.2,
                                                             ("entropy", "is_top1"))  # fmt: skip
    logp, entropy = logp.masked_fill(~valid, 0), entropy.masked_fill(~valid, 0)
    loss = {"uniform": -logp.sum() / 7, "per-token": -(logp * weights).sum(),
            "entropy": -logp.sum() + 0.3 * entropy.sum()}[upstream]  # fmt: skip
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    lp, ent = alignkernels.linear_logprobs(h2, w2, targets, bias=b2, temperature=0.9, softcap=5.0, logit_scale=1.2,
                                           return_entropy=True)  # fmt: skip
    lp, ent = lp.masked_fill(~valid, 0), ent.masked_fill(~valid, 0)
    want_loss = {"uniform": -lp.sum() / 7, "per-token": -(lp * weights).sum(),
                 "entropy": -lp.sum() + 0.3 * ent.sum()}[upstream]  # fmt: skip
    want = torch.autograd.grad(want_loss, [h2, w2, b2])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_usable_only_inside_the_scope_with_gradients():
    hidden, weight, bias, _ = _head()
    assert not trl_fused_loss.usable_for(hidden, weight, bias, ("entropy",), False)
    with trl_fused_loss.loss_scope(trl_fused_loss.SFTScope(torch.ones(1, 11, dtype=torch.bool))):
        assert trl_fused_loss.usable_for(hidden, weight, bias, ("entropy", "is_top1"), False)
        assert not trl_fused_loss.usable_for(hidden, weight, bias, ("mean_logits",), False)
        assert not trl_fused_loss.usable_for(hidden, weight, bias, (), True)  # ZeRO-3 partitioned head
        with torch.no_grad():
            assert not trl_fused_loss.usable_for(hidden, weight, bias, (), False)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_fused_head_honours_apply_backend(monkeypatch, backend):
    """``apply(backend=...)`` picks the three-GEMM head's fold and the backend of the backward's exact
    recompute (``reference`` has no three-GEMM head: the head-only drop-in runs it); the gradient of a
    per-token-weighted loss (recompute path) matches an fp64 eager head."""
    import alignkernels

    folds, recompute_backends = [], []
    original_head, original_lp = trl_fused_loss.three_gemm_head, trl_fused_loss.linear_logprobs

    def head(*args, **kwargs):
        folds.append(args[7].NAME)  # three_gemm_head(hidden, weight, bias, labels, tr, token_grad, plan, fold, ...)
        return original_head(*args, **kwargs)

    def recompute(*args, **kwargs):
        recompute_backends.append(kwargs.get("backend", "auto"))
        return original_lp(*args, **kwargs)

    monkeypatch.setattr(trl_fused_loss, "three_gemm_head", head)
    monkeypatch.setattr(trl_fused_loss, "linear_logprobs", recompute)
    ak_trl.apply(fused_loss=True, backend=backend)
    hidden, weight, bias, targets = _head(seed=3)
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(2))
    with trl_fused_loss.loss_scope(trl_fused_loss.SFTScope(torch.ones(1, targets.numel(), dtype=torch.bool))):
        logp, entropy, _, _, _ = ak_trl.LinearLogprobsAdapter.apply(hidden, weight, bias, targets, 0.9, None, 5.0, 1.2,
                                                                    ("entropy",))  # fmt: skip
    loss = -(logp * weights).sum() + 0.3 * entropy.sum()
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    if backend == "reference":
        assert folds == [] and recompute_backends == []
    else:
        assert folds == [backend] and recompute_backends == [backend]
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    lp, ent = alignkernels.linear_logprobs(h64, w64, targets, bias=b64, temperature=0.9, softcap=5.0, logit_scale=1.2,
                                           return_entropy=True, backend="reference")  # fmt: skip
    want = torch.autograd.grad(-(lp * weights.double()).sum() + 0.3 * ent.sum(), [h64, w64, b64])
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max().item() <= 2e-6 * b.abs().max().item()


@pytest.mark.parametrize("layout,adapter_dtype", [("compact", torch.float32), ("all-rows-scored", torch.float64)])
@pytest.mark.parametrize("upstream", ["uniform", "per-token"])
def test_lora_head_backward_is_exact(monkeypatch, upstream, layout, adapter_dtype):
    """With a LoRA adapter routed to the head call: the three-GEMM gradient (uniform ∂L/∂logp) and the
    guard's recompute (anything else) both give the gradients of hidden, bias, lora_A and lora_B of
    an fp64 eager head ``W + s·B·A`` (the base weight frozen, as PEFT leaves it). An adapter in
    another dtype than the head (PEFT keeps fp32 adapters next to a half base) is cast differentiably
    and still takes the three-GEMM head."""
    from alignkernels.integrations.lora_head import HeadLora
    from alignkernels.reference import linear_logprobs_reference

    calls = []
    original_head = trl_fused_loss.three_gemm_head
    monkeypatch.setattr(trl_fused_loss, "three_gemm_head", lambda *a, **k: calls.append(1) or original_head(*a, **k))
    hidden, weight, bias, targets = _head(seed=4)
    weight = weight.detach()
    g = torch.Generator().manual_seed(5)
    lora_A, lora_B = (torch.randn(shape, generator=g, dtype=adapter_dtype).requires_grad_() for shape in ((3, 8), (37, 3)))
    valid = torch.ones(targets.numel(), dtype=torch.bool)
    if layout == "all-rows-scored":
        valid[[0, 6]] = False
    weights = torch.rand(targets.shape, generator=g) if upstream == "per-token" else torch.full(targets.shape, 1 / 7)
    options = trl_fused_loss.HeadOptions(backend="torch", lora=HeadLora(lora_A, lora_B, 1.5, "default"))
    with trl_fused_loss.loss_scope(trl_fused_loss.SFTScope(valid[None])):
        logp, _, _, _, _ = trl_fused_loss.fused_head_outputs(hidden, weight, bias, targets, 0.9, 5.0, 1.2, ("entropy",),
                                                             False, options)  # fmt: skip
    loss = -(logp.masked_fill(~valid, 0) * weights).sum()
    got = torch.autograd.grad(loss, [hidden, bias, lora_A, lora_B])
    leaves = [x.detach().double().requires_grad_() for x in (hidden, bias, lora_A, lora_B)]
    merged = weight.double() + 1.5 * leaves[3] @ leaves[2]
    lp = linear_logprobs_reference(leaves[0], merged, targets, bias=leaves[1], temperature=0.9, softcap=5.0,
                                   logit_scale=1.2)  # fmt: skip
    want_loss = -(lp.masked_fill(~valid, 0) * weights.double()).sum()
    want = torch.autograd.grad(want_loss, leaves)
    assert calls == [1], "the three-GEMM head did not run"
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * abs(want_loss.item())
    assert got[2].dtype == got[3].dtype == adapter_dtype
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max().item() <= 2e-6 * b.abs().max().item()
