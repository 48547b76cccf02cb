"""The exact global draw over FSDP2's shards, and the sparse deltas gathered from them.

Each rank draws over its own entries (a pool of its best k keys) and `ShardSync.top` finds, with a few small
all-reduces, the global top-k of the keys of all ranks: every rank keeps the entries of that top-k it holds, which
is exactly the draw one process makes over the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..sampling.key_pool import KeyPool, split_by_tensor
from .ranks import world_size


def gather_draw(drawn: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """The whole draw, on every rank, from each rank's part (per-tensor sorted flat indices in whole-tensor
    coordinates). Not needed for training (each rank updates the entries it holds): for inspection and tests."""
    device = comm_device()
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
    """int64 values in the order of the float `keys` (the sign-magnitude bit patterns made two's complement), for
    float32 keys or float64 ones."""
    if keys.dtype == torch.float64:
        bits = keys.contiguous().view(torch.int64)
        magnitude = bits & 0x7FFFFFFFFFFFFFFF
    else:
        bits = keys.float().contiguous().view(torch.int32).to(torch.int64)
        magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, magnitude, -magnitude - 1)


class ShardSync:
    """Collectives of a draw over FSDP2 shards, and what they cost.

    `top(keys, k)` answers, on each rank, which of its `keys` belong to the k largest of all ranks' keys — the global
    top-k of the union, which is what a single process computes over the whole model (for ``stochastic``: a per-rank
    top-k of the keys log I - ½ log E followed by a top-k of the survivors is successive sampling over all entries).
    No key is sent: the ranks agree on the k-th largest key by narrowing its range with all-reduces of how many keys
    lie above 63 probe values (about 6 rounds of 504 bytes, on the keys rounded to float32), then count the keys tied
    with it. Float64 keys that round to the same float32 as the k-th are told apart by narrowing again on their float64
    values (rare: a few rounds more); keys equal in float64 are split in rank order with one all-gather of tie counts.
    Memory and traffic stay independent of k and of the number of ranks.
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

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def total(self, count: int) -> int:
        return int(self.all_reduce(torch.tensor([count], dtype=torch.int64, device=comm_device())))

    def top(self, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
        """(mask over `keys`: the local members of the global top-k, number of keys > -inf over all ranks)."""
        device = comm_device()
        valid = keys > -math.inf
        total = self.total(int(valid.sum()))
        if total <= k:
            return valid, total
        chosen = self._top(_ordered(keys.float()).to(device), valid.to(device), k, keys)
        return chosen.to(keys.device), total

    def _top(self, order: torch.Tensor, valid: torch.Tensor, k: int, keys: torch.Tensor | None) -> torch.Tensor:
        """Mask of the local members of the global top-k of `order` among the `valid` entries (at least k of them
        over all ranks); `keys`: float64 values to split ties of `order` by, if any."""
        low = self._kth(order, valid, k)
        above = (order > low) & valid
        tied = (order == low) & valid
        needed = k - self.total(int(above.sum()))
        ties = self.all_gather(torch.tensor([int(tied.sum())], dtype=torch.int64, device=order.device)).view(-1)
        if keys is not None and keys.dtype == torch.float64 and int(ties.sum()) > needed:
            return above | self._top(_ordered(keys).to(order.device), tied, needed, None)
        rank = self.rank()
        take = max(0, min(int(ties[rank]), needed - int(ties[:rank].sum())))
        return above | (tied & (tied.cumsum(0) <= take))

    def _kth(self, order: torch.Tensor, valid: torch.Tensor, k: int) -> int:
        """The k-th largest value of `order` among the `valid` entries of all ranks."""
        device = order.device
        present = order.masked_select(valid).sort().values
        none = torch.iinfo(torch.int64).min
        ends = torch.tensor(
            [present[-1] if present.numel() else none, -present[0] if present.numel() else none],
            dtype=torch.int64,
            device=device,
        )
        self.all_reduce(ends, dist.ReduceOp.MAX)
        low, high = -int(ends[1]), int(ends[0])  # count(>= low) >= k > count(>= high + 1)
        while low < high:
            span = high - low
            steps = sorted({min(high, low + -(-i * span // self.PROBES)) for i in range(1, self.PROBES + 1)})
            probes = torch.tensor(steps, dtype=torch.int64, device=device)
            counts = present.numel() - torch.searchsorted(present, probes)
            counts = self.all_reduce(counts.to(torch.int64))
            reach = int((counts >= k).sum())
            if reach:
                low = int(probes[reach - 1])
            if reach < probes.numel():
                high = int(probes[reach]) - 1
        return low


def comm_device() -> torch.device:
    """Where tensors for a collective go: this process's GPU under NCCL, else the CPU (gloo)."""
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


_INDEX_BITS = 40  # flat indices below 2**40 entries per tensor; tensor numbers above them


def gather_entries(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    names: list[str],
    group,
    dtypes: dict[str, torch.dtype] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor name, the sorted flat indices and values that all ranks hold in `parts` (each rank its own
    entries, in whole-tensor coordinates), on every rank. Values travel as float64, exact for float32, bfloat16 and
    float16; they come back in `dtypes[name]`, or as float32 unless some rank holds float64 values for the name.
    What is moved is the entries themselves: the size of a sparse delta, never of the tensors."""
    number = {name: i for i, name in enumerate(names)}
    device = comm_device()
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
