"""Trains a tiny BERT with accelerate for the checkpoint tests; run as `python -m tests.accelerate_worker`.

    python -m tests.accelerate_worker OUT SELECTION MEMORY whole|first|resume

`whole`: 6 optimizer steps. `first`: 3 steps, then `accelerator.save_state(OUT/checkpoint)`. `resume`: a fresh
process loads OUT/checkpoint (of a `first` run) and trains steps 4 to 6. The final model state goes to
OUT/state.safetensors and the adapter to OUT/adapter.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from safetensors.torch import save_file

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model

STEPS, SAVE_AT = 6, 3


def main(out: str, selection: str, memory: str, mode: str, checkpoint: str | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    set_seed(0)
    accelerator = Accelerator(cpu=True)
    model = get_peft_model(
        tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS", selection=selection, memory=memory, seed=5)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    first = 0
    if mode == "resume":
        accelerator.load_state(checkpoint)
        first = SAVE_AT
    last = SAVE_AT if mode == "first" else STEPS
    for step in range(first, last):
        accelerator.backward(model(**batch(seed=step)).loss)
        optimizer.step()
        optimizer.zero_grad()
    if mode == "first":
        accelerator.save_state(f"{out}/checkpoint")
    unwrapped = accelerator.unwrap_model(model)
    save_file(
        {k: v.contiguous() for k, v in unwrapped.state_dict().items()},
        f"{out}/state.safetensors",
        metadata={"step": str(unwrapped.stoc_stats()["step"])},
    )
    unwrapped.save_pretrained(f"{out}/adapter")


if __name__ == "__main__":
    main(*sys.argv[1:])
