"""Reward modelling with alignkernels: TRL's RewardTrainer, one extra line.

    python examples/reward.py      # a tiny random Qwen2 classifier on CPU, 3 optimizer steps
"""
import tempfile

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

import alignkernels.integrations.trl as ak_trl
from tiny_setup import cpu_args, random_text, tiny_reward_model, tiny_tokenizer

ak_trl.apply()  # <- the drop-in: score only the last token, alignkernels.bradley_terry_loss


def main():
    g = torch.Generator().manual_seed(0)
    prompts = [random_text(g, 5) for _ in range(12)]
    dataset = Dataset.from_dict(
        {
            "chosen": [p + " " + random_text(g, 6) for p in prompts],
            "rejected": [p + " " + random_text(g, 3) for p in prompts],
            "margin": [0.5] * len(prompts),  # optional
        }
    )
    args = RewardConfig(
        **cpu_args(tempfile.mkdtemp()), per_device_train_batch_size=4, learning_rate=1e-3,
        center_rewards_coefficient=0.01,
    )  # fmt: skip
    trainer = RewardTrainer(model=tiny_reward_model(), args=args, train_dataset=dataset, processing_class=tiny_tokenizer())
    assert "forward" in vars(trainer.model), "alignkernels did not patch the reward model"
    trainer.train()
    for log in trainer.state.log_history[:-1]:
        print({k: round(v, 4) for k, v in log.items() if k in ("step", "loss", "accuracy", "margin", "mean_reward")})


if __name__ == "__main__":
    main()
