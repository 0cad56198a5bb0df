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

from helpers import ReturnedShapes

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import alignkernels.integrations.trl as ak_trl  # noqa: E402
import alignkernels.integrations.trl_reward as ak_trl_reward  # noqa: E402
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


def compare_runs(stock, patched, *, rtol=1e-5, atol=1e-6, min_compared=12, min_moved=3):
    """Same logged numbers at every step, same final parameters; and training moved >= ``min_moved`` tensors."""
    (stock_logs, stock_params, initial), (patched_logs, patched_params, _) = stock, patched
    assert len(stock_logs) == len(patched_logs) >= 3  # 2+ steps + the summary
    n_compared = 0
    for step, (a, b) in enumerate(zip(stock_logs, patched_logs)):
        assert set(a) == set(b), f"step {step}: logged keys differ: {set(a) ^ set(b)}"
        for key in a:
            if key in _TIMING_KEYS or not isinstance(a[key], (int, float)):
                continue
            if key.endswith("rewards/accuracies") and _is_tie(a, key) and _is_tie(b, key):
                continue  # chosen == rejected reward up to rounding (policy == reference): a coin flip
            # DPO/KTO rewards and KTO's kl are β·(Σ logp − Σ ref_logp): a difference of two sums of ~10 fp32
            # log-probs, so their rounding is absolute (~β·10·|logp|·6e-8 ≈ 3e-6), not relative to the small
            # difference. A reward model's min/mean/max reward (~0.1) is likewise absolute: the patched forward
            # scores [B, H] gathered rows where stock scores [B, T, H] and gathers (one GEMM rounding, 3e-8),
            # which two SGD steps at lr 0.5 grow to ~2e-6 by step 2.
            key_atol = max(atol, 1e-5) if "reward" in key or key == "kl" else atol
            assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=key_atol), f"step {step} {key}: {a[key]} vs {b[key]}"
            n_compared += 1
    assert n_compared >= min_compared
    assert set(stock_params) == set(patched_params)
    moved = []
    for name, p in stock_params.items():
        torch.testing.assert_close(patched_params[name], p, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        if not torch.equal(p, initial[name]):
            moved.append(name)
    assert len(moved) >= min_moved, "training did not change the parameters: the comparison would be vacuous"
    return moved


_REWARD_MODELS_SEEN: list = []


def run(make_trainer, patched, check_reward_patch=False):
    """Train; return (log history, final parameters, parameters as the trainer received them).

    ``patched``: call ``apply(trainer)`` on the built trainer (a no-op re-check when ``apply()`` was
    already called before building it). ``check_reward_patch``: the built trainer's reward model
    already carries the drop-in's forward (``apply()`` came first)."""
    torch.manual_seed(0)  # PEFT initialises its adapters inside the trainer's constructor
    trainer = make_trainer()
    if check_reward_patch:
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        assert isinstance(vars(base).get("forward"), ak_trl_reward.RewardModelForward)
        _REWARD_MODELS_SEEN[:] = [base]
    if patched:
        ak_trl.apply(trainer)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    calls_before = ak_trl.adapter_calls()
    trainer.train()
    if patched and not isinstance(trainer, trl.RewardTrainer):
        assert ak_trl.adapter_calls() > calls_before, "the patched trainer never called the adapter"
    if not patched:
        assert ak_trl.adapter_calls() == calls_before
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return [dict(x) for x in trainer.state.log_history], params, initial


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def grpo_factory(tmp_path, model, trainer_cls="GRPO", trainer_kwargs=None, **config):
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
            processing_class=tiny_tokenizer(), **(trainer_kwargs or {}),
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
    make = grpo_factory(tmp_path, model, **config)
    stock = run(make, patched=False)
    patched = run(make, patched=True)
    compare_runs(stock, patched)
    assert "entropy" in patched[0][0] and "kl" in patched[0][0]


def test_rloo_stock_vs_patched(tmp_path):
    model = tiny_causal_lm(seed=7)
    make = grpo_factory(tmp_path, model, trainer_cls="RLOO")
    compare_runs(run(make, patched=False), run(make, patched=True))


def kto_factory(tmp_path, model, ref_model=True, trainer_kwargs=None):
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
            model=copy.deepcopy(model), ref_model=copy.deepcopy(model) if ref_model else None, args=args,
            train_dataset=dataset, processing_class=tiny_tokenizer(), **(trainer_kwargs or {}),
        )  # fmt: skip

    return make


def test_kto_stock_vs_patched(tmp_path):
    """KTO: policy, reference and the mismatched-pair KL passes all go through the fused head."""
    make = kto_factory(tmp_path, tiny_causal_lm(seed=9))
    compare_runs(run(make, patched=False), run(make, patched=True), min_compared=6)


def sft_factory(tmp_path, model, trainer_kwargs=None):
    g = torch.Generator().manual_seed(8)
    dataset = datasets.Dataset.from_dict({"text": [words(g, 6 + i % 5) for i in range(12)]})

    def make():
        args = trl.SFTConfig(**common_args(output_dir=str(tmp_path)), per_device_train_batch_size=3)
        return trl.SFTTrainer(
            model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tiny_tokenizer(),
            **(trainer_kwargs or {}),
        )  # fmt: skip

    return make


def test_sft_stock_vs_patched(tmp_path):
    make = sft_factory(tmp_path, tiny_causal_lm(seed=8))
    compare_runs(run(make, patched=False), run(make, patched=True), min_compared=6)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_factory(tmp_path, model, ref_model=True, trainer_kwargs=None, **config):
    g = torch.Generator().manual_seed(1)
    prompts = [words(g, 4) for _ in range(6)]
    # leading space: the completion starts on a word boundary after the prompt
    dataset = datasets.Dataset.from_dict(
        {"prompt": prompts, "chosen": [" " + words(g, 4) for _ in prompts], "rejected": [" " + words(g, 6) for _ in prompts]}
    )

    def make():
        args = trl.DPOConfig(**common_args(output_dir=str(tmp_path)), per_device_train_batch_size=2, beta=0.5, **config)
        return trl.DPOTrainer(
            model=copy.deepcopy(model), ref_model=copy.deepcopy(model) if ref_model else None, args=args,
            train_dataset=dataset, processing_class=tiny_tokenizer(), **(trainer_kwargs or {}),
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
    make = dpo_factory(tmp_path, model, **config)
    stock = run(make, patched=False)
    patched = run(make, patched=True)
    compare_runs(stock, patched)
    for key in ("logits/chosen", "mean_token_accuracy", "entropy", "rewards/margins"):
        assert key in patched[0][0]


# --------------------------------------------------------------------------------------------
# Reward modelling
# --------------------------------------------------------------------------------------------


def reward_factory(tmp_path, model, trainer_kwargs=None, **config):
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
            model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tiny_tokenizer(),
            **(trainer_kwargs or {}),
        )  # fmt: skip

    return make


def test_reward_stock_vs_patched(tmp_path):
    pytest.importorskip("alignkernels.losses.reward")
    torch.manual_seed(3)
    model = transformers.Qwen2ForSequenceClassification(tiny_config(num_labels=1))
    make = reward_factory(tmp_path, model, center_rewards_coefficient=0.05)
    stock = run(make, patched=False)
    # apply() before the trainer is built: RewardTrainer.__init__ patches the model
    with ak_trl.apply():
        patched = run(make, patched=True, check_reward_patch=True)
    assert not any("forward" in vars(m) for m in _REWARD_MODELS_SEEN)  # removed on exit
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
# PEFT (LoRA on the attention projections; TRL wraps the model from peft_config)
# --------------------------------------------------------------------------------------------


def _lora(task_type):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(
        task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )


def _peft_factory(kind, tmp_path):
    if kind == "reward":  # SEQ_CLS: PEFT also wraps the score head (modules_to_save)
        torch.manual_seed(3)
        model = transformers.Qwen2ForSequenceClassification(tiny_config(num_labels=1))
        return reward_factory(tmp_path, model, trainer_kwargs=dict(peft_config=_lora("SEQ_CLS")))
    peft_kwargs = dict(peft_config=_lora("CAUSAL_LM"))
    model = tiny_causal_lm(seed=21)
    if kind == "grpo":  # beta > 0: the reference pass is the policy with its adapter disabled
        return grpo_factory(tmp_path, model, trainer_kwargs=peft_kwargs, loss_type="dapo")
    if kind == "dpo":  # ref_model=None: the reference is the policy with its adapter disabled
        return dpo_factory(tmp_path, model, ref_model=False, trainer_kwargs=peft_kwargs, loss_type=["sigmoid"])
    if kind == "kto":
        return kto_factory(tmp_path, model, ref_model=False, trainer_kwargs=peft_kwargs)
    return sft_factory(tmp_path, model, trainer_kwargs=peft_kwargs)


@pytest.mark.parametrize("kind", [pytest.param("grpo", marks=pytest.mark.slow), "dpo", "sft", "kto", "reward"])
def test_peft_lora_stock_vs_patched(tmp_path, kind):
    """Same logged numbers and the same LoRA adapter (and, for reward models, score head) after training."""
    make = _peft_factory(kind, tmp_path)
    stock = run(make, patched=False)
    patched = run(make, patched=True)
    moved = compare_runs(stock, patched, min_compared=6, min_moved=2)
    assert {n for n in stock[2] if "lora_" in n} and all("lora_" in n or "score" in n for n in moved), moved
    trainable = [n for n in moved if "lora_B" in n]
    assert trainable, "the LoRA adapters did not train"


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


def test_bf16_autocast_patched_at_least_as_accurate_as_stock():
    """Under bf16 autocast (TRL's default) both paths feed the GEMM bf16 operands; TRL then rounds its
    logits tile to bf16 before the fp32 softmax, alignkernels keeps the tile in fp32. Against fp64 on
    the fp32 master values and against fp64 on the same bf16 operands, the patched path is at least
    as accurate as stock, and on the same operands it is exact to fp32 (docs/INTEGRATION.md, "bf16")."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 256, 4099
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (4.0 / H**0.5)  # logits ~ N(0, 4²): max |z| ~ 15
    targets = torch.randint(0, V, (N,), generator=g)

    def fp64_truth(h, w):
        log_softmax = torch.log_softmax(h.double() @ w.double().T, dim=-1)
        return log_softmax.gather(1, targets[:, None]).squeeze(1), -(log_softmax.exp() * log_softmax).sum(-1)

    truths = {"master": fp64_truth(hidden, weight), "bf16 operands": fp64_truth(hidden.bfloat16(), weight.bfloat16())}
    errors = {}
    for name, fn in (("stock", ChunkedLogProbFunction), ("patched", ak_trl.LinearLogprobsAdapter)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, entropy, *_ = fn.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
        assert logp.dtype == entropy.dtype == torch.float32
        for truth_name, (true_logp, true_entropy) in truths.items():
            errors[name, truth_name, "logp"] = float((logp.double() - true_logp).abs().max())
            errors[name, truth_name, "entropy"] = float((entropy.double() - true_entropy).abs().max())
    for truth_name in truths:
        for field in ("logp", "entropy"):
            assert errors["patched", truth_name, field] <= errors["stock", truth_name, field], errors
    # same bf16 operands: alignkernels is exact to fp32 rounding; TRL's bf16 tile costs ~1e-2
    assert errors["patched", "bf16 operands", "logp"] < 5e-5 and errors["patched", "bf16 operands", "entropy"] < 5e-5
    assert errors["stock", "bf16 operands", "logp"] > 100 * errors["patched", "bf16 operands", "logp"], errors


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
    # a model given a fused head under apply() gets the FSDP2 head gather around TRL's forward;
    # remove() takes it off again (TRL's own forward stays)
    model = tiny_causal_lm()
    ak_trl.apply()
    utils.add_fused_lm_head(model)
    assert isinstance(vars(model)["forward"], ak_trl.GatherShardedHeadForward)
    ak_trl.remove()
    assert not isinstance(vars(model)["forward"], ak_trl.GatherShardedHeadForward)
    assert vars(model)["forward"].__func__.__code__.co_name == "_fused_forward"



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
    recorder = ReturnedShapes()
    with recorder:
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
    big = [s for s in recorder.shapes if VOCAB in s and len(s) >= 2 and torch.Size(s).numel() // VOCAB >= n_rows]
    assert not big, big[:5]
    # and the recorder does see the full logits of the ordinary forward
    recorder = ReturnedShapes()
    with recorder, torch.no_grad():
        model(input_ids=input_ids)
    assert any(s == (B, T, VOCAB) for s in recorder.shapes)


def _tile_widths(fn, n_rows):
    """Widths of every [n_rows, w] tensor created while ``fn()`` runs (forward and backward)."""
    recorder = ReturnedShapes()
    with recorder:
        fn()
    return {s[1] for s in recorder.shapes if len(s) == 2 and s[0] == n_rows}


def test_trl_chunk_size_sets_the_tile():
    """TRL's chunk_size (vocabulary width of its 4096 x chunk_size tile in the compute dtype) maps to a
    tile of the same bytes: chunk_size fp32 columns in fp32, chunk_size / 2 under bf16 autocast;
    apply(vocab_block_size=) / apply(chunk_size=) override. Results do not depend on it."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(3)
    N, H, V = 64, 8, 500
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)

    def step(fn, chunk, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, entropy, *_ = fn.apply(hidden, weight, None, targets, 1.0, chunk, None, 1.0, ("log_probs", "entropy"))
        (logp.sum() + entropy.sum()).backward()
        grads = (hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
        return logp.detach(), grads

    ak_trl.apply()
    want = step(ChunkedLogProbFunction, 32768)
    for chunk, autocast, width in ((128, False, 128), (128, True, 64), (32768, False, V)):
        widths = _tile_widths(lambda: step(ak_trl.LinearLogprobsAdapter, chunk, autocast), N)
        assert max(widths - {H}) == width, (chunk, autocast, widths)
        if not autocast:  # the tiling changes the memory, not the numbers
            logp, grads = step(ak_trl.LinearLogprobsAdapter, chunk)
            torch.testing.assert_close(logp, want[0], atol=1e-5, rtol=1e-5)
            for a, b in zip(grads, want[1]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    ak_trl.apply(vocab_block_size=96)
    assert max(_tile_widths(lambda: step(ak_trl.LinearLogprobsAdapter, 128), N) - {H}) == 96
    ak_trl.apply(chunk_size=40)  # 40 token rows: the same tile bytes as TRL's 4096 x 128 -> capped at V
    assert max(_tile_widths(lambda: step(ak_trl.LinearLogprobsAdapter, 128), 40) - {H}) == V
    # on CPU the width is capped at 16384 columns (the fused CPU softmax's precision limit)
    ak_trl.apply()
    wide = torch.randn(ak_trl.CPU_MAX_TILE_COLUMNS + 3000, 4, generator=g)
    few = torch.randn(6, 4, generator=g)
    widths = _tile_widths(lambda: ak_trl.LinearLogprobsAdapter.apply(few, wide, None, targets[:6], 1.0, 32768), 6)
    assert max(widths) == ak_trl.CPU_MAX_TILE_COLUMNS
    with pytest.raises(ValueError, match="vocab_block_size"):
        ak_trl.apply(vocab_block_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ak_trl.apply(chunk_size=1.5)


def test_trl_chunk_size_constant_reaches_the_adapter(monkeypatch):
    """Users tune TRL's tile with ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``; through TRL's fused
    forward that reaches our tile too."""
    from trl.trainer import utils as trl_utils

    model = tiny_causal_lm()
    ak_trl.apply()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(0, VOCAB, (4, 41), generator=torch.Generator().manual_seed(6))
    n_rows = 4 * 40

    def fused_step():
        out = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()

    assert max(_tile_widths(fused_step, n_rows) - {32}) == VOCAB  # TRL's default 32768 > V: one tile
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 24)
    assert max(_tile_widths(fused_step, n_rows) - {32}) == 24


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
    # reward trainer given a causal LM, or a score head that is not position-wise
    with pytest.raises(UnsupportedModelError, match="model must be a \\*ForSequenceClassification"):
        ak_trl.patch_reward_model(tiny_causal_lm())
    reward_model = transformers.Qwen2ForSequenceClassification(tiny_config(num_labels=1))
    reward_model.score = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with pytest.raises(UnsupportedModelError, match="model.score must be a torch.nn.Linear.*Sequential"):
        ak_trl.patch_reward_model(reward_model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ak_trl.patch_reward_model("Qwen/Qwen2.5-0.5B")
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
