"""Trains a tiny BERT with transformers Trainer for the resume tests; run as `python -m tests.resume_worker`.

    python -m tests.resume_worker OUT MEMORY SELECTION [CHECKPOINT]

Without CHECKPOINT: 10 optimizer steps, a checkpoint after step 5. With it: a fresh process resumes from it and
trains to step 10. Either way the final model state goes to OUT/state.safetensors and the adapter to OUT/adapter.
"""

from __future__ import annotations

import sys

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model

STEPS, SAVE_AT = 10, 5


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=0):
        data = batch(size=n, seed=seed, pad_from=None)
        self.rows = [{k: v[i] for k, v in data.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main(out: str, memory: str, selection: str, checkpoint: str | None = None) -> None:
    model = get_peft_model(
        tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory, selection=selection, seed=3)
    )
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=STEPS,
        save_steps=SAVE_AT,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        weight_decay=0.01,
        warmup_steps=2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train(resume_from_checkpoint=checkpoint)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        f"{out}/state.safetensors",
        metadata={"step": str(model.stoc_stats()["step"])},
    )
    model.save_pretrained(f"{out}/adapter")


if __name__ == "__main__":
    main(*sys.argv[1:])
