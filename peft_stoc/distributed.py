"""Identical draws on every rank of a data-parallel run, and a clear refusal of sharded engines.

Under `DistributedDataParallel` (torchrun, `accelerate launch`, transformers `Trainer`) every rank holds the whole
model but sees its own data. What a draw depends on then stands as follows:

* gradients: DDP all-reduces (averages) them before the optimizer step, so every rank holds the same values;
* parameters: DDP broadcasts rank 0's at construction and every rank applies the same confined step after that;
* the generator: seeded from `config.seed`, advanced once per draw on every rank;
* μ: each rank's forward hooks only summed its own tokens. `RankSync` all-reduces those running sums (totals and
  token counts) before the draw, so every rank computes μ over the global batch, as a single process with the whole
  batch would.

With all inputs equal every rank draws the same entries. `RankSync.check_draw` confirms it after each draw with a
24-byte fingerprint, so a rank that drew differently (for instance without DDP, gradients differ) stops training
with an error on every rank instead of letting the weights drift apart.

Under FSDP2 (`fully_shard`) every rank holds a dim-0 shard of each parameter and of its reduced gradient. Each rank
draws over its own entries (a pool of its best k keys) and `ShardSync.top` finds, with a few small all-reduces,
the global top-k of the keys of all ranks: every rank keeps the entries of that top-k it holds, which is exactly the
draw one process makes over the whole model (see `ShardSync`). FSDP1 and DeepSpeed update flattened copies of the
parameters that the step engine never sees: `check_supported` refuses them, naming FSDP2 as the sharded path.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .candidates import Candidate, UseKind
from .key_pool import KeyPool, split_by_tensor

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
        largest, smallest = header[: len(sums)].tolist(), [-v for v in header[len(sums):].tolist()]
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
    dtensor = _dtensor_type()
    managed = None
    for candidate in candidates:
        for use in candidate.uses:
            owned = list(use.module._parameters.values())
            for param in (candidate.param, *owned):
                if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
                    return f"parameter '{candidate.name}' is partitioned by DeepSpeed ZeRO-3"
                if getattr(param, "_fsdp_flattened", False):
                    return f"parameter '{candidate.name}' is flattened by FullyShardedDataParallel (FSDP1)"
            if dtensor is not None and isinstance(candidate.param, dtensor):
                managed = fsdp2_shards() if managed is None else managed
                problem = _shard_problem(candidate.param, managed)
                if problem is not None:
                    return f"parameter '{candidate.name}' {problem}"
                continue  # FSDP2 registers its unsharded copy on the module while it computes
            if any(dtensor is not None and isinstance(param, dtensor) for param in owned):
                return (f"parameter '{candidate.name}' is a DTensor that StocTuning did not find among FSDP2's "
                        "shards (tensor parallelism?)")
            if not any(param is candidate.param for param in owned):
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
    state = sys.modules.get("accelerate.state")
    if state is None:
        return None
    # accelerate copies the distributed type to PartialState; the FSDP plugin (and its version) stays with
    # AcceleratorState.
    plugin = getattr(getattr(state, "AcceleratorState", None), "_shared_state", {}).get("fsdp_plugin")
    version = getattr(plugin, "fsdp_version", 1)
    for holder in (getattr(state, "AcceleratorState", None), getattr(state, "PartialState", None)):
        kind = getattr(holder, "_shared_state", {}).get("distributed_type")
        name = getattr(kind, "value", kind)
        if name == "FSDP" and version != 2:
            return f"accelerate runs the model with FSDP version {version}"
        if name in ("DEEPSPEED", "MEGATRON_LM"):
            return f"accelerate runs the model with {name}"
    return None


@functools.cache
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


# -- FSDP2: dim-0 shards -----------------------------------------------------------------------------------------------
def is_shard(param) -> bool:
    """Whether `param` is a DTensor: under FSDP2, this rank's dim-0 shard of a parameter."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(param, dtensor)


def _fsdp2_states() -> list:
    """FSDP2's state of every module sharded by `fully_shard` in this process, with the module."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # torch built without distributed support
        return []
    found = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref() if callable(ref) else ref
        if getattr(state, "_fsdp_param_group", None) is not None:
            found.append((module, state))
    return found


def fsdp2_shards() -> dict[tuple[int, str], nn.Parameter]:
    """(id of a module, parameter name) -> FSDP2's sharded parameter, for every parameter FSDP2 manages. FSDP2 swaps
    the module's registered parameter for an unsharded copy while the module computes; this map finds the shard at
    any time."""
    found = {}
    for _, state in _fsdp2_states():
        for fsdp_param in state._fsdp_param_group.fsdp_params:
            info = fsdp_param._module_info
            found[(id(info.module), info.param_name)] = fsdp_param.sharded_param
            for module, name in zip(info.shared_modules, info.shared_param_names):
                found[(id(module), name)] = fsdp_param.sharded_param
    return found


def _shard_problem(param, managed: dict) -> str | None:
    """Why the DTensor `param` is not a dim-0 shard StocTuning can train (None when it is)."""
    if not any(shard is param for shard in managed.values()):
        return "is a DTensor that FSDP2 does not manage (tensor parallelism?)"
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or len(param.placements) != 1 or param.placements[0] != Shard(0):
        return (f"is sharded as {tuple(param.placements)} over a {param.device_mesh.ndim}-D mesh; StocTuning follows "
                "FSDP2's dim-0 shards over a 1-D mesh (not HSDP or tensor parallelism)")
    return None


def sharded_replacements(candidates: list[Candidate]) -> dict[int, nn.Parameter]:
    """id of a candidate's parameter -> the dim-0 shard FSDP2 replaced it with (only candidates FSDP2 replaced)."""
    if not dist.is_available():
        return {}
    managed = fsdp2_shards()
    found = {}
    for candidate in candidates:
        attribute = candidate.name.rpartition(".")[2]
        for use in candidate.uses:
            shard = managed.get((id(use.module), attribute))
            if shard is None:
                registered = use.module._parameters.get(attribute)
                shard = registered if is_shard(registered) else None
            if shard is not None and shard is not candidate.param:
                found[id(candidate.param)] = shard
                break
    return found


def reshard(params) -> None:
    """Drop the unsharded copies FSDP2 keeps of the modules holding `params` (the root keeps its copy between
    forwards): after StocTuning wrote into the shards outside an optimizer step, the next forward gathers them anew."""
    wanted = {id(p) for p in params}
    for module, state in _fsdp2_states():
        if any(id(fsdp_param.sharded_param) in wanted for fsdp_param in state._fsdp_param_group.fsdp_params):
            module.reshard()


def local_entries(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The entries of `param` this process holds, flat, and the flat index in the whole tensor of the first one. A
    plain tensor is held whole; an FSDP2 shard (a DTensor) holds a range of rows."""
    if not is_shard(param):
        return param.detach().view(-1), 0
    local = param.detach().to_local()
    return local.view(-1), shard_rows(param).start * _per_row(param.shape)


def _per_row(shape) -> int:
    return int(torch.Size(shape[1:]).numel()) if len(shape) else 1


def shard_rows(param) -> slice:
    """The rows of the whole tensor this process holds of the FSDP2 shard `param`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if not len(shape):
        return slice(0, 1)
    return slice(offset[0], offset[0] + shape[0])


def gather_draw(drawn: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """The whole draw, on every rank, from each rank's part (per-tensor sorted flat indices in whole-tensor
    coordinates). Not needed for training (each rank updates the entries it holds): for inspection and tests."""
    device = _comm_device()
    sizes = torch.tensor([d.numel() for d in drawn], dtype=torch.int64, device=device)
    flat = torch.cat([d.to(device=device, dtype=torch.int64) for d in drawn]) if drawn else sizes.new_empty(0)
    world = world_size(group)
    counts = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(counts, sizes, group=group)
    longest = max(int(c.sum()) for c in counts)
    padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    out = [[] for _ in drawn]
    for count, part in zip(counts, parts):
        for i, piece in enumerate(part[: int(count.sum())].split(count.tolist())):
            out[i].append(piece)
    return [torch.cat(pieces).sort().values.to(d.device) for pieces, d in zip(out, drawn)]


def _ordered(keys: torch.Tensor) -> torch.Tensor:
    """int64 values in the order of the float32 `keys` (the sign-magnitude bit patterns made two's complement)."""
    bits = keys.float().contiguous().view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, magnitude, -magnitude - 1)


class ShardSync:
    """Collectives of a draw over FSDP2 shards, and what they cost.

    `top(keys, k)` answers, on each rank, which of its `keys` belong to the k largest of all ranks' keys — the global
    top-k of the union, which is what a single process computes over the whole model (for ``stochastic``: a per-rank
    top-k of the keys log I - ½ log E followed by a top-k of the survivors is successive sampling over all entries).
    No key is sent: the ranks agree on the k-th largest key by narrowing its range with all-reduces of how many keys
    lie above 63 probe values (about 6 rounds of 504 bytes for float32 keys), then split ties at it in rank order
    with one all-gather of tie counts. Memory and traffic stay independent of k and of the number of ranks.
    """

    PROBES = 63

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.bytes = 0  # payload sent by this rank in the collectives since `reset`
        self.rounds = 0  # collectives since `reset`

    def reset(self) -> None:
        self.bytes = self.rounds = 0

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        self.bytes += tensor.numel() * tensor.element_size()
        self.rounds += 1
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size(self.group))]
        dist.all_gather(parts, tensor, group=self.group)
        self.bytes += tensor.numel() * tensor.element_size()
        self.rounds += 1
        return torch.stack(parts)

    def total(self, count: int) -> int:
        return int(self.all_reduce(torch.tensor([count], dtype=torch.int64, device=_comm_device())))

    def top(self, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
        """(mask over `keys`: the local members of the global top-k, number of keys > -inf over all ranks)."""
        device = _comm_device()
        valid = keys > -math.inf
        total = self.total(int(valid.sum()))
        if total <= k:
            return valid, total
        order = _ordered(keys).to(device)
        present = order.masked_select(valid.to(device)).sort().values
        sentinel = -(1 << 62)
        ends = torch.tensor([present[-1] if present.numel() else sentinel,
                             -present[0] if present.numel() else sentinel], dtype=torch.int64, device=device)
        self.all_reduce(ends, dist.ReduceOp.MAX)
        low, high = -int(ends[1]), int(ends[0])  # count(>= low) >= k > count(>= high + 1)
        while low < high:
            span = high - low
            steps = torch.arange(1, self.PROBES + 1, dtype=torch.float64, device=device) * (span / self.PROBES)
            probes = torch.unique((steps.ceil().to(torch.int64) + low).clamp_(max=high))
            counts = present.numel() - torch.searchsorted(present, probes)
            counts = self.all_reduce(counts.to(torch.int64))
            reach = int((counts >= k).sum())
            if reach:
                low = int(probes[reach - 1])
            if reach < probes.numel():
                high = int(probes[reach]) - 1
        above = (order > low) & valid.to(device)
        tied = (order == low) & valid.to(device)
        needed = k - self.total(int(above.sum()))
        ties = self.all_gather(torch.tensor([int(tied.sum())], dtype=torch.int64, device=device)).view(-1)
        rank = dist.get_rank(self.group)
        take = max(0, min(int(ties[rank]), needed - int(ties[:rank].sum())))
        chosen = above | (tied & (tied.cumsum(0) <= take))
        return chosen.to(keys.device), total


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merged_draw(stream, sync: ShardSync, changed: list[torch.Tensor | None] | None):
    """Finish the `StreamingDraw` `stream` of this rank's shards as part of the draw over all ranks' entries.

    The rank's pools hold the best keys among its entries; `sync.top` keeps those in the global top-k, the same
    entries (``top``) or the same distribution (``stochastic``, ``random`` under a budget) as one process drawing over
    the whole model, following `StreamingDraw.finish` step by step: under a budget, the already-changed entries and
    the best `max_new` new ones compete; when fewer than k entries of the whole model have non-zero importance, the
    rest is filled uniformly from the zero-importance entries. Returns, per tensor, the sorted local flat indices
    drawn on this rank and the gradient values there (None for tensors without a gradient), and the number of
    entries drawn over all ranks."""
    pools, fill = stream.pools()
    k = stream.k
    if stream.max_new is None:
        chosen, count = _select(sync, [pools[0]], k)
    else:
        new, _ = _select(sync, [pools[1]], pools[1].size)
        chosen, count = _select(sync, [pools[0], new], k)
    count = min(count, k)
    parts = [chosen]
    if count < k and fill is not None:
        missing = k - count
        room = missing
        if stream.max_new is not None:
            drawn_new = sync.total(_count_new(chosen, changed))
            room = min(missing, max(0, stream.max_new - drawn_new))
        limited, _ = _select(sync, [fill[1]], room)
        extra, extra_count = _select(sync, [fill[0], limited], missing)
        parts.append(extra)
        count += min(extra_count, missing)
    tensor = torch.cat([p.tensor for p in parts])
    index = torch.cat([p.index for p in parts])
    values = torch.cat([p.values for p in parts])
    index, values = split_by_tensor(tensor, index, stream.sources, values)
    values = [v if i in stream.received else None for i, v in enumerate(values)]
    return index, values, count


def _select(sync: ShardSync, pools: list, k: int):
    """A pool of this rank's entries among the global top-k of the keys in `pools` (all ranks), and how many keys
    > -inf all ranks offered."""
    device = pools[0].keys.device
    for pool in pools:
        pool.flush()
    keys = torch.cat([p.keys for p in pools])
    out = KeyPool(max(k, 0), device, carry=True)
    if k <= 0:
        return out, 0
    mask, total = sync.top(keys, k)
    out.keys = keys[mask]
    out.tensor = torch.cat([p.tensor for p in pools])[mask]
    out.index = torch.cat([p.index for p in pools])[mask]
    out.values = torch.cat([p.values for p in pools])[mask]
    return out, total


def _count_new(pool, changed: list[torch.Tensor | None] | None) -> int:
    """Entries of `pool` outside the already-changed sets (local flat indices per tensor)."""
    if changed is None:
        return pool.index.numel()
    new = 0
    for tensor_id in pool.tensor.unique().tolist():
        index = pool.index[pool.tensor == tensor_id]
        known = changed[tensor_id]
        new += index.numel() if known is None else int((~torch.isin(index, known.to(index.device))).sum())
    return new


def shard_group(params) -> dist.ProcessGroup | None | bool:
    """The process group of the FSDP2 shards among `params`; False when none is a shard."""
    for param in params:
        if is_shard(param):
            return param.device_mesh.get_group()
    return False


_INDEX_BITS = 40  # flat indices below 2**40 entries per tensor; tensor numbers above them


def gather_entries(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str], group,
                   dtypes: dict[str, torch.dtype] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor name, the sorted flat indices and values that all ranks hold in `parts` (each rank its own
    entries, in whole-tensor coordinates), on every rank. Values travel as float64, exact for float32, bfloat16 and
    float16; they come back in `dtypes[name]`, or as float32 unless some rank holds float64 values for the name.
    What is moved is the entries themselves: the size of a sparse delta, never of the tensors."""
    number = {name: i for i, name in enumerate(names)}
    device = _comm_device()
    positions, values = [], []
    wide = torch.zeros(len(names), dtype=torch.int64, device=device)
    for name, (index, vals) in parts.items():
        code = number[name] << _INDEX_BITS
        positions.append(index.to(device=device, dtype=torch.int64) + code)
        values.append(vals.to(device=device, dtype=torch.float64))
        wide[number[name]] = int(vals.dtype == torch.float64)
    position = torch.cat(positions) if positions else torch.empty(0, dtype=torch.int64, device=device)
    value = torch.cat(values) if values else torch.empty(0, dtype=torch.float64, device=device)
    if dtypes is None:
        dist.all_reduce(wide, op=dist.ReduceOp.MAX, group=group)
    world = world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([position.numel()], dtype=torch.int64, device=device), group=group)
    longest = max(int(size) for size in sizes)
    padded_position = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded_position[: position.numel()] = position
    padded_value = torch.zeros(longest, dtype=torch.float64, device=device)
    padded_value[: value.numel()] = value
    all_positions = [torch.empty_like(padded_position) for _ in range(world)]
    all_values = [torch.empty_like(padded_value) for _ in range(world)]
    dist.all_gather(all_positions, padded_position, group=group)
    dist.all_gather(all_values, padded_value, group=group)
    position = torch.cat([p[: int(n)] for p, n in zip(all_positions, sizes)])
    value = torch.cat([v[: int(n)] for v, n in zip(all_values, sizes)])
    position, order = position.sort()
    value = value.index_select(0, order)
    tensor = position >> _INDEX_BITS
    out = {}
    for i in tensor.unique().tolist():
        inside = tensor == i
        name = names[i]
        dtype = dtypes[name] if dtypes is not None else (torch.float64 if int(wide[i]) else torch.float32)
        index = position.masked_select(inside) - (i << _INDEX_BITS)
        out[name] = (index.cpu(), value.masked_select(inside).to(dtype).cpu())
    return out
