"""GRPO with alignkernels: TRL's GRPOTrainer, one extra line.

    python examples/grpo.py        # a tiny random Qwen2 on CPU, 3 optimizer steps
"""
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import alignkernels.integrations.trl as ak_trl
from tiny_setup import cpu_args, random_text, tiny_causal_lm, tiny_tokenizer

ak_trl.apply()  # <- the drop-in: TRL's fused LM head now runs alignkernels.linear_logprobs


def reward_distinct_words(completions, **kwargs):
    return [len(set(c.split())) / 8.0 for c in completions]


def main():
    g = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict({"prompt": [random_text(g, 6) for _ in range(16)]})
    output_dir = tempfile.mkdtemp()
    # beta > 0 loads the reference model from the policy's path, so save the tiny policy locally
    tiny_causal_lm().save_pretrained(output_dir + "/policy")
    args = GRPOConfig(
        **cpu_args(output_dir), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=12, temperature=0.9, beta=0.04, learning_rate=1e-3,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=output_dir + "/policy", reward_funcs=reward_distinct_words, args=args,
        train_dataset=dataset, processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    for log in trainer.state.log_history[:-1]:
        print({k: round(v, 4) for k, v in log.items() if k in ("step", "loss", "reward", "kl", "entropy")})
    assert ak_trl.adapter_calls() > 0, "alignkernels was not used"


if __name__ == "__main__":
    main()
