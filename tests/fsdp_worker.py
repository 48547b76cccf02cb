"""FSDP2 scenarios run on every rank of a 2-process gloo group, launched by `tests/test_fsdp.py`:

    torchrun --standalone --nproc_per_node 2 -m tests.fsdp_worker OUT_DIR [SCENARIO ...]

Each rank holds dim-0 shards of the model (`fully_shard`) and trains on its own rows of the global batch. A scenario
writes `OUT_DIR/<scenario>.rank<r>.safetensors`: the whole draw of every step gathered from the ranks (`mask.<step>`,
flat indices over all candidates in order), the trained weights gathered whole (`weight.<name>`), logits, figures;
adapters are saved from rank 0 into `OUT_DIR/<scenario>_adapter`. The test compares them with one process holding
the whole model and the global batch.
"""

from __future__ import annotations

import gc
import io
import json
import os
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from peft_stoc import StocTuningConfig
from peft_stoc.distributed import ranks as distributed
from peft_stoc.distributed import sharded_draw, shards
from peft_stoc.sampling.importance import Source
from peft_stoc.sampling.streaming import StreamingDraw

from . import distributed_worker as ddp_worker
from .helpers import VOCAB, batch, tiny_model

STEPS = 5
GLOBAL_BATCH = 8
LENGTH = 12
LR = 1e-2
WEIGHT_DECAY = 0.01
TASKS = {"bert": "SEQ_CLS", "gpt2": "SEQ_CLS", "llama": "CAUSAL_LM"}
FREQUENCY_TRIALS = 1000
FREQUENCY_K = 30


# -- shared with the single-process reference ------------------------------------------------------------------------
def make_model(arch: str, selection: str = "top", seed: int = 3, **config):
    """A tiny model of `arch` without dropout (ranks and the reference compute the same function), k=40."""
    no_dropout = {
        "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        "llama": {},
    }[arch]
    # Shards of unequal sizes, and empty ones: a one-row token-type table (rank 1 holds no row of it), 63 positions.
    shapes = {"bert": {"type_vocab_size": 1}, "gpt2": {"n_positions": 63}, "llama": {}}[arch]
    task = TASKS[arch]
    base = tiny_model(arch, task, **no_dropout, **shapes)
    return get_peft_model(base, StocTuningConfig(k=40, task_type=task, selection=selection, seed=seed, **config))


def base_model(arch: str):
    """The untrained base of `make_model(arch)`."""
    return make_model(arch).base_model.model


def dataset() -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths, so ranks see different numbers of real tokens."""
    generator = torch.Generator().manual_seed(4321)
    rows = []
    for _ in range(STEPS * GLOBAL_BATCH):
        length = int(torch.randint(3, LENGTH + 1, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=generator)
        mask = (torch.arange(LENGTH) < length).long()
        rows.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (), generator=generator)}
        )
    return rows


def local_batch(arch: str, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s rows of global step `step` (consecutive rows, as accelerate's and Trainer's loaders shard), as
    `arch`'s task wants them."""
    per_rank = GLOBAL_BATCH // world
    start = step * GLOBAL_BATCH + rank * per_rank
    rows = ddp_worker.collate(dataset()[start : start + per_rank])
    if TASKS[arch] == "CAUSAL_LM":
        # Every row whole: a token-mean loss per rank, averaged over ranks, is the global mean only when the ranks
        # hold as many tokens (padding and μ's handling of it are covered by the classifiers).
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(step))
        ids = ids[rank * per_rank : (rank + 1) * per_rank]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return rows


def eval_inputs(arch: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch(TASKS[arch], seed=99).items() if k != "labels"}


def logits(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**eval_inputs(arch)).logits.detach().clone()


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def whole_draw(peft_model) -> torch.Tensor:
    """The latest draw of all ranks as flat indices over all candidates, in candidate order (a collective when the
    model is sharded: each rank holds the part of its rows)."""
    engine = peft_model.base_model.stoc_engine()
    drawn = engine.last_draw
    if engine.sharded:
        drawn = sharded_draw.gather_draw(drawn)
    out, offset = [], 0
    for candidate, index in zip(engine.candidates, drawn):
        out.append(index.cpu() + offset)
        offset += candidate.numel
    return torch.cat(out)


def train(
    peft_model, arch: str, rank: int, world: int, steps: int = STEPS, optimizer=None, first: int = 0
) -> list[torch.Tensor]:
    """AdamW steps `first`..`steps - 1` on the global batch split over `world` ranks; returns the whole draw of each
    step."""
    peft_model.train()
    optimizer = optimizer or adamw(peft_model)
    masks = []
    for step in range(first, steps):
        peft_model(**local_batch(arch, step, rank, world)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        masks.append(whole_draw(peft_model))
    return masks


def whole_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (gathered from the shards)."""
    return {
        name: (p.full_tensor() if shards.is_shard(p) else p).detach().clone().contiguous()
        for name, p in model.named_parameters()
    }


def shard(model, arch: str, per_layer: bool = True):
    """`fully_shard` the transformer blocks (optionally) and then the whole model, as FSDP2 users do."""
    from torch.distributed.fsdp import fully_shard

    if per_layer:
        for module in model.modules():
            if type(module).__name__ in ("BertLayer", "GPT2Block", "LlamaDecoderLayer"):
                fully_shard(module)
    fully_shard(model)
    return model


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


# -- scenarios -------------------------------------------------------------------------------------------------------
def scenario_train(arch: str, rank: int, world: int, out: Path, per_layer: bool = True) -> None:
    """`top` under FSDP2: the whole draw of every step, the trained weights, logits, per-rank memory figures; the
    adapter saved from rank 0."""
    model = make_model(arch)
    original = weakref.ref(model.base_model.model.get_input_embeddings().weight)
    shard(model, arch, per_layer=per_layer)
    masks = train(model, arch, rank, world)
    gc.collect()
    engine = model.base_model.stoc_engine()
    sync = engine.strategy.sync
    tensors = {f"mask.{step}": mask for step, mask in enumerate(masks)}
    tensors.update({f"weight.{name}": value for name, value in whole_weights(model).items()})
    tensors["logits"] = logits(model, arch)
    stats = model.stoc_stats()
    tensors["figures"] = torch.tensor(
        [
            stats["step"],
            stats["drawn"],
            stats["changed"],
            stats["grad_bytes"],
            stats["optimizer_state_bytes"],
            sync.bytes,
            sync.rounds,
            engine.reduce_statistics.bytes_per_draw,
            int(original() is None),
        ],
        dtype=torch.float64,
    )
    with model.disable_adapter():
        tensors["disabled_logits"] = logits(model, arch)
    tensors["logits_after_disable"] = logits(model, arch)
    model.save_pretrained(out / f"{arch}_adapter", is_main_process=rank == 0)
    _save(out / f"train_{arch}.rank{rank}.safetensors", tensors)


def scenario_stochastic(rank: int, world: int, out: Path) -> None:
    """`stochastic` under FSDP2: every rank's view of the whole draw at every step."""
    model = shard(make_model("bert", selection="stochastic"), "bert")
    masks = train(model, "bert", rank, world)
    _save(out / f"stochastic.rank{rank}.safetensors", {f"mask.{s}": m for s, m in enumerate(masks)})


def scenario_budget(rank: int, world: int, out: Path) -> None:
    """`max_changed` under FSDP2 with `top`: the budget counts the entries changed on every rank."""
    model = shard(make_model("bert", max_changed=60), "bert")
    masks = train(model, "bert", rank, world)
    tensors = {f"mask.{s}": m for s, m in enumerate(masks)}
    tensors["changed"] = torch.tensor(model.stoc_stats()["changed"])
    _save(out / f"budget.rank{rank}.safetensors", tensors)


def scenario_resume(rank: int, world: int, out: Path) -> None:
    """A checkpoint after 3 of 5 steps under FSDP2 — the model's `state_dict()` (shards, and the record of originals
    gathered from every rank) and this rank's `optimizer.state_dict()` (the sparse state of its rows) through
    `torch.save` — loaded into a freshly sharded model and optimizer: the last 2 steps again. Also what
    torch.distributed.checkpoint's optimizer state dict says."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = shard(make_model("bert"), "bert")
    optimizer = adamw(model)
    train(model, "bert", rank, world, steps=3, optimizer=optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    straight = train(model, "bert", rank, world, steps=STEPS, optimizer=optimizer, first=3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = shard(make_model("bert"), "bert")
    resumed.load_state_dict(saved["model"])
    again = adamw(resumed)
    again.load_state_dict(saved["optimizer"])
    masks = train(resumed, "bert", rank, world, steps=STEPS, optimizer=again, first=3)
    tensors = {f"straight.{s}": m for s, m in enumerate(straight)}
    tensors.update({f"resumed.{s}": m for s, m in enumerate(masks)})
    tensors.update({f"weight.{name}": value for name, value in whole_weights(model).items()})
    tensors.update({f"resumed_weight.{name}": value for name, value in whole_weights(resumed).items()})
    try:
        get_optimizer_state_dict(model, optimizer)
        refusal = ""
    except distributed.UnsupportedDistributedSetup as exc:
        refusal = str(exc)
    tensors["dcp_refusal"] = torch.tensor(list(refusal.encode()), dtype=torch.uint8)
    _save(out / f"resume.rank{rank}.safetensors", tensors)


def scenario_load(arch: str, rank: int, world: int, out: Path) -> None:
    """The adapter trained under FSDP2, loaded on each rank and then sharded: logits, `disable_adapter`, merged
    weights; and loaded onto a model sharded already, where each rank applies its rows of the delta."""
    path = out / f"{arch}_adapter"
    tensors = {}
    model = PeftModel.from_pretrained(base_model(arch), str(path))
    from torch.distributed.fsdp import fully_shard

    for module in model.base_model.model.modules():
        if type(module).__name__ in ("BertLayer", "GPT2Block", "LlamaDecoderLayer"):
            fully_shard(module)
    fully_shard(model.base_model.model)  # the transformers model is the root: it stays sharded once unloaded
    tensors["logits"] = logits(model, arch)
    with model.disable_adapter():
        tensors["disabled_logits"] = logits(model, arch)
    tensors["logits_after_disable"] = logits(model, arch)
    merged = model.merge_and_unload()
    tensors["merged_logits"] = logits(merged, arch)
    tensors.update({f"merged.{name}": value for name, value in whole_weights(merged).items()})
    if TASKS[arch] == "CAUSAL_LM":  # no task head: PEFT can wrap a model sharded already
        sharded = shard(base_model(arch), arch)
        loaded = PeftModel.from_pretrained(sharded, str(path))
        tensors["onto_sharded_logits"] = logits(loaded, arch)
    _save(out / f"load_{arch}.rank{rank}.safetensors", tensors)


def _shard_of(source: Source, rank: int, world: int) -> Source:
    """Rank `rank`'s rows of `source`, as FSDP2 splits dim 0 (torch.chunk)."""
    rows = source.param.shape[0]
    size = -(-rows // world)
    part = slice(min(rows, rank * size), min(rows, (rank + 1) * size))
    means = [(v[part] if v is not None and d == 0 else v, d) for v, d in source.means]
    return Source(source.param[part], source.grad[part] if source.grad is not None else None, means), part


def scenario_frequency(rank: int, world: int, out: Path) -> None:
    """The merged draw alone, many times, over the model-like sources of tests/test_selection.py split by rows
    across the ranks: inclusion counts of the whole draw, for the single-process frequency test."""
    from .test_selection import _model_like_sources

    sources = _model_like_sources()
    shards = [_shard_of(s, rank, world) for s in sources]
    per_row = [max(1, s.param[0].numel()) if s.param.dim() else 1 for s in sources]
    sizes = [s.numel for s in sources]
    offsets = np.cumsum([0] + sizes[:-1])
    counts = torch.zeros(sum(sizes), dtype=torch.float64)
    sync = sharded_draw.ShardSync()
    generator = torch.Generator().manual_seed(1000 + rank)
    started = time.perf_counter()
    for _ in range(FREQUENCY_TRIALS):
        stream = StreamingDraw([s.param for s, _ in shards], FREQUENCY_K, "stochastic", generator, chunk_entries=4096)
        for tensor_id in reversed(range(len(shards))):
            local = shards[tensor_id][0]
            stream.add(tensor_id, local.grad, local.means)
        drawn, _, count = sharded_draw.merged_draw(stream, sync, None)
        assert count == FREQUENCY_K
        whole = [index + part.start * rows for index, (_, part), rows in zip(drawn, shards, per_row)]
        for tensor_id, index in enumerate(sharded_draw.gather_draw(whole)):
            counts[index + int(offsets[tensor_id])] += 1
    seconds = time.perf_counter() - started
    _save(out / f"frequency.rank{rank}.safetensors", {"counts": counts, "seconds": torch.tensor(seconds)})


def scenario_fill(rank: int, world: int, out: Path) -> None:
    """Fewer non-zero entries than k over the whole model: the rest filled uniformly from the zero entries of every
    rank (each rank holds one non-zero entry)."""
    values = torch.tensor([0.0, 5.0, 0.0, 0.0, 2.0, 0.0])
    local = values[rank * 3 : rank * 3 + 3]
    sync = sharded_draw.ShardSync()
    generator = torch.Generator().manual_seed(77 + rank)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(2000):
        stream = StreamingDraw([local.clone()], 4, "stochastic", generator)
        stream.add(0, torch.ones(3), [(None, 0)])
        drawn, _, count = sharded_draw.merged_draw(stream, sync, None)
        assert count == 4
        counts[sharded_draw.gather_draw([drawn[0] + 3 * rank])[0]] += 1
    _save(out / f"fill.rank{rank}.safetensors", {"counts": counts})


def force_fsdp2(accelerator, plugin=None) -> None:
    """accelerate enables FSDP only for processes on accelerators (GPUs, ...): on CPU processes it runs DDP instead.
    Put the state it would have under `--use_fsdp --fsdp_version 2` in place, so that `prepare`, `backward`,
    `get_state_dict` take their FSDP2 code paths here."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    state.fsdp_plugin = plugin or FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["BertLayer"],
        state_dict_type="FULL_STATE_DICT",
    )
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it under FSDP


def scenario_accelerate(rank: int, world: int, out: Path) -> None:
    """accelerate's FSDP plugin (fsdp_version=2): `prepare` shards the blocks, the embeddings and the root and
    moves the optimizer onto the shards."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    force_fsdp2(accelerator)
    model = make_model("bert")
    loader = torch.utils.data.DataLoader(dataset(), batch_size=GLOBAL_BATCH // world, collate_fn=ddp_worker.collate)
    wrapped, optimizer, loader = accelerator.prepare(model, adamw(model), loader)
    masks = []
    for rows in loader:
        accelerator.backward(wrapped(**rows).loss)
        optimizer.step()
        optimizer.zero_grad()
        masks.append(whole_draw(model))
    assert accelerator.is_fsdp2
    tensors = {f"mask.{step}": mask for step, mask in enumerate(masks)}
    state = accelerator.get_state_dict(wrapped)  # FSDP2: a full state dict on rank 0 (taken on every rank)
    tensors.update({f"state.{k}": v for k, v in state.items() if ".stoc_tuning.patch." in k})
    tensors["logits"] = logits(model, "bert")
    accelerator.unwrap_model(wrapped).save_pretrained(out / "accelerate_adapter", is_main_process=rank == 0)
    _save(out / f"accelerate.rank{rank}.safetensors", tensors)


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.rows = dataset()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_trainer(output_dir: Path, world: int, fsdp: bool):
    """transformers Trainer over the data set in order (with `fsdp_config={'version': 2}` when `fsdp`, through
    accelerate's FSDP2 path, see `force_fsdp2`); returns the trainer, the model and the whole draw of each step."""
    from transformers import Trainer, TrainerCallback

    class FSDP2Trainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if fsdp:
                from accelerate.utils import FullyShardedDataParallelPlugin

                force_fsdp2(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
                self.is_fsdp_enabled = True

    class RecordDraws(TrainerCallback):
        def __init__(self):
            self.masks = []

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.masks.append(whole_draw(model))

    model = make_model("bert")
    sharding = (
        {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "transformer_layer_cls_to_wrap": ["BertLayer"],
                "state_dict_type": "FULL_STATE_DICT",
            },
        }
        if fsdp
        else {}
    )
    args = ddp_worker.trainer_arguments(output_dir, world, steps=STEPS, **sharding)
    recorder = RecordDraws()
    trainer = FSDP2Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[recorder])
    trainer.train()
    return trainer, model, recorder.masks


def scenario_trainer(rank: int, world: int, out: Path) -> None:
    """Trainer with FSDP2; the adapter saved by `trainer.save_model()` (FULL_STATE_DICT: rank 0 writes alone)."""
    trainer, model, masks = run_trainer(out / "trainer_output", world, fsdp=True)
    assert trainer.accelerator.is_fsdp2
    tensors = {f"mask.{step}": mask for step, mask in enumerate(masks)}
    tensors["logits"] = logits(model, "bert")
    trainer.save_model(str(out / "trainer_adapter"))
    _save(out / f"trainer.rank{rank}.safetensors", tensors)


def scenario_disabled(rank: int, world: int, out: Path) -> None:
    """Under FSDP2: a DPO-style reference pass inside `disable_adapter()` between a forward and its backward trains
    as usual, and a backward run inside `disable_adapter()` is refused on every rank, with no gradient left."""
    model = shard(make_model("bert"), "bert")
    train(model, "bert", rank, world, steps=2)
    optimizer = adamw(model)
    loss = model(**local_batch("bert", 2, rank, world)).loss
    with torch.no_grad(), model.disable_adapter():
        model(**local_batch("bert", 2, rank, world))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = model(**local_batch("bert", 3, rank, world)).loss
    refused = 0
    with model.disable_adapter():
        try:
            loss.backward()
        except RuntimeError as error:
            refused = int("not what the graph was built on" in str(error))
    left = sum(int(c.param.grad is not None) for c in model.base_model.stoc_engine().candidates)
    _save(out / f"disabled.rank{rank}.safetensors", {"figures": torch.tensor([refused, left])})


SCENARIOS = {
    "train_bert": lambda r, w, o: scenario_train("bert", r, w, o),
    "train_gpt2": lambda r, w, o: scenario_train("gpt2", r, w, o, per_layer=False),
    "train_llama": lambda r, w, o: scenario_train("llama", r, w, o),
    "stochastic": scenario_stochastic,
    "budget": scenario_budget,
    "resume": scenario_resume,
    "load_bert": lambda r, w, o: scenario_load("bert", r, w, o),
    "load_gpt2": lambda r, w, o: scenario_load("gpt2", r, w, o),
    "load_llama": lambda r, w, o: scenario_load("llama", r, w, o),
    "frequency": scenario_frequency,
    "fill": scenario_fill,
    "accelerate": scenario_accelerate,
    "trainer": scenario_trainer,
    "disabled": scenario_disabled,
}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    names = argv[1:] or list(SCENARIOS)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for name in names:
        try:
            SCENARIOS[name](rank, world, out)
        except Exception as exc:  # every rank says what failed, the test shows it
            (out / f"{name}.rank{rank}.error.json").write_text(json.dumps({"error": repr(exc)}))
            raise
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
