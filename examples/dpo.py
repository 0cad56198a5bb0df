"""DPO with alignkernels: TRL's DPOTrainer, one extra line.

    python examples/dpo.py         # a tiny random Qwen2 on CPU, 3 optimizer steps
"""
import copy
import tempfile

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import alignkernels.integrations.trl as ak_trl
from tiny_setup import cpu_args, random_text, tiny_causal_lm, tiny_tokenizer

ak_trl.apply()  # <- the drop-in: policy and reference log-probs via alignkernels.linear_logprobs


def main():
    g = torch.Generator().manual_seed(0)
    prompts = [random_text(g, 6) for _ in range(12)]
    dataset = Dataset.from_dict(
        {
            "prompt": prompts,
            # leading space: completions start on a word boundary after the prompt
            "chosen": [" " + random_text(g, 5) for _ in prompts],
            "rejected": [" " + random_text(g, 7) for _ in prompts],
        }
    )
    model = tiny_causal_lm()
    args = DPOConfig(**cpu_args(tempfile.mkdtemp()), per_device_train_batch_size=4, beta=0.1, learning_rate=1e-3)
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    for log in trainer.state.log_history[:-1]:
        print({k: round(v, 4) for k, v in log.items() if k in ("step", "loss", "rewards/margins", "mean_token_accuracy")})
    assert ak_trl.adapter_calls() > 0, "alignkernels was not used"


if __name__ == "__main__":
    main()
