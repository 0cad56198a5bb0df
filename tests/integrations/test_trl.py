"""alignkernels.integrations.trl: TRL's own trainers, stock vs patched, end to end on CPU.

Each parity test trains the same tiny random Qwen2 model (built from a config) on the same
synthetic data from the same seed for 3 optimizer steps, once with stock TRL (its
``ChunkedLogProbFunction`` / the reward model's own forward and loss) and once after
``alignkernels.integrations.trl.apply()``. SGD is used so that parameter differences reflect
gradient differences (Adam's first step is ``lr * sign(grad)``, which turns a 1e-9 rounding
difference in a near-zero gradient into a full ``lr`` step).
fp32 tolerance: logged losses and metrics 1e-5 relative (+1e-6 absolute), final parameters 1e-5.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import alignkernels.integrations.trl as ak_trl  # noqa: E402
from alignkernels.integrations.transformers import UnsupportedModelError  # noqa: E402

VOCAB = 128
N_WORDS = VOCAB - 4
# logged keys that measure time, not training
_TIMING_KEYS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture(autouse=True)
def _always_remove():
    ak_trl.remove()
    yield
    ak_trl.remove()


def tiny_tokenizer():
    """A WordLevel tokenizer over "w0 ... w123" with <pad>=0, <eos>=1, <bos>=2, <unk>=3 (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(N_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.Qwen2Config(**kwargs)


def tiny_causal_lm(seed=0):
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(tiny_config())
    with torch.no_grad():  # a peakier softmax than random init gives
        model.lm_head.weight.mul_(6.0)
    return model


def words(g, n):
    return " ".join(f"w{i}" for i in torch.randint(0, N_WORDS, (n,), generator=g).tolist())


def common_args(**kw):
    return dict(
        output_dir=kw.pop("output_dir"), max_steps=3, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0,
        bf16=False, fp16=False, disable_tqdm=True, **kw,
    )  # fmt: skip


def _is_tie(logs, accuracy_key, tol=1e-5):
    """DPO accuracy compares chosen vs rejected rewards; when every margin is ~0 (step 0 with a
    precomputed reference: policy == reference) its value is decided by rounding noise."""
    margin = logs.get(accuracy_key.replace("rewards/accuracies", "rewards/margins"))
    return margin is not None and abs(margin) < tol


def compare_runs(stock, patched, *, rtol=1e-5, atol=1e-6, min_compared=12):
    (stock_logs, stock_params), (patched_logs, patched_params) = stock, patched
    assert len(stock_logs) == len(patched_logs) >= 4  # 3 steps + the summary
    n_compared = 0
    for step, (a, b) in enumerate(zip(stock_logs, patched_logs)):
        assert set(a) == set(b), f"step {step}: logged keys differ: {set(a) ^ set(b)}"
        for key in a:
            if key in _TIMING_KEYS or not isinstance(a[key], (int, float)):
                continue
            if key.endswith("rewards/accuracies") and _is_tie(a, key) and _is_tie(b, key):
                continue  # chosen == rejected reward up to rounding (policy == reference): a coin flip
            assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=atol), f"step {step} {key}: {a[key]} vs {b[key]}"
            n_compared += 1
    assert n_compared >= min_compared
    moved = 0
    for name, p in stock_params.items():
        torch.testing.assert_close(patched_params[name], p, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(p, INITIAL[name])) if name in INITIAL else 0
    assert moved >= 3, "training did not change the parameters: the comparison would be vacuous"


INITIAL: dict = {}


def run(make_trainer, patched):
    trainer = make_trainer()
    if patched:
        ak_trl.apply(trainer)
    calls_before = ak_trl._Options.calls
    trainer.train()
    if patched and not isinstance(trainer, trl.RewardTrainer):
        assert ak_trl._Options.calls > calls_before, "the patched trainer never called the adapter"
    if not patched:
        assert ak_trl._Options.calls == calls_before
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return [dict(x) for x in trainer.state.log_history], params


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def grpo_factory(tmp_path, model, trainer_cls="GRPO", **config):
    # a local checkpoint: with beta > 0 GRPOTrainer loads its reference model from the policy's path
    model_path = str(tmp_path / "policy")
    model.save_pretrained(model_path)
    g = torch.Generator().manual_seed(0)
    dataset = datasets.Dataset.from_dict({"prompt": [words(g, 5) for _ in range(6)]})

    def reward_distinct(completions, **kwargs):
        return [len(set(c.split())) / 4.0 for c in completions]

    def make():
        args = getattr(trl, f"{trainer_cls}Config")(
            **common_args(output_dir=str(tmp_path)), per_device_train_batch_size=4, num_generations=4,
            steps_per_generation=3, max_completion_length=8, temperature=0.9, beta=0.04, **config,
        )  # fmt: skip
        # steps_per_generation=3: one generation (same model both runs) feeds the 3 optimizer steps
        return getattr(trl, f"{trainer_cls}Trainer")(
            model=model_path, reward_funcs=reward_distinct, args=args, train_dataset=dataset,
            processing_class=tiny_tokenizer(),
        )  # fmt: skip

    return make


GRPO_CONFIGS = [
    dict(loss_type="dapo", epsilon_high=0.28),
    # sequence-level ratios (GSPO), BNPO normalisation, entropy-quantile token mask
    dict(loss_type="bnpo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
]


@pytest.mark.parametrize("config", GRPO_CONFIGS, ids=["dapo", "gspo-bnpo-entropy-mask"])
def test_grpo_stock_vs_patched(tmp_path, config):
    model = tiny_causal_lm()
    INITIAL.clear()
    INITIAL.update({n: p.detach().clone() for n, p in model.named_parameters()})
    make = grpo_factory(tmp_path, model, **config)
    stock = run(make, patched=False)
    patched = run(make, patched=True)
    compare_runs(stock, patched)
    assert "entropy" in patched[0][0] and "kl" in patched[0][0]


def test_rloo_stock_vs_patched(tmp_path):
    model = tiny_causal_lm(seed=7)
    INITIAL.clear()
    INITIAL.update({n: p.detach().clone() for n, p in model.named_parameters()})
    make = grpo_factory(tmp_path, model, trainer_cls="RLOO")
    compare_runs(run(make, patched=False), run(make, patched=True))


def test_kto_stock_vs_patched(tmp_path):
    """KTO: policy, reference and the mismatched-pair KL passes all go through the fused head."""
    model = tiny_causal_lm(seed=9)
    INITIAL.clear()
    INITIAL.update({n: p.detach().clone() for n, p in model.named_parameters()})
    g = torch.Generator().manual_seed(9)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [words(g, 4) for _ in range(12)],
            "completion": [" " + words(g, 3 + i % 3) for i in range(12)],
            "label": [True, False, True] * 4,
        }
    )

    def make():
        args = trl.KTOConfig(**common_args(output_dir=str(tmp_path)), per_device_train_batch_size=4)
        return trl.KTOTrainer(
            model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
            processing_class=tiny_tokenizer(),
        )  # fmt: skip

    compare_runs(run(make, patched=False), run(make, patched=True), min_compared=6)


def test_sft_stock_vs_patched(tmp_path):
    model = tiny_causal_lm(seed=8)
    INITIAL.clear()
    INITIAL.update({n: p.detach().clone() for n, p in model.named_parameters()})
    g = torch.Generator().manual_seed(8)
    dataset = datasets.Dataset.from_dict({"text": [words(g, 6 + i % 5) for i in range(12)]})

    def make():
        args = trl.SFTConfig(**common_args(output_dir=str(tmp_path)), per_device_train_batch_size=3)
        return trl.SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tiny_tokenizer())

    compare_runs(run(make, patched=False), run(make, patched=True), min_compared=6)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_factory(tmp_path, model, **config):
    g = torch.Generator().manual_seed(1)
    prompts = [words(g, 4) for _ in range(6)]
    # leading space: the completion starts on a word boundary after the prompt
    dataset = datasets.Dataset.from_dict(
        {"prompt": prompts, "chosen": [" " + words(g, 4) for _ in prompts], "rejected": [" " + words(g, 6) for _ in prompts]}
    )

    def make():
        args = trl.DPOConfig(**common_args(output_dir=str(tmp_path)), per_device_train_batch_size=2, beta=0.5, **config)
        return trl.DPOTrainer(
            model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
            processing_class=tiny_tokenizer(),
        )  # fmt: skip

    return make


DPO_CONFIGS = [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5]),
    # WPO weights read the fused op's log_sum_sq_probs; LD-DPO splits the per-token log-probs
    dict(loss_type=["sigmoid"], use_weighting=True, ld_alpha=0.5),
    # reference log-probs computed once before training, through the fused head too
    dict(loss_type=["hinge"], precompute_ref_log_probs=True),
]


@pytest.mark.parametrize("config", DPO_CONFIGS, ids=["sigmoid", "ipo+sft", "wpo+ld", "hinge-precomputed-ref"])
def test_dpo_stock_vs_patched(tmp_path, config):
    model = tiny_causal_lm(seed=1)
    INITIAL.clear()
    INITIAL.update({n: p.detach().clone() for n, p in model.named_parameters()})
    make = dpo_factory(tmp_path, model, **config)
    stock = run(make, patched=False)
    patched = run(make, patched=True)
    compare_runs(stock, patched)
    for key in ("logits/chosen", "mean_token_accuracy", "entropy", "rewards/margins"):
        assert key in patched[0][0]


# --------------------------------------------------------------------------------------------
# Reward modelling
# --------------------------------------------------------------------------------------------


def reward_factory(tmp_path, model, **config):
    g = torch.Generator().manual_seed(2)
    prompts = [words(g, 3) for _ in range(6)]
    dataset = datasets.Dataset.from_dict(
        {
            "chosen": [p + " " + words(g, 4) for p in prompts],
            "rejected": [p + " " + words(g, 2) for p in prompts],  # shorter: right padding in the batch
            "margin": [0.25 * i for i in range(6)],
        }
    )

    def make():
        args = trl.RewardConfig(**common_args(output_dir=str(tmp_path)), per_device_train_batch_size=3, **config)
        return trl.RewardTrainer(
            model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tiny_tokenizer()
        )

    return make


def test_reward_stock_vs_patched(tmp_path):
    pytest.importorskip("alignkernels.losses.reward")
    torch.manual_seed(3)
    model = transformers.Qwen2ForSequenceClassification(tiny_config(num_labels=1))
    INITIAL.clear()
    INITIAL.update({n: p.detach().clone() for n, p in model.named_parameters()})
    make = reward_factory(tmp_path, model, center_rewards_coefficient=0.05)
    stock = run(make, patched=False)
    # apply() before the trainer is built: RewardTrainer.__init__ patches the model
    with ak_trl.apply():
        trainer = make()
        assert "forward" in vars(trainer.model)
        trainer.train()
        patched = ([dict(x) for x in trainer.state.log_history], {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert "forward" not in vars(trainer.model)  # removed on exit
    compare_runs(stock, patched)


def test_reward_forward_scores_last_non_pad_token():
    """Gather-then-score equals the model's own score-then-gather, left and right padding."""
    pytest.importorskip("alignkernels.ops.gather")
    torch.manual_seed(4)
    model = transformers.Qwen2ForSequenceClassification(tiny_config(num_labels=2)).eval()
    input_ids = torch.randint(3, VOCAB, (3, 9))
    input_ids[0, -3:] = 0  # right padding
    input_ids[1, :2] = 0  # left padding
    attention_mask = (input_ids != 0).long()
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ak_trl.patch_reward_model(model)
    got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert got.shape == expected.shape == (3, 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    ak_trl.unpatch_reward_model(model)
    assert "forward" not in vars(model)


# --------------------------------------------------------------------------------------------
# The seam itself
# --------------------------------------------------------------------------------------------


def test_adapter_matches_trl_function_outputs_and_grads():
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(5)
    N, H, V = 13, 24, 101
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    args = (targets, 0.8, 32768, 3.0, 0.7, outputs)
    results = []
    for fn in (ChunkedLogProbFunction, ak_trl.LinearLogprobsAdapter):
        out = fn.apply(hidden, weight, bias, *args)
        (out[0].sum() - 0.5 * out[1].sum()).backward()
        results.append((out, [t.grad.clone() for t in (hidden, weight, bias)]))
        for t in (hidden, weight, bias):
            t.grad = None
    (trl_out, trl_grads), (ak_out, ak_grads) = results
    for name, a, b in zip(outputs, trl_out, ak_out):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    for a, b in zip(trl_grads, ak_grads):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    # fields not requested are None, as in TRL
    out = ak_trl.LinearLogprobsAdapter.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))
    assert out[0].shape == (N,) and all(x is None for x in out[1:])


def test_apply_rebinds_every_reference_and_remove_restores():
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import dpo_trainer, grpo_trainer, utils

    handle = ak_trl.apply()
    assert ak_trl.is_applied()
    assert utils._ChunkedLogProbFunction is ak_trl.LinearLogprobsAdapter
    import trl.kernels as trl_kernels

    assert trl_kernels.ChunkedLogProbFunction is ak_trl.LinearLogprobsAdapter
    assert grpo_trainer.add_fused_lm_head.__wrapped__ is utils.add_fused_lm_head.__wrapped__
    assert dpo_trainer.add_fused_lm_head is not utils.add_fused_lm_head.__wrapped__
    assert ak_trl.apply() is handle  # idempotent
    handle.remove()
    assert not ak_trl.is_applied()
    assert utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert trl_kernels.ChunkedLogProbFunction is ChunkedLogProbFunction
    assert not hasattr(grpo_trainer.add_fused_lm_head, "__wrapped__")
    assert trl.RewardTrainer.compute_loss.__module__.startswith("trl.")


class _RecordShapes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def test_patched_fused_forward_never_allocates_full_logits():
    """TRL's fused forward + backward, patched: no tensor holds logits for a quarter of the tokens."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_causal_lm()
    ak_trl.apply(chunk_size=8)
    add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    B, T = 4, 40
    input_ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(6))
    labels = input_ids.clone()
    labels[:, :10] = -100
    n_rows = B * T // 4
    assert n_rows > model.config.hidden_size  # the [V, H] weight is not mistaken for logits
    recorder = _RecordShapes()
    with recorder:
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
    big = [s for s in recorder.shapes if VOCAB in s and len(s) >= 2 and torch.Size(s).numel() // VOCAB >= n_rows]
    assert not big, big[:5]
    # and the recorder does see the full logits of the ordinary forward
    recorder = _RecordShapes()
    with recorder, torch.no_grad():
        model(input_ids=input_ids)
    assert any(s == (B, T, VOCAB) for s in recorder.shapes)


class _FakeLoraLinear(torch.nn.Module):
    """The attribute layout of a PEFT LoRA layer (``base_layer``, ``lora_A``) around a Linear."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, 2, bias=False)})

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x)


def test_unsupported_configs_raise_documented_error(tmp_path):
    # LoRA on lm_head: raised when the trainer is built (apply() first) ...
    model = tiny_causal_lm()
    model.lm_head = _FakeLoraLinear(model.lm_head)
    ak_trl.apply()
    with pytest.raises(UnsupportedModelError, match="PEFT adapter"):
        dpo_factory(tmp_path, model)()
    ak_trl.remove()
    # ... or by apply(trainer) on a built trainer, leaving TRL unpatched
    trainer = dpo_factory(tmp_path, model)()
    with pytest.raises(UnsupportedModelError, match="PEFT adapter"):
        ak_trl.apply(trainer)
    assert not ak_trl.is_applied()
    # unknown model family
    model = tiny_causal_lm()
    model.config.model_type = "my_custom_family"
    trainer = dpo_factory(tmp_path, model)()
    with pytest.raises(UnsupportedModelError, match="allow_unknown_models"):
        ak_trl.apply(trainer)
    ak_trl.apply(trainer, allow_unknown_models=True)  # explicit opt-in
    assert ak_trl.is_applied()
    ak_trl.remove()
    # reward trainer given a causal LM
    with pytest.raises(UnsupportedModelError, match="ForSequenceClassification"):
        ak_trl.patch_reward_model(tiny_causal_lm())
    with pytest.raises(ValueError, match="backend"):
        ak_trl.apply(backend="nope")


@pytest.mark.gpu
def test_adapter_matches_trl_function_cuda_bf16_autocast():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator(device="cuda").manual_seed(0)
    N, H, V = 777, 256, 32003
    hidden = torch.randn(N, H, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results = []
    for fn in (ChunkedLogProbFunction, ak_trl.LinearLogprobsAdapter):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn.apply(hidden, weight, None, targets, 0.9, 32768, 30.0, 1.0, outputs)
        (out[0].sum() + out[1].sum()).backward()
        results.append((out, hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    (a, ha, wa), (b, hb, wb) = results
    for name, x, y in zip(outputs, a, b):
        if x.dtype == torch.bool:
            assert (x == y).float().mean() > 0.99, name
        else:
            torch.testing.assert_close(y, x, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(hb, ha, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(wb, wa, atol=2e-2, rtol=5e-2)
