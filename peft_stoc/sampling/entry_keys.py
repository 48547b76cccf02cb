"""Random numbers that depend only on (seed, step, entry): the Exp(1) variable of every entry of the model.

A draw is the top-k of one key per entry (`selection`). For the draw to be the same whatever visits the entries —
the dense draw over all gradients at once, the streaming draw fed one gradient at a time (memory-lean training),
each FSDP2 rank over its own rows, any chunking — an entry's random number must be a function of the entry alone,
not of how many numbers were drawn before it. `EntryKeys` gives every entry (tensor id, global flat index) a
variable E ~ Exp(1), independent across entries, from a counter-based hash (splitmix64 in int64 tensor operations) of
(seed, tensor id, position); the seed is drawn once per step from the step's generator (`step_seed`).

Computing E for every entry would cost a hash per entry; the samplers only need the entries whose E lies below a
bound (`thinning`). So the variables are laid out as a tree: a node of level l covers 8**l consecutive entries
(tensors are padded to whole nodes by virtual entries, which are never drawn), and holds the minimum M of their E.
The minimum of n independent Exp(1) is Exp(1)/n, its position is uniform, and, given both, the other n - 1 values
are M + Exp(1) independently (memorylessness). Hence: a root's minimum is Exp(1)/8**L; a child's minimum is its
parent's if the parent's minimum lies in it (a uniform child), else the parent's plus Exp(1)/8**l; an entry's E is
its level-1 node's minimum or that plus Exp(1). Each of these Exp(1) and uniform choices is the hash of its node.
Every entry's E is then exactly Exp(1), independent of all others, yet a sampler can evaluate a node's minimum
first and skip its 8**l entries when even the minimum cannot win.

A walk from the roots costs a few dozen tensor operations per level, as many for a chunk of a thousand blocks as for
one of a million: a draw over hundreds of tensors first evaluates the upper levels of all of them at once
(`cache_upper`), and each chunk then descends from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

LEVELS = 7  # a root covers 8**7 entries
BLOCK = 64  # entries of a node of level 2: the block a sampler tests first
UPPER_LEVEL = 3  # the lowest level `cache_upper` keeps (8**3 entries per node) ...
UPPER_NODES = 1 << 20  # ... unless that would be more nodes than this (16 MiB): then a higher level
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_NODE_STEP = _signed(8 * 0x9E3779B97F4A7C15)  # a node number's step in the hashed counter


def _mix_int(value: int) -> int:
    """splitmix64's finaliser on a Python int (unsigned 64-bit result)."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping products, logical shifts), in place on `z`."""
    z.bitwise_xor_(z.bitwise_right_shift(30).bitwise_and_((1 << 34) - 1)).mul_(_MIX1)
    z.bitwise_xor_(z.bitwise_right_shift(27).bitwise_and_((1 << 37) - 1)).mul_(_MIX2)
    return z.bitwise_xor_(z.bitwise_right_shift(31).bitwise_and_((1 << 33) - 1))


def _exp_of(z: torch.Tensor) -> torch.Tensor:
    """Exp(1) from the top 53 bits of hashes: -log(1 - V), V uniform in (0, 1), float64 (exact near 0)."""
    uniform = z.bitwise_right_shift(11).bitwise_and_((1 << 53) - 1).double().add_(0.5).mul_(2.0**-53)
    return uniform.neg_().log1p_().neg_()


class EntryKeys:
    """The Exp(1) variable of every entry for one seed. `offsets[t]`: the global flat index of the first entry that
    the local tensor with id t holds (an FSDP2 shard's first row times the row size; default 0)."""

    def __init__(self, seed: int, offsets: Sequence[int] | None = None):
        self.seed = seed & _MASK64
        self.offsets = None if offsets is None else [int(o) for o in offsets]
        self._streams: dict[torch.device, torch.Tensor] = {}
        self._upper: _UpperLevel | None = None

    @classmethod
    def of(cls, source: EntryKeys | torch.Generator, offsets: Sequence[int] | None = None) -> EntryKeys:
        """Keys from a generator (one seed drawn from it, so a generator seeded per step gives keys per step, and a
        generator used again gives new keys), or `source` itself."""
        if isinstance(source, EntryKeys):
            return source if offsets is None else cls(source.seed, offsets)
        seed = int(torch.randint(0, 1 << 62, (1,), generator=source, device=source.device))
        return cls(seed, offsets)

    def offset(self, tensor_id: int) -> int:
        return 0 if self.offsets is None else self.offsets[tensor_id]

    def global_index(self, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Local flat indices of tensors (ids) → global flat indices."""
        if self.offsets is None or not any(self.offsets):
            return index
        table = torch.tensor(self.offsets, dtype=torch.int64, device=index.device)
        return index + table.index_select(0, tensor)

    # -- hashes ----------------------------------------------------------------------------------------------------
    def _stream_key(self, tensor_id: int) -> int:
        """The 64-bit stream key of a tensor id (signed)."""
        return _signed(_mix_int(self.seed ^ _mix_int(tensor_id * 0x2545F4914F6CDD1D + 1)))

    def _stream(self, tensor: torch.Tensor | int) -> torch.Tensor | int:
        """The stream keys of tensor ids: one int when every id is the same (the common chunk of one tensor, which
        then costs no gather), else one per element."""
        if isinstance(tensor, int):
            return self._stream_key(tensor)
        if tensor.numel() == 0:
            return 0
        low, high = (int(v) for v in torch.aminmax(tensor))
        if low == high:
            return self._stream_key(low)
        cached = self._streams.get(tensor.device)
        if cached is None or cached.numel() <= high:
            size = max(high + 1, len(self.offsets or ()))
            keys = [self._stream_key(t) for t in range(size)]
            cached = self._streams[tensor.device] = torch.tensor(keys, dtype=torch.int64, device=tensor.device)
        return cached.index_select(0, tensor.reshape(-1)).view(tensor.shape)

    def _hash(self, stream: torch.Tensor | int, node: torch.Tensor, level: int) -> torch.Tensor:
        """splitmix64 of (stream + (node * 8 + level) · golden), wrapping: node · 8·golden plus the rest."""
        z = node.mul(_NODE_STEP)
        if isinstance(stream, int):
            return _mix(z.add_(_signed(stream + level * _GOLDEN)))
        return _mix(z.add_(stream).add_(_signed(level * _GOLDEN)))

    # -- the tree --------------------------------------------------------------------------------------------------
    def children(
        self, tensor: torch.Tensor | int, level: int, node: torch.Tensor, minimum: torch.Tensor, argmin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The minima [n, 8] (float64) and their argmin children [n, 8] of the 8 children of the `node`s of `level`
        (tensor ids, or one id for all; their minima and argmin children are given). At level 1 the children are
        entries: their E."""
        stream = self._stream(tensor)
        if not isinstance(stream, int):
            stream = stream.unsqueeze(1)  # one per node, broadcast over its 8 children
        child = node.unsqueeze(1).mul(8) + torch.arange(8, device=node.device)
        return self._child_minimum(stream, level - 1, child, minimum.unsqueeze(1), argmin.unsqueeze(1))

    def children_at(
        self, tensor: torch.Tensor | int, level: int, child: torch.Tensor, parent_min: torch.Tensor, parent_arg
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Minima (float64) and argmin children of the nodes `child` of `level` (tensor ids, or one id for all),
        from their parents' minima and argmin children."""
        return self._child_minimum(self._stream(tensor), level, child, parent_min, parent_arg)

    def _root_minimum(self, stream, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minima (float64) and argmin children of root nodes: Exp(1)/8**LEVELS and a uniform child."""
        z = self._hash(stream, node, LEVELS)
        return _exp_of(z).div_(float(8**LEVELS)), z.bitwise_and_(7)

    def _child_minimum(self, stream, level, child, parent_min, parent_arg):
        z = self._hash(stream, child, level)
        own = child.bitwise_and(7) == parent_arg
        extra = _exp_of(z).div_(float(8**level)).masked_fill_(own, 0.0)
        return extra.add_(parent_min), z.bitwise_and_(7)

    def minimum(self, tensor: torch.Tensor, level: int, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minima (float64) and argmin children of nodes (tensor ids, node numbers) of `level`; at level 0 the nodes
        are entries and the minimum is their E. Consecutive equal parents are evaluated once."""
        stream = self._stream(tensor)
        return self._minimum(None if isinstance(stream, int) else tensor, stream, level, node)

    def _minimum(self, tensor, stream, level: int, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`minimum` with the stream keys found; `tensor` is None when all nodes are of one tensor."""
        if level == LEVELS:
            return self._root_minimum(stream, node)
        parent = node.bitwise_right_shift(3)
        n = node.numel()
        if n > 1:
            new = torch.ones(n, dtype=torch.bool, device=node.device)
            new[1:] = parent[1:] != parent[:-1]
            if tensor is not None:
                new[1:] |= tensor[1:] != tensor[:-1]
            first = new.nonzero().squeeze(1)
            if first.numel() < n:
                inverse = new.cumsum(0).sub_(1)
                if tensor is None:
                    parent_min, parent_arg = self._minimum(None, stream, level + 1, parent.index_select(0, first))
                else:
                    parent_min, parent_arg = self._minimum(
                        tensor.index_select(0, first),
                        stream.index_select(0, first),
                        level + 1,
                        parent.index_select(0, first),
                    )
                parent_min, parent_arg = parent_min.index_select(0, inverse), parent_arg.index_select(0, inverse)
                return self._child_minimum(stream, level, node, parent_min, parent_arg)
        parent_min, parent_arg = self._minimum(tensor, stream, level + 1, parent)
        return self._child_minimum(stream, level, node, parent_min, parent_arg)

    def minimum_range(self, tensor_id: int, level: int, first: int, count: int, device):
        """Minima (float64) and argmin children of the `count` consecutive nodes of `level` from node `first` of
        one tensor, evaluated from the roots down (no search for shared parents), or from `cache_upper`'s level."""
        stream = self._stream_key(tensor_id)
        last = first + count - 1
        start = self._upper.find(tensor_id, level, first, last, device) if self._upper is not None else None
        if start is None:
            top, low = LEVELS, first >> 3 * (LEVELS - level)
            node = torch.arange(low, (last >> 3 * (LEVELS - level)) + 1, device=device)
            minimum, argmin = self._root_minimum(stream, node)
        else:
            top, low, minimum, argmin = start
        for above in range(top, level, -1):
            child = torch.arange(8 * low, 8 * (low + minimum.numel()), device=device).view(-1, 8)
            minimum, argmin = self._child_minimum(stream, above - 1, child, minimum.unsqueeze(1), argmin.unsqueeze(1))
            shift = 3 * (above - 1 - level)
            start, stop = (first >> shift) - 8 * low, (last >> shift) - 8 * low + 1
            minimum, argmin = minimum.view(-1)[start:stop], argmin.view(-1)[start:stop]
            low = first >> shift
        return minimum, argmin

    def cache_upper(self, extents: dict[int, tuple[int, int]], device) -> None:
        """Evaluate, for all tensors at once, the nodes of one upper level over the global entries [start, stop) of
        each tensor id in `extents`; later `minimum_range` calls inside them descend from there (bit-identical)."""
        spans = {t: span for t, span in extents.items() if span[1] > span[0]}
        if not spans:
            return
        level = next((lv for lv in range(UPPER_LEVEL, LEVELS + 1) if _nodes(spans, lv) <= UPPER_NODES), None)
        if level is None:
            return
        ids = list(spans)
        bounds = {lv: _bounds(spans, lv, device) for lv in range(level, LEVELS + 1)}
        owner, node = _spans_nodes(bounds[LEVELS][0], bounds[LEVELS][2])
        streams = torch.tensor([self._stream_key(t) for t in ids], dtype=torch.int64, device=device)
        minimum, argmin = self._root_minimum(streams.index_select(0, owner), node)
        for above in range(LEVELS, level, -1):
            child = node.unsqueeze(1).mul(8) + torch.arange(8, device=device)
            stream = streams.index_select(0, owner).unsqueeze(1)
            minimum, argmin = self._child_minimum(stream, above - 1, child, minimum.unsqueeze(1), argmin.unsqueeze(1))
            low, high = (b.index_select(0, owner).unsqueeze(1) for b in bounds[above - 1][:2])
            inside = ((child >= low) & (child <= high)).view(-1)  # children of the tensor's own entries, in order
            owner = owner.unsqueeze(1).expand_as(child).reshape(-1)[inside]
            node, minimum, argmin = (t.reshape(-1)[inside] for t in (child, minimum, argmin))
        counts = bounds[level][2].tolist()
        where = dict(zip(ids, zip(bounds[level][0].tolist(), accumulate(counts, initial=0), counts)))
        self._upper = _UpperLevel(level, torch.device(device), where, minimum, argmin)

    def exp(self, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """E of entries (tensor ids, global flat indices), float64. Cheapest when sorted."""
        return self.minimum(tensor, 0, index)[0]

    def exp_range(self, tensor_id: int, start: int, count: int, device) -> torch.Tensor:
        """E of the `count` entries of tensor `tensor_id` from global flat index `start`, float64."""
        if count <= 0:
            return torch.empty(0, dtype=torch.float64, device=device)
        return self.minimum_range(tensor_id, 0, start, count, device)[0]

    def smallest(self, sizes: Sequence[int], k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor ids, flat indices) of the k entries of smallest E among tensors of `sizes` entries — k entries
        uniformly without replacement. Descends the tree below a bound on E that about 1.5·k entries meet (doubled
        until k do): a node whose minimum exceeds the bound holds no such entry."""
        total = sum(sizes)
        sizes_t = torch.tensor(sizes, dtype=torch.int64, device=device)
        if k >= total:
            tensor = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t)
            starts = sizes_t.cumsum(0) - sizes_t
            return tensor, torch.arange(total, device=device) - starts.index_select(0, tensor)
        share = min(1.0, (1.5 * k + 16) / total)
        roots = (sizes_t + 8**LEVELS - 1) // 8**LEVELS
        while True:
            bound = float("inf") if share >= 1.0 else -torch.log1p(torch.tensor(-share, dtype=torch.float64)).item()
            tensor = torch.repeat_interleave(torch.arange(len(sizes), device=device), roots)
            node = torch.arange(tensor.numel(), device=device) - (roots.cumsum(0) - roots).index_select(0, tensor)
            minimum, argmin = self.minimum(tensor, LEVELS, node)
            for level in range(LEVELS, 0, -1):
                keep = minimum <= bound
                tensor, node, minimum, argmin = (t[keep] for t in (tensor, node, minimum, argmin))
                minimum, argmin = self.children(tensor, level, node, minimum, argmin)
                node = node.unsqueeze(1).mul(8) + torch.arange(8, device=device)
                tensor = tensor.unsqueeze(1).expand_as(node)
                real = node.mul(8 ** (level - 1)) < sizes_t.index_select(0, tensor.reshape(-1)).view_as(node)
                tensor, node, minimum, argmin = (t[real] for t in (tensor, node, minimum, argmin))
            found = minimum <= bound
            if int(found.sum()) >= k:
                best = torch.topk(minimum.masked_fill(~found, float("inf")), k, largest=False, sorted=False).indices
                return tensor.index_select(0, best), node.index_select(0, best)
            share = min(1.0, share * 2.0)


def _nodes(spans: dict[int, tuple[int, int]], level: int) -> int:
    """Nodes of `level` over the entries [start, stop) of every span."""
    return sum(((stop - 1) >> 3 * level) - (start >> 3 * level) + 1 for start, stop in spans.values())


def _bounds(spans: dict[int, tuple[int, int]], level: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per span: its first and last node of `level`, and their count."""
    shift = 3 * level
    low = torch.tensor([start >> shift for start, _ in spans.values()], dtype=torch.int64, device=device)
    high = torch.tensor([(stop - 1) >> shift for _, stop in spans.values()], dtype=torch.int64, device=device)
    return low, high, high - low + 1


def _spans_nodes(low: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(span of each node, node number) of the `count` nodes from `low` of every span, span after span."""
    owner = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    starts = count.cumsum(0).sub_(count)
    node = torch.arange(owner.numel(), device=count.device) - starts.index_select(0, owner) + low.index_select(0, owner)
    return owner, node


@dataclass
class _UpperLevel:
    """`EntryKeys.cache_upper`'s nodes of one level: per tensor id (its first node, its first position in the
    arrays, its number of nodes), and the minima and argmin children of all of them."""

    level: int
    device: torch.device
    where: dict[int, tuple[int, int, int]]
    minimum: torch.Tensor
    argmin: torch.Tensor

    def find(self, tensor_id: int, level: int, first: int, last: int, device):
        """(level, first node, minima, argmin children) of the cached nodes above the nodes first..last of `level`
        (of one tensor), or None when they are not all cached."""
        held = self.where.get(tensor_id)
        if held is None or level >= self.level or torch.device(device) != self.device:
            return None
        node, position, count = held
        shift = 3 * (self.level - level)
        low, high = first >> shift, last >> shift
        if low < node or high >= node + count:
            return None
        at = position + low - node
        return self.level, low, self.minimum[at : at + high - low + 1], self.argmin[at : at + high - low + 1]
