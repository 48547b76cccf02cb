"""Identical draws on every rank of a data-parallel run, and a clear refusal of sharded engines.

Under `DistributedDataParallel` (torchrun, `accelerate launch`, transformers `Trainer`) every rank holds the whole
model but sees its own data. What a draw depends on then stands as follows:

* gradients: DDP all-reduces (averages) them before the optimizer step, so every rank holds the same values;
* parameters: DDP broadcasts rank 0's at construction and every rank applies the same confined step after that;
* the random numbers: every entry's is a hash of (`config.seed`, step, entry) (`entry_keys`), alike on every rank;
* μ: each rank's forward hooks only summed its own tokens. `RankSync` all-reduces those running sums (totals and
  token counts) before the draw, so every rank computes μ over the global batch, as a single process with the whole
  batch would.

With all inputs equal every rank draws the same entries. `RankSync.check_draw` confirms it after each draw with a
24-byte fingerprint, so a rank that drew differently (for instance without DDP, gradients differ) stops training
with an error on every rank instead of letting the weights drift apart.

Under FSDP2 (`fully_shard`) every rank holds a dim-0 shard of each parameter (`shards`) and the ranks merge their
draws into the exact global one (`sharded_draw`). FSDP1 and DeepSpeed update flattened copies of the parameters
that the step engine never sees: `check_supported` refuses them, naming FSDP2 as the sharded path.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .. import compat
from ..tuner.candidates import Candidate, UseKind
from .shards import dtensor_type, fsdp2_shards, is_shard, shard_problem

SUPPORTED = (
    "StocTuning trains under DistributedDataParallel (plain, transformers Trainer under torchrun, `accelerate launch "
    "--multi_gpu`), optionally with torch's ZeroRedundancyOptimizer, and under FSDP2 (`torch.distributed.fsdp."
    "fully_shard`, or accelerate's FSDP plugin with fsdp_version=2), whose dim-0 shards it draws from exactly."
)

# Fingerprint of a draw: a prime modulus below 2**31 and a multiplier, so every product fits in int64.
_PRIME = 2_147_483_647
_MULTIPLIER = 48_271


class UnsupportedDistributedSetup(RuntimeError):
    """Raised when the model is trained by an engine under which StocTuning cannot draw exactly."""


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in `group` (the default group if None); 1 when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def default_sync() -> RankSync | None:
    """The synchronisation a draw needs right now: a `RankSync` over the default group, or None in one process."""
    return RankSync() if world_size() > 1 else None


def no_sync(tracker) -> None:
    """For ranks that deliberately train separate models: each draws from its own statistics, unchecked
    (`engine.reduce_statistics = no_sync`)."""


def bytes_per_draw(candidates: list[Candidate]) -> int:
    """Bytes each rank contributes to the all-reduces of one synchronised draw (see `RankSync`)."""
    sizes: dict[int, int] = {}
    for candidate in candidates:
        for use in candidate.uses:
            if use.kind is not UseKind.CONSTANT:
                sizes.setdefault(id(use.module), candidate.param.shape[use.dim])
    modules, features = len(sizes), sum(sizes.values())
    return 16 * modules + 4 * (features + modules) + 2 * 3 * 8


class RankSync:
    """All-reduces μ's running sums before a draw and checks after it that every rank drew the same entries.

    Per draw it moves, in three all-reduces over `group`: a header of 16 bytes per tracked module (the length of
    each running sum, so a rank that did not run a module still contributes zeros of the right size), the sums
    themselves (4 bytes per input feature or vocabulary row of every tracked module, plus 4 per module for the
    token count), and the 24-byte fingerprint of the draw (twice, to get the maximum and minimum over ranks).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.bytes_per_draw = 0  # payload of the latest draw's all-reduces, per rank

    def __call__(self, tracker) -> None:
        sums = tracker.state()
        if not sums:
            return
        device = _device(tracker.candidates)
        local = [-1 if s.total is None else s.total.numel() for s in sums]
        missing = torch.iinfo(torch.int64).max
        header = torch.tensor(local + [-(missing if n < 0 else n) for n in local], dtype=torch.int64, device=device)
        dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group)
        largest, smallest = header[: len(sums)].tolist(), [-v for v in header[len(sums) :].tolist()]
        for n_max, n_min in zip(largest, smallest):
            if n_max >= 0 and n_min != n_max:
                raise RuntimeError(
                    "StocTuning: ranks tracked activation statistics of different sizes; every rank must train the "
                    "same model under the same StocTuningConfig."
                )
        sizes = [max(n, 0) for n in largest]
        payload = torch.zeros(sum(sizes) + len(sums), dtype=torch.float32, device=device)
        offset = 0
        for s, size in zip(sums, sizes):
            if s.total is not None:
                payload[offset : offset + size] = s.total.reshape(-1).to(device=device, dtype=torch.float32)
            offset += size
        payload[offset:] = torch.tensor([s.tokens for s in sums], dtype=torch.float32, device=device)
        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group)
        tokens = payload[offset:].tolist()
        offset = 0
        for s, size, present, count in zip(sums, sizes, largest, tokens):
            if present >= 0:
                target = s.total.device if s.total is not None else device
                s.total = payload[offset : offset + size].to(target)
            s.tokens = count
            offset += size
        self.bytes_per_draw = header.numel() * 8 + payload.numel() * 4 + 2 * 3 * 8

    def check_draw(self, drawn: list[torch.Tensor]) -> None:
        """Raise on every rank if any two ranks drew different entries."""
        device = drawn[0].device if drawn else torch.device("cpu")
        fingerprint = draw_fingerprint(drawn, device)
        both = torch.cat([fingerprint, -fingerprint])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:3], -both[3:]):
            raise RuntimeError(
                "StocTuning: ranks drew different entries at this step, so their weights would drift apart. Every "
                "rank needs the same gradients (wrap the model in DistributedDataParallel, which `accelerate launch` "
                "and Trainer under torchrun do), the same weights and the same StocTuningConfig.seed."
            )


def draw_fingerprint(drawn: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[count, sum of indices, hash] of the drawn entries (per-tensor sorted flat indices), int64 on `device`."""
    if not drawn:
        return torch.zeros(3, dtype=torch.int64, device=device)
    counts = torch.tensor([d.numel() for d in drawn], device=device)
    index = torch.cat([d.to(device=device, dtype=torch.int64) for d in drawn])
    tensor = torch.repeat_interleave(torch.arange(len(drawn), device=device), counts)
    mixed = ((index % _PRIME) * _MULTIPLIER + tensor * 7919) % _PRIME
    return torch.stack([counts.sum(), index.sum(), mixed.sum()])


def _device(candidates: list[Candidate]) -> torch.device:
    device = candidates[0].param.device if candidates else torch.device("cpu")
    if device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# -- sharded engines -------------------------------------------------------------------------------------------------
def check_supported(root: nn.Module, candidates: list[Candidate]) -> str | None:
    """Raise `UnsupportedDistributedSetup` if `root` is trained by an engine that shards or copies its parameters in
    a way StocTuning cannot follow; "fsdp2" when the candidates are FSDP2's dim-0 shards, else None."""
    engine = _sharding_engine(root, candidates)
    if engine is not None:
        raise UnsupportedDistributedSetup(
            f"StocTuning cannot train this model: {engine}. {SUPPORTED} FSDP1 (`FullyShardedDataParallel`) and "
            "DeepSpeed (ZeRO of any stage) are not supported: shard with FSDP2 instead (`fully_shard`, accelerate's "
            "FSDP plugin with fsdp_version=2, Trainer's `fsdp_config={'version': 2}`), or train with DDP."
        )
    quantized = [c.name for c in candidates if c.overlay is not None]
    if quantized and world_size() > 1:
        raise UnsupportedDistributedSetup(
            f"StocTuning trains quantized weights (e.g. '{quantized[0]}') in one process: their gradients are drawn "
            "from as the backward computes them and never exist as parameters' gradients that DDP or FSDP could "
            "reduce. Train on one GPU, or load the base without quantization for several."
        )
    return "fsdp2" if any(is_shard(c.param) for c in candidates) else None


def _sharding_engine(root: nn.Module, candidates: list[Candidate]) -> str | None:
    """A description of the sharding engine in use, or None when the parameters are whole and in place."""
    found = _configured_engine()
    if found is not None:
        return found
    for module in root.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel":
            return f"module {name} is sharded by FSDP1"
    dtensor = dtensor_type()
    managed = None
    for candidate in candidates:
        for use in candidate.uses:
            owned = list(compat.module_parameters(use.module).values())
            for param in (candidate.param, *owned):
                if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
                    return f"parameter '{candidate.name}' is partitioned by DeepSpeed ZeRO-3"
                if compat.fsdp1_flattened(param):
                    return f"parameter '{candidate.name}' is flattened by FullyShardedDataParallel (FSDP1)"
            if dtensor is not None and isinstance(candidate.param, dtensor):
                managed = fsdp2_shards() if managed is None else managed
                problem = shard_problem(candidate.param, managed)
                if problem is not None:
                    return f"parameter '{candidate.name}' {problem}"
                continue  # FSDP2 registers its unsharded copy on the module while it computes
            if any(dtensor is not None and isinstance(param, dtensor) for param in owned):
                return (
                    f"parameter '{candidate.name}' is a DTensor that StocTuning did not find among FSDP2's "
                    "shards (tensor parallelism?)"
                )
            if candidate.overlay is None and not any(param is candidate.param for param in owned):
                return (
                    f"parameter '{candidate.name}' is no longer the one StocTuning was set up with (FSDP, FSDP2 or "
                    "another wrapper replaced it after `get_peft_model`)"
                )
    return None


def _configured_engine() -> str | None:
    """The sharding engine accelerate (or Trainer, through it) or DeepSpeed itself was set up with, if any."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None:
        try:
            initialised = bool(deepspeed_comm.is_initialized())
        except Exception:  # an older or partial DeepSpeed: no answer, no refusal
            initialised = False
        if initialised:
            return "DeepSpeed is initialised (its ZeRO optimizers update flattened copies of the parameters)"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return "accelerate is configured for DeepSpeed (ACCELERATE_USE_DEEPSPEED)"
    accelerator = compat.accelerate_shared_state("AcceleratorState")
    if accelerator is None:  # accelerate is not imported
        return None
    # accelerate copies the distributed type to PartialState; the FSDP plugin (and its version) stays with
    # AcceleratorState.
    plugin = accelerator.get("fsdp_plugin")
    version = getattr(plugin, "fsdp_version", 1)
    for shared in (accelerator, compat.accelerate_shared_state("PartialState")):
        kind = shared.get("distributed_type")
        name = getattr(kind, "value", kind)
        if name == "FSDP" and version != 2:
            return f"accelerate runs the model with FSDP version {version}"
        if name in ("DEEPSPEED", "MEGATRON_LM"):
            return f"accelerate runs the model with {name}"
    return None
