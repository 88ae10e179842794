"""SAM in the Hugging Face Trainer: ``SharpnessAwareTrainer`` on a small language model.

    pip install "samkit[integrations]"
    HF_HUB_OFFLINE=1 python examples/hf_trainer_sam.py
    HF_HUB_OFFLINE=1 python examples/hf_trainer_sam.py --steps 20 --accumulation 2

The model is built from a config (no download): a 2-layer Llama on a synthetic language whose
next token is a fixed function of the current one, which the model learns within a few dozen
steps. Everything is the Trainer's (data, schedule, logging) except the step, which runs every
pass of the samkit method; ``max_grad_norm`` clips the update gradient only.
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from samkit.integrations.transformers import SharpnessAwareTrainer  # noqa: E402

VOCAB, LENGTH = 32, 16


class Sequences(torch.utils.data.Dataset):
    """Token ``t + 1`` is ``(5 * t + 3) mod VOCAB`` of token ``t``; the first one is random."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(1, LENGTH):
            ids[:, t] = (5 * ids[:, t - 1] + 3) % VOCAB
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--method", default="sam")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    ap.add_argument("--out", default="runs/hf_trainer_sam")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=args.accumulation, learning_rate=3e-3, weight_decay=0.01,
        max_grad_norm=args.max_grad_norm, logging_steps=max(1, args.steps // 6), save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = SharpnessAwareTrainer(
        model=model, args=training_args, train_dataset=Sequences(512, seed=0),
        eval_dataset=Sequences(64, seed=1), method=args.method, method_kwargs={"rho": 0.05},
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    print(f"evaluation loss {metrics['eval_loss']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
