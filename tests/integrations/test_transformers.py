"""patch_causal_lm: per-token log-probs of tiny random HF causal LMs vs their own logits.

Every family runs the model's ordinary forward (full ``[B, T, V]`` logits, the model's own
logit_scale / softcap code) and ``log_softmax`` in fp32 as the reference, and the patched forward
(backbone + ``alignkernels.linear_logprobs``) as the candidate. fp32 tolerance: 2e-5 absolute on
log-probs / entropy / loss, 1e-4 relative on gradients.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from helpers import ReturnedShapes

transformers = pytest.importorskip("transformers")

from alignkernels.integrations.transformers import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    UnsupportedModelError,
    causal_lm_logprobs,
    check_supported,
    logit_transform,
    patch_causal_lm,
    unpatch_causal_lm,
)

V = 97  # not a power of two
H = 32

_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
_DECODER = dict(_COMMON, intermediate_size=48, num_key_value_heads=1)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults point outside the tiny vocab
_MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER)),
    # softcap 30 is barely active on a random model; 2.0 makes tanh bite
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, head_dim=16, final_logit_softcapping=2.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DECODER, head_dim=16, final_logit_softcapping=3.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=H, n_layer=1, n_head=2, n_positions=64)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_DECODER)),  # lm_head has a bias
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_DECODER, logit_scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_DECODER, logits_scaling=4.0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, **_IDS)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_DECODER, **_IDS)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_DECODER, **_IDS)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DECODER, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_DECODER, **_MOE, shared_expert_intermediate_size=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_DECODER, **_MOE, head_dim=16)),
}
assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)  # every family we allow is checked here


def tiny_causal_lm(family, seed=0, **overrides):
    config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    # random init leaves logits near 0; scale the head so the softmax is far from uniform
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.normal_(0, 1.0)
    return model


def batch(seed=1, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, -2:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    return input_ids, attention_mask, labels


def reference_logprobs(model, input_ids, attention_mask, labels, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
    targets = labels[:, 1:]
    mask = targets != -100
    logsm = F.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logsm.exp() * logsm).sum(-1) * mask
    return logp, entropy, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_forward_matches_model_logits(family):
    model = tiny_causal_lm(family)
    assert model.config.model_type in SUPPORTED_MODEL_TYPES
    input_ids, attention_mask, labels = batch()
    temperature = 0.7
    ref_logp, ref_entropy, mask = reference_logprobs(model, input_ids, attention_mask, labels, temperature)
    patch_causal_lm(model, temperature=temperature)
    out = model(input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == labels[:, 1:].shape
    torch.testing.assert_close(out.logprobs, ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.label_mask, mask)
    assert bool((out.logprobs[~mask] == 0).all()) and bool((out.entropy[~mask] == 0).all())
    # the unpatched path of the patched model is the original forward
    plain = model(input_ids=input_ids, attention_mask=attention_mask)
    assert plain.logits.shape == (*input_ids.shape, V)


@pytest.mark.parametrize("family", ["gemma2", "phi", "gpt2", "cohere"])
def test_gradients_match_model_logits(family):
    """softcap (gemma2), lm_head bias (phi), tied embeddings (gpt2), logit_scale (cohere)."""
    input_ids, attention_mask, labels = batch(seed=2)
    ref_model = tiny_causal_lm(family, seed=3)
    model = tiny_causal_lm(family, seed=3)
    patch_causal_lm(model, temperature=1.3)
    logp, entropy, mask = reference_logprobs(ref_model, input_ids, attention_mask, labels, 1.3)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    out = model(input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True)
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    n_checked = 0
    for (name, p_ref), (_, p) in zip(ref_model.named_parameters(), model.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        n_checked += 1
    assert n_checked >= 5
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    if family in ("gpt2", "cohere"):  # tied: the head is the embedding matrix
        assert head.weight is model.get_input_embeddings().weight
    if family == "phi":
        assert head.bias is not None and head.bias.grad.abs().sum() > 0


def test_loss_equals_model_loss_and_shift_labels():
    model = tiny_causal_lm("qwen2")
    input_ids, attention_mask, labels = batch(seed=4)
    hf_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    patch_causal_lm(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True)
    torch.testing.assert_close(out.loss, hf_loss, atol=2e-5, rtol=1e-5)
    # pre-shifted labels score every position: same numbers at the shifted positions
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    out2 = causal_lm_logprobs(model, input_ids, shift_labels=shift, attention_mask=attention_mask)
    torch.testing.assert_close(out2.logprobs[:, :-1], out.logprobs, atol=1e-6, rtol=0)
    # logits_to_keep=k: the last k tokens only, same numbers
    out3 = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, logits_to_keep=4, return_token_logprobs=True)
    assert out3.logprobs.shape == (input_ids.shape[0], 4)
    torch.testing.assert_close(out3.logprobs, out.logprobs[:, -4:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        causal_lm_logprobs(model, input_ids, labels, logits_to_keep=input_ids.shape[1])
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal_lm_logprobs(model, input_ids, labels, shift_labels=shift)


def test_unpatch_restores_forward():
    model = tiny_causal_lm("llama")
    input_ids, attention_mask, labels = batch()
    patch_causal_lm(model)
    patch_causal_lm(model)  # idempotent
    assert "forward" in model.__dict__
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (*input_ids.shape, V) and not hasattr(out, "logprobs")


def test_logit_transform_reads_config_like_trl():
    assert logit_transform(transformers.CohereConfig(logit_scale=0.25)).logit_scale == 0.25
    assert logit_transform(transformers.GraniteConfig(logits_scaling=8.0)).logit_scale == 1 / 8
    t = logit_transform(transformers.Gemma2Config(final_logit_softcapping=30.0))
    assert t.softcap == 30.0 and t.logit_scale == 1.0
    assert logit_transform(transformers.LlamaConfig()).softcap is None


def test_recompute_in_backward_path_matches():
    """The ZeRO-3 path (gather again + recompute in backward) gives the same gradients.

    DeepSpeed itself is not installed here; this forces the recompute path on plain tensors.
    """
    from alignkernels.integrations.transformers import head_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (2, 5), generator=g)
    targets[0, 0] = -100
    grads = []
    for recompute in (False, True):
        logp, ent = head_logprobs(hidden, weight, bias, targets, temperature=0.9, recompute_in_backward=recompute)
        (logp.sum() * 2 - ent.sum()).backward()
        grads.append([t.grad.clone() for t in (hidden, weight, bias)])
        for t in (hidden, weight, bias):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class _FakeLoraLinear(torch.nn.Module):
    """The attribute layout of a PEFT LoRA layer (``base_layer``, ``lora_A``) around a Linear."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, 2, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, base.out_features, bias=False)})

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_unsupported_configs_raise_at_patch_time():
    model = tiny_causal_lm("llama")
    model.lm_head = _FakeLoraLinear(model.lm_head)
    with pytest.raises(UnsupportedModelError, match="PEFT adapter"):
        patch_causal_lm(model)
    assert "forward" not in model.__dict__  # nothing was patched

    model = tiny_causal_lm("llama")
    model.config.model_type = "my_custom_family"
    with pytest.raises(UnsupportedModelError, match="allow_unknown_models"):
        check_supported(model)
    patch_causal_lm(model, allow_unknown_models=True)  # explicit opt-in works

    model = tiny_causal_lm("llama")
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(V, H, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        patch_causal_lm(model)
    with pytest.raises(ValueError, match="temperature"):
        patch_causal_lm(tiny_causal_lm("llama"), temperature=0.0)



def _vocab_sized(shapes, n_tokens):
    # anything with a vocab-sized dim and >= n_tokens rows of it would be (a large share of) the logits
    return [s for s in shapes if V in s and len(s) >= 2 and (torch.Size(s).numel() // V) >= n_tokens]


def test_patched_forward_never_allocates_full_logits():
    model = tiny_causal_lm("qwen2")
    patch_causal_lm(model)
    input_ids = torch.randint(0, V, (4, 40), generator=torch.Generator().manual_seed(5))
    labels = input_ids.clone()
    n_tokens = input_ids.numel() // 4  # a quarter of B*T (> H, so the [V, H] weight does not count)
    assert n_tokens > H
    recorder = ReturnedShapes()
    with recorder:
        out = causal_lm_logprobs(model, input_ids, labels, chunk_size=8)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    assert recorder.shapes, "dispatch mode recorded nothing"
    assert not _vocab_sized(recorder.shapes, n_tokens), _vocab_sized(recorder.shapes, n_tokens)[:5]
    # the detector does fire on the model's ordinary forward
    recorder = ReturnedShapes()
    with recorder, torch.no_grad():
        model(input_ids=input_ids)
    assert _vocab_sized(recorder.shapes, n_tokens)


@pytest.mark.gpu
def test_patched_forward_bf16_autocast_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_causal_lm("qwen2").cuda()
    input_ids, attention_mask, labels = (t.cuda() for t in batch())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_logp, ref_entropy, mask = reference_logprobs(model, input_ids, attention_mask, labels)
        patch_causal_lm(model)
        out = model(input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True)
    torch.testing.assert_close(out.logprobs, ref_logp, atol=0.15, rtol=0.02)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=0.15, rtol=0.02)


# --------------------------------------------------------------------------------------------
# Copies of patched models (deepcopy = TRL's create_reference_model, pickle, save_pretrained)
# --------------------------------------------------------------------------------------------


def _perturb(model, seed):
    """Change every parameter of ``model`` in place (so its outputs differ from the model it was copied from)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _fresh_like(model, family="qwen2"):
    """An unpatched model of the same family holding ``model``'s weights: the oracle for a copy."""
    fresh = tiny_causal_lm(family)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def _check_runs_own_weights(copy_model, oracle):
    input_ids, attention_mask, labels = batch(seed=7)
    with torch.no_grad():
        got = copy_model(input_ids=input_ids, attention_mask=attention_mask).logits
        want = oracle(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(copy_model.generate(input_ids, **gen), oracle.generate(input_ids, **gen))
    out = copy_model(input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True)
    ref_logp, ref_entropy, _ = reference_logprobs(oracle, input_ids, attention_mask, labels, temperature=0.8)
    torch.testing.assert_close(out.logprobs, ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=2e-5, rtol=1e-5)


def test_deepcopy_of_patched_model_runs_its_own_weights():
    """copy.deepcopy (TRL's create_reference_model): plain forward, generate and return_token_logprobs
    of the copy all use the copy's weights, and the original keeps its own."""
    model = tiny_causal_lm("qwen2").eval()
    patch_causal_lm(model, temperature=0.8)
    clone = copy.deepcopy(model)
    _perturb(clone, seed=11)
    _check_runs_own_weights(clone, _fresh_like(clone))
    _check_runs_own_weights(model, _fresh_like(model))
    # the copy's patch is its own: unpatching one leaves the other patched
    unpatch_causal_lm(model)
    assert "forward" not in vars(model) and "forward" in vars(clone)
    _check_runs_own_weights(clone, _fresh_like(clone))


def test_trl_create_reference_model_of_patched_model():
    trl_utils = pytest.importorskip("trl.experimental.utils")
    model = tiny_causal_lm("qwen2").eval()
    patch_causal_lm(model, temperature=0.8)
    ref = trl_utils.create_reference_model(model)
    _perturb(model, seed=12)  # the policy trains on; the reference must not follow it
    _check_runs_own_weights(ref, _fresh_like(ref))
    _check_runs_own_weights(model, _fresh_like(model))


def test_pickled_patched_model_is_patched_and_runs_its_own_weights():
    model = tiny_causal_lm("qwen2").eval()
    patch_causal_lm(model, temperature=0.8)
    clone = pickle.loads(pickle.dumps(model))
    _perturb(clone, seed=13)
    _check_runs_own_weights(clone, _fresh_like(clone))
    unpatch_causal_lm(clone)
    assert "forward" not in vars(clone)


def test_save_pretrained_of_patched_model_reloads_unpatched(tmp_path):
    """save_pretrained stores weights and config only: the reload is the plain model, patchable again."""
    model = tiny_causal_lm("qwen2").eval()
    patch_causal_lm(model, temperature=0.8)
    model.save_pretrained(tmp_path / "m")
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert "forward" not in vars(reloaded)
    patch_causal_lm(reloaded, temperature=0.8)
    _check_runs_own_weights(reloaded, _fresh_like(model))


def test_deepcopy_of_patched_peft_model():
    peft = pytest.importorskip("peft")
    model = tiny_causal_lm("qwen2").eval()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(model, lora)
    patch_causal_lm(model, temperature=0.8)
    clone = copy.deepcopy(model)
    _perturb(clone, seed=14)
    merged = copy.deepcopy(clone)
    unpatch_causal_lm(merged)
    oracle = merged.merge_and_unload().eval()  # same function as the copy, as a plain model
    input_ids, attention_mask, labels = batch(seed=7)
    out = clone(input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True)
    ref_logp, _, _ = reference_logprobs(oracle, input_ids, attention_mask, labels, temperature=0.8)
    torch.testing.assert_close(out.logprobs, ref_logp, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=input_ids).logits, oracle(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_arguments_name_the_argument():
    model = tiny_causal_lm("qwen2")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_causal_lm("Qwen/Qwen2.5-0.5B")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        check_supported(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_causal_lm(model, backend="gpu")
    with pytest.raises(TypeError, match="temperature must be a number"):
        patch_causal_lm(model, temperature="hot")
    assert "forward" not in vars(model)  # a rejected call patches nothing
    patch_causal_lm(model)
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model(input_ids, attention_mask=attention_mask, labels=labels, return_token_logprobs=True, temperature=0.0)
    with pytest.raises(TypeError, match="input_ids was passed both"):
        model(input_ids, input_ids=input_ids, labels=labels, return_token_logprobs=True)


def _row_alone_and_in_the_batch(fn, hidden, at):
    """``fn(hidden)`` -> tensors with a leading row dimension: row ``at``'s outputs and ``grad_hidden``
    row computed alone and inside the whole batch."""
    results = []
    for rows in (slice(at, at + 1), slice(None)):
        h = hidden[rows].clone().requires_grad_(True)
        outs = fn(h, rows)
        sum((o * (i + 1.5)).sum() for i, o in enumerate(outs)).backward()
        pick = slice(None) if rows.start is not None else slice(at, at + 1)
        results.append([o.detach()[pick] for o in outs] + [h.grad[pick]])
    return results


def test_head_logprobs_batch_invariant_gives_a_row_the_same_bits_alone_and_in_the_batch():
    """``head_logprobs(batch_invariant=True)`` (the call of ``causal_lm_logprobs`` and the drop-ins),
    ``torch`` backend (the Triton one is pinned in ``tests/ops``): a row's log-prob, entropy and
    ``grad_hidden`` row are the bits it gets alone, and match fp64."""
    from alignkernels.integrations.transformers import head_logprobs
    from alignkernels.reference import linear_logprobs_reference

    g = torch.Generator().manual_seed(2)
    n, hidden_size, vocab = 37, 24, 173
    hidden = torch.randn(n, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    at = 29  # without batch_invariant its grad_hidden row differs in the last bits here

    def fn(h, rows):
        return head_logprobs(h, weight, None, targets[rows], temperature=0.7, backend="torch", head_precision="fp32",
                             batch_invariant=True)  # fmt: skip

    alone, inside = _row_alone_and_in_the_batch(fn, hidden, at)
    for a, b in zip(alone, inside):
        assert torch.equal(a, b)
    logp, entropy = head_logprobs(hidden, weight, None, targets, temperature=0.7, batch_invariant=True)
    expected = linear_logprobs_reference(hidden.double(), weight.double(), targets, temperature=0.7,
                                         return_entropy=True)  # fmt: skip
    torch.testing.assert_close(logp.double(), expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), expected[1], rtol=1e-6, atol=1e-6)


def test_causal_lm_logprobs_passes_batch_invariant_and_head_precision_to_the_op(monkeypatch):
    import alignkernels.integrations.transformers as ak_transformers

    calls = []
    real = ak_transformers.linear_logprobs
    monkeypatch.setattr(ak_transformers, "linear_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = tiny_causal_lm("qwen2")
    input_ids, attention_mask, labels = batch()
    ref_logp, ref_entropy, mask = reference_logprobs(model, input_ids, attention_mask, labels, 0.7)
    out = causal_lm_logprobs(model, input_ids, labels, attention_mask=attention_mask, temperature=0.7,
                             batch_invariant=True, head_precision="tf32", backend="torch")  # fmt: skip
    assert [(k["batch_invariant"], k["head_precision"]) for k in calls] == [(True, "tf32")]
    torch.testing.assert_close(out.logprobs, ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head_precision"):
        causal_lm_logprobs(model, input_ids, labels, attention_mask=attention_mask, head_precision="fp16")
