"""The fast exact draw: keys only for the entries that can win.

A stochastic draw is the top-k of the keys log I - ½·log E, with E ~ Exp(1) a function of (seed, step, entry) alone
(`entry_keys`). Tensors are visited in row chunks while a pool keeps the best k keys seen so far; its k-th key τ only
grows, and is a lower bound of the final k-th key. An entry visited later can only be drawn if its key beats τ, that
is if E ≤ I²/e^(2τ). The E of the entries are the leaves of a tree whose nodes hold the minimum E below them: a block
of 64 entries is skipped when its minimum exceeds (its largest I)²/e^(2τ), one hash for 64 entries; a block that
passes is split into 8 groups of 8, tested the same way, and only the entries of groups that pass get their E and a
key. The result is the exact top-k of the keys of all entries, whatever the chunking and the order of the visits.

A first pass keeps each block's largest I and Σ I², from which a first threshold is estimated; chunks are then
visited hottest first, and a chunk none of whose blocks can pass is not even loaded again. A round that ends with
fewer than k keys above its threshold is followed by another at a lower threshold, which keys the entries in
between. ``top`` uses the same pool and skips blocks whose largest I is below the pool's k-th. Embedding rows whose
μ is 0 (tokens absent from the batch) have zero importance and are never visited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunks import Segment, block_nodes, chunks, gather_gradients, locate
from .entry_keys import BLOCK, EntryKeys
from .importance import NAN_MESSAGE, Source
from .key_pool import KeyPool
from .one_thread import on_one_thread

BLOCK_ENTRIES = BLOCK  # entries per block: the first pass keeps each block's largest I and Σ I²
SMALL_CHUNK_ENTRIES = 8192  # below this, a key per entry costs less than the thinning pass's fixed work
LOWER_BY = 16.0  # a round that ends with fewer than k keys above its threshold: the next one lowers it this much
MAX_ROUNDS = 8  # after this many rounds the threshold drops to 0: every remaining entry gets a key


@dataclass
class Round:
    """One round of the stochastic draw: it keys every entry whose key is at least ½·log `threshold` (on the scale
    I²/E) that earlier rounds did not; `keyed` holds, per tensor id, the entries they keyed."""

    threshold: float
    keyed: dict[int, torch.Tensor] | None = None


def _bound(largest: torch.Tensor, floor: float) -> torch.Tensor:
    """(largest I)²/e^(2·floor) in float64: the largest E with which an entry of this I reaches the key `floor`."""
    if abs(floor) < 300.0:
        return largest.double().square_().mul_(math.exp(-2.0 * floor))
    return largest.double().log_().sub_(floor).mul_(2.0).exp_()  # beyond float64's range of e^(2·floor)


def extents(sources: list[Source], keys: EntryKeys) -> dict[int, tuple[int, int]]:
    """Per tensor id (a position in `sources`): the global flat indices [start, stop) of its local entries."""
    return {t: (keys.offset(t), keys.offset(t) + s.param.numel()) for t, s in enumerate(sources)}


class Thinning:
    """The fast exact draw of k entries (``stochastic`` or ``top``) over chunks of tensors. `generator`: the
    `EntryKeys` of the step (or a generator to take them from)."""

    def __init__(
        self,
        k: int,
        method: str,
        generator: EntryKeys | torch.Generator,
        device,
        chunk_entries: int,
        carry: bool = False,
    ):
        self.k = k
        self.top = method == "top"
        self.keys = EntryKeys.of(generator)
        self.pool = KeyPool(k, device, carry=carry)
        self.chunk_entries = chunk_entries
        self._buffer = torch.empty(0, device=device)
        self._keyed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor ids, flat indices) given a key so far
        self.rounds = 0

    def run(self, sources: list[Source]) -> list[torch.Tensor]:
        """The draw over all `sources` at once; per source, the sorted flat indices drawn."""
        chunked = list(chunks(sources, self.chunk_entries, offsets=self.keys.offsets))
        if chunked:
            self.prepare(extents(sources, self.keys), chunked[0][0].source.param.device)
            stats = [self._block_stats(segments) for segments in chunked]
            # Hottest chunks first: the pool's k-th key, a threshold for every later chunk, then rises early.
            order = sorted(range(len(chunked)), key=lambda c: -float(stats[c][0].max()))
            chunked, stats = [chunked[c] for c in order], [stats[c] for c in order]
            if self.top:
                self._run_top(chunked, stats)
            else:
                self._run_stochastic(chunked, stats)
        return self.pool.split(sources)

    def prepare(self, spans: dict[int, tuple[int, int]], device) -> None:
        """Before the first chunk: the upper levels of the trees of keys over `spans` (`extents`) at once, for the
        stochastic walk (``top`` keys no entries)."""
        if not self.top:
            self.keys.cache_upper(spans, device)

    def stream(self, segments: list[Segment]) -> None:
        """One chunk of gradients arriving during the backward, against the pool's running k-th key only."""
        if self.top:
            buffer = self._load(segments)
            reach = self.pool.threshold() if self.pool.full else 0.0
            self._offer_top(segments, buffer, (buffer > reach).nonzero().squeeze(1))
        else:
            self._thin_chunk(segments, Round(0.0))

    # -- the first pass ------------------------------------------------------------------------------------------
    def _load(self, segments: list[Segment]) -> torch.Tensor:
        """I of a chunk, laid out as its segments say, zero between them and up to a whole number of blocks."""
        last = segments[-1]
        used = last.start + last.size
        size = -(-used // BLOCK_ENTRIES) * BLOCK_ENTRIES
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, device=self._buffer.device)
        buffer = self._buffer[:size]
        buffer[used:].zero_()
        end = 0
        for segment in segments:
            if segment.start > end:
                buffer[end : segment.start].zero_()
            segment.load(buffer[segment.start : segment.start + segment.size], 1.0)
            end = segment.start + segment.size
        return buffer

    def _block_stats(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block of `BLOCK_ENTRIES` entries of a chunk: the largest I, and Σ I² (float64).

        I² leaves float32's range for I below ~1e-19 or above ~1e19: the sums are taken of (I / the chunk's largest I)²
        and scaled back in float64, so the statistics are right at any magnitude."""
        blocks = self._load(segments).view(-1, BLOCK_ENTRIES)
        largest = blocks.amax(1)
        peak = float(largest.max()) if largest.numel() else 0.0
        if not 0.0 < peak < math.inf:
            return largest, blocks.double().square_().sum(1)  # all zero, or non-finite (refused by the caller)
        mass = blocks.div_(peak).square_().sum(1, dtype=torch.float64)
        return largest, mass.mul_(peak * peak)

    def _first_threshold(self, largest: torch.Tensor, mass: torch.Tensor) -> float | None:
        """A threshold x on the keys I²/E that about 2k of them beat, from the block statistics alone.

        Any function of the importance will do for exactness; this one estimates how many keys beat x as
        Σ over blocks of min(1, M/x) + min(B - 1, R/x) (M: the block's largest I², R: the rest of its Σ I²).
        Returns None when the model has too few non-zero entries for that.
        """
        target = 2.0 * self.k
        if largest.numel() * BLOCK_ENTRIES <= SMALL_CHUNK_ENTRIES:
            return None  # a key per entry is cheaper
        top = largest.double().square_()
        rest = (mass.double() - top).clamp_(min=0.0) / (BLOCK_ENTRIES - 1)  # per-entry share of the rest
        if float((top > 0).sum() + (BLOCK_ENTRIES - 1) * (rest > 0).sum()) < target:
            return None
        # Values below the solution x count linearly, so only the largest need sorting; how many is checked below.
        sizes = [max(1024, int(target) // 2), max(1024, int(target) // 32)]
        weights = (1.0, BLOCK_ENTRIES - 1.0)
        positive = top.masked_select(top > 0)
        low, high = math.log(float(positive.min())) - 1.0, math.log(float(positive.max())) + 1.0
        while True:
            parts = []
            for values, size in zip((top, rest), sizes):
                size = min(size, values.numel())
                kept = torch.topk(values, size, sorted=False).values.sort().values
                parts.append((kept, torch.cat([kept.new_zeros(1), kept.cumsum(0)]), float(values.sum() - kept.sum())))

            def expected(x: torch.Tensor, parts=parts) -> torch.Tensor:
                total = torch.zeros_like(x)
                for (kept, prefix, tail), weight in zip(parts, weights):
                    below = torch.searchsorted(kept, x)
                    total += weight * ((kept.numel() - below) + (prefix.index_select(0, below) + tail) / x)
                return total

            lo, hi = low, high
            for _ in range(4):  # a grid search on log x, refined: the estimate falls as x grows
                grid = torch.linspace(lo, hi, 33, dtype=torch.float64)
                above = int((expected(grid.exp()) > target).sum())
                lo, hi = float(grid[max(above - 1, 0)]), float(grid[min(above, 32)])
            x = math.exp(lo)
            short = [i for i, (kept, _, _) in enumerate(parts) if kept.numel() < top.numel() and float(kept[0]) >= x]
            if not short:
                return x
            for i in short:  # a value left out may reach x: keep more
                sizes[i] *= 4

    # -- top -----------------------------------------------------------------------------------------------------
    def _run_top(self, chunked, stats) -> None:
        every = torch.cat([largest for largest, _ in stats])
        # The k-th largest block maximum: at least k entries reach it, so nothing below it can be drawn.
        floor = float(torch.topk(every, self.k).values[-1]) if every.numel() >= self.k else 0.0
        for segments, (largest, _) in zip(chunked, stats):
            reach = max(floor, self.pool.threshold()) if self.pool.full else floor
            if reach > 0:
                blocks = (largest >= reach).nonzero().squeeze(1)
                if blocks.numel() == 0:
                    continue
            buffer = self._load(segments)
            if reach > 0:
                part = buffer.view(-1, BLOCK_ENTRIES).index_select(0, blocks)
                block, col = (part >= reach).nonzero().unbind(1)
                local = blocks.index_select(0, block) * BLOCK_ENTRIES + col
            else:
                local = buffer.nonzero().squeeze(1)
            self._offer_top(segments, buffer, local)

    def _offer_top(self, segments, buffer: torch.Tensor, local: torch.Tensor) -> None:
        """Offer the entries at buffer positions `local` with their importance as the key (at most k of them)."""
        keys = buffer.index_select(0, local)
        if local.numel() > self.k:
            best = torch.topk(keys, self.k, sorted=False).indices
            local, keys = local.index_select(0, best), keys.index_select(0, best)
        tensor, index = locate(segments, local)
        self.pool.offer(keys, tensor, index, self._carried(segments, tensor, index))

    # -- stochastic ----------------------------------------------------------------------------------------------
    def _run_stochastic(self, chunked, stats) -> None:
        threshold = self._first_threshold(torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats]))
        self.rounds = 1
        for segments, (largest, mass) in zip(chunked, stats):
            if threshold is None:
                self._thin_chunk(segments, Round(0.0))
            else:
                self._thin_first_round(segments, largest, mass, Round(threshold))
        self.pool.flush()
        # Every key ≥ ½·log threshold has been generated; done once k of them are. If not (unlucky), lower the
        # threshold and key the entries in between.
        while threshold and not (self.pool.full and self.pool.threshold() >= 0.5 * math.log(threshold)):
            lower = threshold / LOWER_BY if self.rounds < MAX_ROUNDS else 0.0
            this_round = Round(lower, keyed=self._keyed_by_tensor())
            threshold = lower
            self.rounds += 1
            for segments in chunked:
                self._thin_chunk(segments, this_round)
            self.pool.flush()

    def _keyed_by_tensor(self) -> dict[int, torch.Tensor]:
        if not self._keyed:
            return {}
        tensor, index = (torch.cat(parts) for parts in zip(*self._keyed))
        return {t: index.masked_select(tensor == t) for t in tensor.unique().tolist()}

    def _floor(self, round_: Round) -> float:
        """The key an entry must reach to matter: the round's threshold (as ½·log of I²/E) or the pool's k-th key."""
        floor = 0.5 * math.log(round_.threshold) if round_.threshold > 0 else -math.inf
        return max(floor, self.pool.threshold()) if self.pool.full else floor

    def _crowded(self, largest: torch.Tensor, floor: float) -> bool:
        """Whether far more blocks than k would pass `floor`: their expected number is at most
        Σ min(1, 64·(largest I)²/e^(2·floor)), the chance that a block's minimum E lies below its largest bound."""
        if floor == -math.inf:
            return True
        reach = largest.double().log_().sub_(floor).mul_(2.0).add_(math.log(BLOCK_ENTRIES)).exp_().clamp_(max=1.0)
        return float(reach.sum()) > self.k

    @on_one_thread
    def _thin_first_round(self, segments, largest: torch.Tensor, mass: torch.Tensor, round_: Round) -> None:
        """First round: the blocks are tested with the largest I of the first pass; the chunk is only loaded again
        when one of them passes."""
        floor = self._floor(round_)
        if math.isnan(float(mass.sum())):
            raise ValueError(NAN_MESSAGE)
        if self._crowded(largest, floor):
            return self._thin_chunk(segments, round_)
        live = (largest > 0).nonzero().squeeze(1)
        passing = self._passing_blocks(segments, live, largest.index_select(0, live), floor)
        if passing[0].numel():
            self._descend(segments, self._load(segments), passing, floor)

    def _thin_chunk(self, segments, round_: Round) -> None:
        """Load the chunk (on every thread), leave out the entries keyed in earlier rounds, and key those that can
        reach the floor (on one thread: `one_thread`)."""
        self._key_chunk(segments, self._load(segments), round_)

    @on_one_thread
    def _key_chunk(self, segments, buffer: torch.Tensor, round_: Round) -> None:
        self._exclude(segments, buffer, round_.keyed)
        last = segments[-1]
        if last.start + last.size <= SMALL_CHUNK_ENTRIES:
            return self._offer_entries(segments, buffer.nonzero().squeeze(1), buffer)
        floor = self._floor(round_)
        blocks = buffer.view(-1, BLOCK_ENTRIES)
        largest = blocks.amax(1)
        if math.isnan(float(largest.sum())):
            raise ValueError(NAN_MESSAGE)
        if self._crowded(largest, floor):
            # No threshold yet, or one far below this chunk's keys: its k largest I get keys directly, which raises it.
            self._direct_top_k(segments, buffer)
            floor = self._floor(round_)
            if floor == -math.inf:  # fewer than k keys so far: every entry gets one
                return self._offer_entries(segments, buffer.nonzero().squeeze(1), buffer)
            largest = blocks.amax(1)
        live = (largest > 0).nonzero().squeeze(1)
        passing = self._passing_blocks(segments, live, largest.index_select(0, live), floor)
        if passing[0].numel():
            self._descend(segments, buffer, passing, floor)

    def _passing_blocks(self, segments, blocks: torch.Tensor, largest: torch.Tensor, floor: float):
        """The `blocks` (with their largest I) whose minimum E is small enough for their largest I to reach `floor`:
        (blocks, tensor ids — one int for a chunk of one tensor —, node numbers, minima, argmin children)."""
        if len(segments) == 1 and isinstance(segments[0].rows, slice) and blocks.numel():
            return self._passing_consecutive(segments[0], blocks, largest, floor)
        tensor, node = block_nodes(segments, blocks, self.keys)
        minimum, argmin = self.keys.minimum(tensor, 2, node)
        keep = (minimum <= _bound(largest, floor)).nonzero().squeeze(1)
        return tuple(t.index_select(0, keep) for t in (blocks, tensor, node, minimum, argmin))

    def _passing_consecutive(self, segment: Segment, blocks: torch.Tensor, largest: torch.Tensor, floor: float):
        """`_passing_blocks` for rows of one tensor: its blocks are consecutive tree nodes, whose minima are
        evaluated from the roots down (no search for shared parents)."""
        # the node of the chunk's block 0, whose first entry is the segment's (`chunks.block_nodes`)
        first = (self.keys.offset(segment.tensor_id) + int(segment.flat_index(segment.start))) // BLOCK
        count = -(-(segment.start + segment.size) // BLOCK)
        minimum, argmin = self.keys.minimum_range(segment.tensor_id, 2, first, count, blocks.device)
        minimum, argmin = minimum.index_select(0, blocks), argmin.index_select(0, blocks)
        keep = (minimum <= _bound(largest, floor)).nonzero().squeeze(1)
        blocks = blocks.index_select(0, keep)
        return blocks, segment.tensor_id, blocks + first, minimum.index_select(0, keep), argmin.index_select(0, keep)

    def _descend(self, segments, buffer: torch.Tensor, passing, floor: float) -> None:
        """Key the entries of the passing blocks that can reach `floor`, one level of the tree at a time: the groups
        of 8 whose minimum E lets their largest I reach it, then their entries."""
        blocks, tensor, node, minimum, argmin = passing
        values = buffer.view(-1, BLOCK_ENTRIES).index_select(0, blocks).view(-1, 8)  # groups of 8, 8 per block
        bounds = _bound(values.amax(1), floor).view(-1, 8)
        group, group_min, group_arg = self._children_within(tensor, 1, node, minimum, argmin, bounds)
        if group.numel() == 0:
            return
        block = group.bitwise_right_shift(3)  # (positions are non-negative: shifts and masks divide by 8)
        group_tensor = tensor if isinstance(tensor, int) else tensor.index_select(0, block)
        group_node = node.index_select(0, block).mul_(8).add_(group.bitwise_and(7))
        magnitude = values.index_select(0, group)
        entry, exp, _ = self._children_within(
            group_tensor, 0, group_node, group_min, group_arg, _bound(magnitude, floor)
        )
        magnitude = magnitude.view(-1).index_select(0, entry)
        keys = magnitude.double().log_().sub_(exp.log_().mul_(0.5))
        win = (keys >= floor) & (magnitude > 0)
        in_block = group.index_select(0, entry.bitwise_right_shift(3))  # (block among the passing ones) · 8 + group
        local = blocks.index_select(0, in_block.bitwise_right_shift(3)).mul_(BLOCK_ENTRIES)
        local.add_(in_block.bitwise_and_(7).mul_(8)).add_(entry.bitwise_and(7))
        self._offer(segments, local[win], keys[win])

    def _children_within(self, tensor, level: int, node, minimum, argmin, bound: torch.Tensor):
        """The children (of `level`) of `node`s whose minimum E may lie within their `bound` [n, 8]: (their flat
        positions among the n·8 children, their minima, their argmin children).

        A child's minimum is at least its parent's, so a child whose bound is below its parent's minimum is left
        out before its own minimum is hashed. The bounds get a relative slack of 1e-9: these tests only save work,
        and the key of an entry that passes them decides whether it is drawn."""
        bound = bound.mul(1.0 + 1e-9)
        maybe = (bound >= minimum.unsqueeze(1)).view(-1).nonzero().squeeze(1)
        parent = maybe.bitwise_right_shift(3)
        child = node.index_select(0, parent).mul_(8).add_(maybe.bitwise_and(7))
        parent_tensor = tensor if isinstance(tensor, int) else tensor.index_select(0, parent)
        child_min, child_arg = self.keys.children_at(
            parent_tensor, level, child, minimum.index_select(0, parent), argmin.index_select(0, parent)
        )
        inside = (child_min <= bound.view(-1).index_select(0, maybe)).nonzero().squeeze(1)
        return maybe.index_select(0, inside), child_min.index_select(0, inside), child_arg.index_select(0, inside)

    def _offer_entries(self, segments, local: torch.Tensor, buffer: torch.Tensor) -> None:
        """Key the entries at buffer positions `local`, whatever their key."""
        if local.numel() == 0:
            return
        tensor, index = locate(segments, local)
        exp = self.keys.exp(tensor, self.keys.global_index(tensor, index))
        keys = buffer.index_select(0, local).double().log_().sub_(exp.log_().mul_(0.5))
        self._offer(segments, local, keys, tensor, index)

    def _direct_top_k(self, segments, buffer: torch.Tensor) -> None:
        """Keys for the chunk's k entries of largest I; they leave the buffer."""
        first = torch.topk(buffer, min(self.k, buffer.numel()), sorted=False).indices
        first = first.masked_select(buffer.index_select(0, first) > 0).sort().values
        self._offer_entries(segments, first, buffer)
        buffer.index_fill_(0, first, 0.0)

    def _exclude(self, segments, buffer: torch.Tensor, keyed: dict[int, torch.Tensor] | None) -> None:
        """Zero the entries that already have a key (from an earlier round)."""
        if not keyed:
            return
        for segment in segments:
            index = keyed.get(segment.tensor_id)
            if index is not None:
                buffer.index_fill_(0, segment.positions(index), 0.0)

    def _offer(self, segments, local: torch.Tensor, keys: torch.Tensor, tensor=None, index=None) -> None:
        """Offer the keys of the entries at buffer positions `local` to the pool."""
        if local.numel() == 0:
            return
        if tensor is None:
            tensor, index = locate(segments, local)
        self._keyed.append((tensor, index))
        self.pool.offer(keys, tensor, index, self._carried(segments, tensor, index))

    def _carried(self, segments, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The gradients at the offered entries, for a pool that carries them."""
        if self.pool.values is None:
            return None
        return gather_gradients(segments, tensor, index)
