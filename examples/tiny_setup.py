"""Offline building blocks for the examples: a word-level tokenizer and tiny random Qwen2 models.

Nothing is downloaded. With a real model, replace these with
``AutoTokenizer.from_pretrained(name)`` and ``AutoModelForCausalLM.from_pretrained(name)`` (or
pass the model name straight to the trainer).
"""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

N_WORDS = 252  # vocabulary: <pad> <eos> <bos> <unk> w0 ... w251


def tiny_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(N_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=N_WORDS + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def tiny_causal_lm(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config())


def tiny_reward_model(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(tiny_config(num_labels=1))


def random_text(generator, n_words):
    ids = torch.randint(0, N_WORDS, (n_words,), generator=generator).tolist()
    return " ".join(f"w{i}" for i in ids)


def cpu_args(output_dir, **kwargs):
    """TrainingArguments for a few quiet CPU steps (no saving, no reporting)."""
    defaults = dict(
        output_dir=output_dir, max_steps=3, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    defaults.update(kwargs)
    return defaults
