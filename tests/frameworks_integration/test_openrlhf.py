"""alignkernels.integrations.openrlhf against OpenRLHF's own functions (OpenRLHF 0.11.2, CPU, fp32).

``import openrlhf.models`` needs ``flash_attn`` (imported at module level by
``openrlhf/models/ring_attn_utils.py``, used only by the packed / ring-attention path): a stand-in
module whose functions raise is installed for the import, then removed (``openrlhf_stand_ins.py``).
Parity: values and every gradient within 2e-6 relative of OpenRLHF's (fp32 vs fp32), and close to an
fp64 eager computation.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from helpers import ReturnedShapes, max_rel_error
from frameworks_integration.openrlhf_stand_ins import STAND_INS, stand_in_modules

pytest.importorskip("openrlhf")
transformers = pytest.importorskip("transformers")

import alignkernels.integrations.openrlhf as ak_openrlhf  # noqa: E402

TOL = 2e-6


def _import_openrlhf_models():
    with stand_in_modules(tuple(name for name in STAND_INS if name.startswith("flash_attn"))):
        import openrlhf.models.actor as actor
        import openrlhf.models.utils as utils
    return actor, utils


orl_actor, orl_utils = _import_openrlhf_models()
STOCK = {"log_probs_from_logits": orl_utils.log_probs_from_logits, "compute_entropy": orl_utils.compute_entropy}



def _logits(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3.0).requires_grad_()


def _grads(out, inputs, seed=1):
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * up).sum(), inputs)


def _assert_close(actual, expected, tol=TOL):
    assert actual.shape == expected.shape
    err = max_rel_error(actual.double(), expected.double())
    assert err <= tol, err


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_from_logits_matches_openrlhf(temperature):
    logits = _logits((3, 8, 131))
    labels = torch.randint(0, 131, (3, 8), generator=torch.Generator().manual_seed(2))
    stock = STOCK["log_probs_from_logits"](logits.clone(), labels, temperature)  # divides its input in place
    (stock_grad,) = _grads(stock, [logits])
    with ak_openrlhf.apply():
        before = logits.detach().clone()
        ours = orl_utils.log_probs_from_logits(logits, labels, temperature)
        assert torch.equal(logits.detach(), before)  # ours does not modify the logits
        assert ak_openrlhf.adapter_calls() == 1
    (ours_grad,) = _grads(ours, [logits])
    _assert_close(ours, stock)
    _assert_close(ours_grad, stock_grad)
    z = logits.detach().double() / temperature
    _assert_close(ours, torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1))


def test_compute_entropy_matches_openrlhf():
    logits = _logits((2, 9, 77), seed=3)
    stock = STOCK["compute_entropy"](logits)
    (stock_grad,) = _grads(stock, [logits])
    ak_openrlhf.apply()
    ours = orl_utils.compute_entropy(logits)
    (ours_grad,) = _grads(ours, [logits])
    _assert_close(ours, stock)
    _assert_close(ours_grad, stock_grad)
    z = logits.detach().double()
    _assert_close(ours, -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))


def _actor(temperature):
    config = transformers.Qwen2Config(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    actor = orl_actor.Actor(transformers.Qwen2ForCausalLM(config).float(), temperature=temperature)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads the model itself
    return actor


def test_actor_forward_uses_the_swap_and_matches_stock():
    """``Actor.forward`` (the by-name imports of ``openrlhf.models.actor``): action log-probs, entropy
    and every parameter gradient equal stock, left padding included."""
    actor = _actor(temperature=0.7)
    sequences, attention_mask, action_mask = _actor_batch()

    def run():
        actor.zero_grad()
        logp, out = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
        loss = -(logp * action_mask).sum() - 0.01 * out.entropy[:, -4:].sum()
        loss.backward()
        return logp, out.entropy, {n: p.grad.clone() for n, p in actor.named_parameters()}

    stock = run()
    ak_openrlhf.apply()
    assert orl_actor.log_probs_from_logits is ak_openrlhf.log_probs_from_logits
    assert orl_actor.compute_entropy is ak_openrlhf.compute_entropy
    ours = run()
    assert ak_openrlhf.adapter_calls() == 2
    _assert_close(ours[0], stock[0])
    _assert_close(ours[1], stock[1])
    for name in stock[2]:
        _assert_close(ours[2][name], stock[2][name], tol=1e-5)


def _actor_batch():
    g = torch.Generator().manual_seed(4)
    sequences = torch.randint(0, 89, (2, 10), generator=g)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0
    action_mask = torch.ones(2, 4)
    action_mask[1, -1] = 0
    return sequences, attention_mask, action_mask


@pytest.mark.parametrize("return_entropy", [False, True])
def test_fused_actor_forward_matches_stock(return_entropy):
    """``apply(fused_forward=True)``: ``Actor.forward`` without logits gives stock's action log-probs,
    entropy and every parameter gradient (fp32)."""
    actor = _actor(temperature=0.7)
    sequences, attention_mask, action_mask = _actor_batch()

    def run():
        actor.zero_grad()
        logp, out = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=return_entropy)
        loss = -(logp * action_mask).sum()
        if return_entropy:
            loss = loss - 0.01 * out.entropy[:, -4:].sum()
        loss.backward()
        return logp, out.entropy if return_entropy else None, {n: p.grad.clone() for n, p in actor.named_parameters()}

    stock = run()
    ak_openrlhf.apply(fused_forward=True)
    assert orl_actor.Actor.forward is ak_openrlhf.fused_actor_forward
    ours = run()
    assert ak_openrlhf.adapter_calls() == 1  # one fused forward, no logits-path call
    _assert_close(ours[0], stock[0])
    if return_entropy:
        _assert_close(ours[1], stock[1])
    for name in stock[2]:
        _assert_close(ours[2][name], stock[2][name], tol=1e-5)
    ak_openrlhf.remove()
    assert "forward" in vars(orl_actor.Actor) and orl_actor.Actor.forward is not ak_openrlhf.fused_actor_forward


def test_fused_actor_forward_takes_batch_invariant_and_head_precision(monkeypatch):
    """``apply(fused_forward=True, batch_invariant=True, head_precision="fp32")``: both reach
    ``linear_logprobs``; each row's action log-probs and entropy are the bits it gets alone (the tiny
    backbone is itself row-independent), and still match stock (fp32)."""
    import alignkernels.integrations.transformers as ak_transformers

    calls = []
    real = ak_transformers.linear_logprobs
    monkeypatch.setattr(ak_transformers, "linear_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    actor = _actor(temperature=0.7)
    g = torch.Generator().manual_seed(5)
    sequences = torch.randint(0, 89, (5, 10), generator=g)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0
    attention_mask[3, :1] = 0
    action_mask = torch.ones(5, 4)
    action_mask[1, -1] = 0

    def run(rows):
        with torch.no_grad():
            logp, out = actor(sequences[rows], action_mask[rows], attention_mask[rows], return_output=True,
                              return_entropy=True)  # fmt: skip
        return logp, out.entropy

    stock = run(slice(None))
    ak_openrlhf.apply(fused_forward=True, batch_invariant=True, head_precision="fp32", backend="torch")
    inside = run(slice(None))
    assert [(k["batch_invariant"], k["head_precision"]) for k in calls] == [(True, "fp32")]
    _assert_close(inside[0], stock[0])
    _assert_close(inside[1], stock[1])
    for row in range(5):
        alone = run(slice(row, row + 1))
        assert torch.equal(alone[0][0], inside[0][row]) and torch.equal(alone[1][0], inside[1][row])


@pytest.mark.parametrize("seam", ["log_probs_from_logits", "compute_entropy"])
def test_head_precision_is_refused_at_the_logits_seams(seam):
    ak_openrlhf.apply(fused_forward=True, head_precision="tf32")
    logits, labels = _logits((2, 5, 89)), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=f"head_precision='tf32'.*{seam}.*fused_forward=True"):
        getattr(orl_utils, seam)(*((logits, labels) if seam == "log_probs_from_logits" else (logits,)))



def test_fused_actor_forward_never_holds_token_by_vocab_tensors():
    """A training-step call (action log-probs + entropy, backward): no aten op returns a tensor with
    the vocabulary dimension and a quarter of the tokens' rows; the detector fires on the stock forward."""
    actor = _actor(temperature=0.7)
    g = torch.Generator().manual_seed(6)
    sequences = torch.randint(0, 89, (4, 40), generator=g)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(4, 20)
    n_rows = sequences.numel() // 4
    assert n_rows > 32  # the lm_head weight does not count

    def run():
        recorder = ReturnedShapes()
        with recorder:
            logp, out = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
            (logp.sum() + out.entropy.sum()).backward()
        return [s for s in recorder.shapes if 89 in s and len(s) >= 2 and torch.Size(s).numel() // 89 >= n_rows]

    assert run()
    ak_openrlhf.apply(fused_forward=True, chunk_size=16)
    found = run()
    assert ak_openrlhf.adapter_calls() == 1
    assert not found, found[:5]


@pytest.mark.slow
def test_bf16_fused_forward_exact_on_the_bf16_operands_stock_rounds_its_logits():
    """A bf16 model (DeepSpeed's bf16 casts the whole model): stock ``Actor.forward`` upcasts bf16
    logits, already rounded to 8 bits, so its log-probs and entropy are ~1e-2 from fp64 of the same bf16
    hidden states and head (the swap, fed those logits, cannot undo it); the fused forward keeps the
    tile in fp32: ~1e-6 (numbers in ``docs/INTEGRATION.md``, "OpenRLHF drop-in")."""
    config = transformers.Qwen2Config(
        vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 3.0 / 32**0.5)  # logits of std ~3
    model = model.to(torch.bfloat16)
    actor = orl_actor.Actor(model, temperature=0.7)
    actor.packing_samples = False
    sequences, attention_mask, action_mask = _actor_batch()
    with torch.no_grad():
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        hidden = model.model(sequences, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        z = (hidden.double() @ model.lm_head.weight.double().T)[:, :-1] / 0.7
        labels = sequences[:, 1:]
        ref_logp = torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)[:, -4:] * action_mask
        ref_entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)

        def errors(**options):
            with ak_openrlhf.apply(**options) if options.pop("patched", True) else contextlib.nullcontext():
                logp, out = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
            assert logp.dtype == out.entropy.dtype == torch.float32
            return max_rel_error(logp, ref_logp, floor=1.0), max_rel_error(out.entropy, ref_entropy, floor=1.0)

        stock, swap, fused = errors(patched=False), errors(), errors(fused_forward=True)
    assert max(fused) <= 1e-5, fused
    assert min(stock) >= 1e-3 and min(swap) >= 1e-3, (stock, swap)  # the bf16 logits' rounding is seen


def test_fused_actor_forward_logprobs_and_logits_callers():
    actor = _actor(temperature=1.0)
    sequences, attention_mask, _ = _actor_batch()
    with torch.no_grad():
        stock_lp = actor(sequences, attention_mask=attention_mask, return_logprobs=True)
        stock_out = actor(sequences, attention_mask=attention_mask, return_output=True)
        ak_openrlhf.apply(fused_forward=True)
        ours_lp = actor(sequences, attention_mask=attention_mask, return_logprobs=True)
        ours_out = actor(sequences, attention_mask=attention_mask, return_output=True)  # wants logits: stock
    _assert_close(ours_lp, stock_lp)
    assert torch.equal(ours_out["logits"], stock_out["logits"])


@pytest.mark.parametrize("setup, match", [("packing", "packing_samples"), ("moe", "output_router_logits"),
                                          ("vlm", "VLM")])  # fmt: skip
def test_fused_actor_forward_refuses_what_it_cannot_reproduce(setup, match):
    actor = _actor(temperature=1.0)
    sequences, attention_mask, action_mask = _actor_batch()
    kwargs = {}
    if setup == "packing":
        actor.packing_samples = True
    elif setup == "moe":
        actor.model.config.output_router_logits = True
    else:
        kwargs["pixel_values"] = torch.zeros(1)
    ak_openrlhf.apply(fused_forward=True)
    with pytest.raises(NotImplementedError, match=match):
        actor(sequences, action_mask, attention_mask, **kwargs)
    assert ak_openrlhf.adapter_calls() == 0


def test_remove_restores_every_binding_and_apply_is_idempotent():
    patch = ak_openrlhf.apply()
    assert ak_openrlhf.apply(backend="torch") is patch and ak_openrlhf.options().backend == "torch"
    assert ak_openrlhf.is_applied()
    patch.remove()
    assert not ak_openrlhf.is_applied()
    for name, original in STOCK.items():
        assert getattr(orl_utils, name) is original and getattr(orl_actor, name) is original


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"backend": "fast"}, ValueError, "backend"),
        ({"fused_forward": "yes"}, TypeError, "fused_forward"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 1.5}, TypeError, "chunk_size"),
        ({"fused_forward": True, "backend": "cuda"}, ValueError, "backend"),
        ({"losses": "yes"}, TypeError, "losses"),
        ({"batch_invariant": 1}, TypeError, "batch_invariant"),
        ({"head_precision": "fp32"}, ValueError, "head_precision.*log_probs_from_logits"),
        ({"batch_invariant": True, "backend": "cuda"}, ValueError, "batch_invariant"),
    ],
)
def test_bad_apply_names_the_argument_and_patches_nothing(kwargs, error, match):
    with pytest.raises(error, match=match):
        ak_openrlhf.apply(**kwargs)
    assert not ak_openrlhf.is_applied()
    assert orl_actor.log_probs_from_logits is STOCK["log_probs_from_logits"]


def test_worker_setup_applies_from_env_unless_switched_off(monkeypatch):
    monkeypatch.delenv("ALIGNKERNELS_OPENRLHF", raising=False)
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF_BACKEND", "reference")
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF_FUSED_FORWARD", "1")
    ak_openrlhf.worker_setup()
    assert ak_openrlhf.is_applied() and ak_openrlhf.options() == ak_openrlhf.Options("reference", True, None)
    assert orl_actor.Actor.forward is ak_openrlhf.fused_actor_forward
    ak_openrlhf.remove()
    assert ak_openrlhf.apply_from_env() is None
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF", "off")
    ak_openrlhf.worker_setup()
    assert not ak_openrlhf.is_applied()
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF", "1")
    monkeypatch.setenv("ALIGNKERNELS_OPENRLHF_BACKEND", "fast")
    with pytest.raises(ValueError, match="ALIGNKERNELS_OPENRLHF_BACKEND"):
        ak_openrlhf.worker_setup()
    assert not ak_openrlhf.is_applied()
    assert "ALIGNKERNELS_OPENRLHF" in os.environ
