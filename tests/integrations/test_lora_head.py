"""LoRA on ``lm_head`` through the drop-ins: ``patch_causal_lm`` and ``apply(allow_lora_lm_head=True)``.

The baseline is an *eager* PEFT head: TRL's ``ChunkedLogProbFunction`` replaced by materialised
``lm_head(hidden)`` logits of the PEFT module itself (its own LoRA forward) + ``log_softmax``, and
TRL's "no adapter on lm_head" check lifted for that run only. The GRPO and SFT runs (tiny Qwen2 from
a config, CPU, 3 SGD steps) must log the same numbers and end with the same adapter parameters (1e-5).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import alignkernels.integrations.trl as ak_trl  # noqa: E402
from alignkernels.integrations.transformers import (  # noqa: E402
    UnsupportedModelError,
    causal_lm_logprobs,
    patch_causal_lm,
)

VOCAB, N_WORDS, HIDDEN = 96, 92, 32
FUSED_HEAD_TRAINERS = ("sft_trainer", "dpo_trainer", "grpo_trainer", "rloo_trainer", "kto_trainer")


@pytest.fixture(autouse=True)
def _always_remove():
    ak_trl.remove()
    yield
    ak_trl.remove()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(N_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>")  # fmt: skip


def tiny_causal_lm(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**{**dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False), **overrides})  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


def lora_config(**kw):
    return peft.LoraConfig(**{**dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                     target_modules=["lm_head", "q_proj"]), **kw})  # fmt: skip


def _randomise_lora_B(model, seed=5):
    """PEFT starts lora_B at zero (then A gets no gradient at first); a random B tests every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------------------------
# patch_causal_lm / causal_lm_logprobs on a PEFT model
# --------------------------------------------------------------------------------------------
def _eager_logprobs(model, input_ids, temperature):
    logits = model(input_ids=input_ids).logits[:, :-1].double() / temperature
    logprobs = torch.log_softmax(logits, -1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def test_patch_causal_lm_fuses_a_peft_lora_head():
    model = peft.get_peft_model(tiny_causal_lm().double(), lora_config())
    _randomise_lora_B(model)
    patch_causal_lm(model, temperature=0.8, backend="torch")
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    params = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert len(params) == 2  # lora_A and lora_B of the head; the base head is frozen

    ref_logp, ref_ent = _eager_logprobs(model, ids, 0.8)
    ref_grads = torch.autograd.grad((ref_logp.sum() + 0.5 * ref_ent.sum()), params)
    out = model(input_ids=ids, labels=ids, return_token_logprobs=True)
    grads = torch.autograd.grad((out.logprobs.sum() + 0.5 * out.entropy.sum()), params)
    torch.testing.assert_close(out.logprobs, ref_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert b.abs().max() > 0

    with model.disable_adapter():  # the adapter-free reference pass: the base head alone
        base_logp, _ = _eager_logprobs(model, ids, 0.8)
        fused = causal_lm_logprobs(model, ids, ids, temperature=0.8, backend="torch").logprobs
    torch.testing.assert_close(fused, base_logp, rtol=1e-10, atol=1e-10)
    assert (fused - out.logprobs.detach()).abs().max() > 1e-3  # the adapter really changed the numbers


def _two_adapters():
    model = peft.get_peft_model(tiny_causal_lm(), lora_config(), adapter_name="first")
    model.add_adapter("second", lora_config())
    model.base_model.set_adapter(["first", "second"])
    return model


def _merged():
    model = peft.get_peft_model(tiny_causal_lm(), lora_config())
    model.merge_adapter()
    return model


REFUSED = [
    ("dropout", lambda: peft.get_peft_model(tiny_causal_lm(), lora_config(lora_dropout=0.1)), "dropout"),
    ("two active adapters", _two_adapters, "2 active LoRA adapters"),
    ("dora", lambda: peft.get_peft_model(tiny_causal_lm(), lora_config(use_dora=True)), "DoRA"),
    ("merged", _merged, "merged"),
    ("ia3", lambda: peft.get_peft_model(tiny_causal_lm(), peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["lm_head"], feedforward_modules=[])), "only a plain LoRA"),
]  # fmt: skip


@pytest.mark.parametrize("make,match", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_patch_causal_lm_refuses_unsupported_adapters(make, match):
    with pytest.raises(UnsupportedModelError, match=match):
        patch_causal_lm(make())


# --------------------------------------------------------------------------------------------
# TRL trainers under apply(allow_lora_lm_head=True) vs the eager PEFT head
# --------------------------------------------------------------------------------------------
class EagerPeftHead:
    """Stand-in for ``ChunkedLogProbFunction``: materialised logits of the PEFT ``lm_head`` module."""

    head = None  # the PEFT LoRA lm_head of the trainer being run

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=()):  # fmt: skip
        assert weight is EagerPeftHead.head.weight
        z = EagerPeftHead.head(hidden).float() * logit_scale / temperature  # the PEFT forward: base + LoRA
        logprobs = torch.log_softmax(z, -1)
        logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1) if "entropy" in outputs else None
        is_top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return logp, entropy, None, None, is_top1


def _eager_baseline(monkeypatch):
    """TRL with the eager PEFT head, and TRL's refusal of an adapter on lm_head lifted."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", EagerPeftHead)
    for name in FUSED_HEAD_TRAINERS:
        monkeypatch.setattr(getattr(trl.trainer, name), "BaseTunerLayer", type("NoTunerLayer", (), {}))


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), max_steps=3, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
               logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0,
               bf16=False, fp16=False, disable_tqdm=True, **kw)  # fmt: skip


def _words(g, n):
    return " ".join(f"w{i}" for i in torch.randint(0, N_WORDS, (n,), generator=g).tolist())


def _sft_trainer(tmp_path):
    g = torch.Generator().manual_seed(8)
    dataset = datasets.Dataset.from_dict({"text": [_words(g, 6 + i % 5) for i in range(9)]})
    return trl.SFTTrainer(model=tiny_causal_lm(seed=8), args=_args(trl.SFTConfig, tmp_path, per_device_train_batch_size=3),
                          train_dataset=dataset, processing_class=tiny_tokenizer(), peft_config=lora_config())  # fmt: skip


def _grpo_trainer(tmp_path, **config):
    model_path = str(tmp_path / "policy")
    tiny_causal_lm(seed=21).save_pretrained(model_path)
    g = torch.Generator().manual_seed(0)
    dataset = datasets.Dataset.from_dict({"prompt": [_words(g, 4) for _ in range(4)]})

    def reward_distinct(completions, **kwargs):
        return [len(set(c.split())) / 4.0 for c in completions]

    # beta > 0: the reference pass is the policy with its adapters disabled (the base head alone)
    args = _args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4, steps_per_generation=3,
                 max_completion_length=6, temperature=0.9, beta=0.04, loss_type="dapo", **config)  # fmt: skip
    return trl.GRPOTrainer(model=model_path, reward_funcs=reward_distinct, args=args, train_dataset=dataset,
                           processing_class=tiny_tokenizer(), peft_config=lora_config())  # fmt: skip


def _train(make):
    torch.manual_seed(0)  # PEFT initialises its adapters inside the trainer's constructor
    trainer = make()
    EagerPeftHead.head = trainer.model.get_base_model().lm_head
    assert type(EagerPeftHead.head).__name__ == "Linear" and hasattr(EagerPeftHead.head, "lora_A")
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lm_head.lora_B" in n}
    calls = ak_trl.adapter_calls()
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert initial and all(not torch.equal(params[n], p) for n, p in initial.items()), "the head adapter did not train"
    return [dict(x) for x in trainer.state.log_history], params, ak_trl.adapter_calls() - calls


def _compare(eager, fused):
    (eager_logs, eager_params, _), (fused_logs, fused_params, fused_calls) = eager, fused
    assert fused_calls > 0, "the patched trainer never called alignkernels"
    n = 0
    for step, (a, b) in enumerate(zip(eager_logs, fused_logs, strict=True)):
        for key, value in a.items():
            if isinstance(value, float) and "time" not in key and "per_second" not in key and "runtime" not in key:
                assert math.isclose(value, b[key], rel_tol=1e-5, abs_tol=1e-6), f"step {step} {key}: {value} vs {b[key]}"
                n += 1
    assert n >= 6
    head_params = [k for k in eager_params if "lm_head" in k]
    assert sorted(head_params) == sorted(k for k in fused_params if "lm_head" in k) and len(head_params) == 2
    for name, p in eager_params.items():
        torch.testing.assert_close(fused_params[name], p, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["sft", pytest.param("grpo", marks=pytest.mark.slow)])
def test_trainer_with_lora_lm_head_matches_eager_head(tmp_path, monkeypatch, kind):
    make = {"sft": _sft_trainer, "grpo": _grpo_trainer}[kind]
    with monkeypatch.context() as m:
        _eager_baseline(m)
        eager = _train(lambda: make(tmp_path / "eager"))
    ak_trl.apply(allow_lora_lm_head=True, backend="torch")
    fused = _train(lambda: make(tmp_path / "fused"))
    _compare(eager, fused)


def test_apply_without_the_option_keeps_trls_refusal(tmp_path):
    ak_trl.apply()
    with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
        _sft_trainer(tmp_path)
    ak_trl.remove()
    import trl.trainer.sft_trainer as sft_module
    from peft.tuners.tuners_utils import BaseTunerLayer

    ak_trl.apply(allow_lora_lm_head=True)
    assert sft_module.BaseTunerLayer is not BaseTunerLayer
    ak_trl.remove()
    assert sft_module.BaseTunerLayer is BaseTunerLayer  # remove() restores TRL's name


@pytest.mark.parametrize("config,match", [(dict(lora_dropout=0.1), "dropout"), (dict(use_dora=True), "DoRA")],
                         ids=["dropout", "dora"])  # fmt: skip
def test_apply_refuses_unsupported_lora_heads_at_build_time(tmp_path, monkeypatch, config, match):
    ak_trl.apply(allow_lora_lm_head=True)
    g = torch.Generator().manual_seed(8)
    dataset = datasets.Dataset.from_dict({"text": [_words(g, 6) for _ in range(3)]})
    with pytest.raises(UnsupportedModelError, match=match):
        trl.SFTTrainer(model=tiny_causal_lm(), args=_args(trl.SFTConfig, tmp_path), train_dataset=dataset,
                       processing_class=tiny_tokenizer(), peft_config=lora_config(**config))  # fmt: skip


def test_apply_refuses_cast_lm_head_to_fp32_with_a_lora_head(tmp_path):
    """TRL's cast replaces the head's forward by F.linear(h, lm_head.weight): generation would drop the adapter."""
    ak_trl.apply(allow_lora_lm_head=True)
    with pytest.raises(UnsupportedModelError, match="cast_lm_head_to_fp32"):
        _grpo_trainer(tmp_path, cast_lm_head_to_fp32=True)


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_fused_loss_with_lora_lm_head_matches_eager_head(tmp_path, monkeypatch, caplog, kind):
    """``apply(fused_loss=True, allow_lora_lm_head=True)``: the trainers' loss on the three-GEMM head
    carries the adapter's term (loss values, metrics and every trained parameter as the eager PEFT
    head), and the backward never had to recompute."""
    import logging

    from alignkernels.integrations import trl_fused_loss

    make = {"sft": _sft_trainer, "grpo": _grpo_trainer}[kind]
    with monkeypatch.context() as m:
        _eager_baseline(m)
        eager = _train(lambda: make(tmp_path / "eager"))
    fused_calls, recomputed = [], []
    original, original_lp = trl_fused_loss.sft_logprobs, trl_fused_loss.linear_logprobs

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        fused_calls.append(out is not None and kwargs["options"].lora is not None)  # the three-GEMM head, with LoRA
        return out

    monkeypatch.setattr(trl_fused_loss, "sft_logprobs", counted)
    monkeypatch.setattr(trl_fused_loss, "linear_logprobs", lambda *a, **k: recomputed.append(1) or original_lp(*a, **k))
    ak_trl.apply(allow_lora_lm_head=True, fused_loss=True, backend="torch")
    with caplog.at_level(logging.WARNING, logger="alignkernels.integrations.trl"):
        fused = _train(lambda: make(tmp_path / "fused"))
    assert any("loss -> fused three-GEMM" in r.getMessage() for r in caplog.records)
    assert sum(fused_calls) >= 3 and not recomputed, (fused_calls, len(recomputed))
    _compare(eager, fused)
