"""The fast exact draw: keys only for the entries that can win, by thinning a Poisson process.

A stochastic draw is the top-k of the keys log I - ½·log E, E ~ Exp(1) (`selection`). Tensors are visited in row
chunks while a pool keeps the best k keys seen so far; its k-th key τ only grows, and is a lower bound of the final
k-th key. An entry visited later can only be drawn if its key beats τ, which happens with probability
1 - exp(-λ), λ = I²/e^(2τ), independently of everything generated so far. Entries with λ ≥ 1 get their key
directly; for the others, the entries that beat τ are sampled exactly as the entries hit by a Poisson process of
intensity λ laid end to end: per block of entries a Poisson(Σλ) count of points, each landing on an entry with
probability ∝ λ (an entry is hit with probability exactly 1 - exp(-λ)). Only hit entries get a key, drawn from
E ~ Exp(1) conditioned on beating τ. The result is the exact top-k of the keys of all entries, at the cost of
computing λ and a block sum per entry — no random number, no sort.

A first pass keeps each block's largest I and Σ I², from which a first threshold is estimated; chunks are then
visited hottest first. A round that ends with fewer than k keys above its threshold is followed by another at a
lower threshold, which generates the keys in between (memorylessness of Exp(1)). ``top`` uses the same pool and
skips blocks whose largest I is below the pool's k-th. Embedding rows whose μ is 0 (tokens absent from the batch)
have zero importance and are never visited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunks import Segment, chunks, gather_gradients, locate
from .importance import NAN_MESSAGE, Source
from .key_pool import KeyPool

BLOCK_ENTRIES = 64  # entries per block: the first pass keeps each block's largest I and Σ I², then one Poisson count
SMALL_CHUNK_ENTRIES = 8192  # below this, a key per entry costs less than the thinning pass's fixed work
LOWER_BY = 16.0  # a round that ends with fewer than k keys above its threshold: the next one lowers it this much
MAX_ROUNDS = 8  # after this many rounds the threshold drops to 0: every remaining entry gets a key


@dataclass
class Round:
    """One round of the stochastic draw: it generates every key at least `threshold` (as I²/E) that earlier rounds,
    which generated the keys from `previous` up, did not; `keyed` holds, per tensor id, the entries they keyed."""

    threshold: float
    previous: float = math.inf
    keyed: dict[int, torch.Tensor] | None = None


class Thinning:
    """The fast exact draw of k entries (``stochastic`` or ``top``) over chunks of tensors."""

    def __init__(
        self, k: int, method: str, generator: torch.Generator, device, chunk_entries: int, carry: bool = False
    ):
        self.k = k
        self.top = method == "top"
        self.generator = generator
        self.pool = KeyPool(k, device, carry=carry)
        self.chunk_entries = chunk_entries
        self._buffer = torch.empty(0, device=device)
        self._keyed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor ids, flat indices) given a key so far
        self.rounds = 0

    def run(self, sources: list[Source]) -> list[torch.Tensor]:
        """The draw over all `sources` at once; per source, the sorted flat indices drawn."""
        chunked = list(chunks(sources, self.chunk_entries))
        if chunked:
            stats = [self._block_stats(segments) for segments in chunked]
            # Hottest chunks first: the pool's k-th key, a threshold for every later chunk, then rises early.
            order = sorted(range(len(chunked)), key=lambda c: -float(stats[c][0].max()))
            chunked, stats = [chunked[c] for c in order], [stats[c] for c in order]
            if self.top:
                self._run_top(chunked, stats)
            else:
                self._run_stochastic(chunked, stats)
        return self.pool.split(sources)

    def stream(self, segments: list[Segment]) -> None:
        """One chunk of gradients arriving during the backward, against the pool's running k-th key only."""
        if self.top:
            buffer = self._load(segments, 1.0)
            reach = self.pool.threshold() if self.pool.full else 0.0
            self._offer_top(segments, buffer, (buffer > reach).nonzero().squeeze(1))
        else:
            self._thin_chunk(segments, Round(0.0))

    # -- the first pass ------------------------------------------------------------------------------------------
    def _load(self, segments: list[Segment], scale: float) -> torch.Tensor:
        """scale·I of a chunk, zero-padded to whole blocks."""
        last = segments[-1]
        used = last.start + last.size
        size = -(-used // BLOCK_ENTRIES) * BLOCK_ENTRIES
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, device=self._buffer.device)
        buffer = self._buffer[:size]
        buffer[used:].zero_()
        for segment in segments:
            segment.load(buffer[segment.start : segment.start + segment.size], scale)
        return buffer

    def _block_stats(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block of `BLOCK_ENTRIES` entries of a chunk: the largest I, and Σ I² (float64).

        I² leaves float32's range for I below ~1e-19 or above ~1e19: the sums are taken of (I / the chunk's largest I)²
        and scaled back in float64, so the statistics are right at any magnitude."""
        blocks = self._load(segments, 1.0).view(-1, BLOCK_ENTRIES)
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
            buffer = self._load(segments, 1.0)
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
        # Every key ≥ threshold has been generated; done once k of them are. If not (unlucky), lower the
        # threshold and generate the keys in between.
        while threshold and not (self.pool.full and self.pool.threshold() >= 0.5 * math.log(threshold)):
            lower = threshold / LOWER_BY if self.rounds < MAX_ROUNDS else 0.0
            this_round = Round(lower, previous=threshold, keyed=self._keyed_by_tensor())
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

    def _rate_scale(self, round_: Round) -> float | None:
        """s with λ = (s·I)² = I²/x - I²/previous, x the larger of the round's threshold and the pool's k-th key (as
        I²/E); 0 when nothing in this round can beat x, None when there is no x yet or s is out of float32's range."""
        threshold = round_.threshold
        if self.pool.full:
            threshold = max(threshold, math.exp(min(2 * self.pool.threshold(), 700.0)))
        if threshold <= 0:
            return None
        if threshold >= round_.previous:
            return 0.0
        squared = 1.0 / threshold - 1.0 / round_.previous
        scale = math.sqrt(squared) if squared > 0 else 0.0
        return scale if 1e-30 < scale < 1e30 else None

    def _thin_first_round(self, segments, largest: torch.Tensor, mass: torch.Tensor, round_: Round) -> None:
        """First round: rates per block from the first pass; λ is only looked at in blocks that need it."""
        scale = self._rate_scale(round_)
        if scale is None:
            return self._thin_chunk(segments, round_)
        heavy = largest >= 1.0 / scale  # blocks holding an entry with λ ≥ 1
        rates = (mass.double() * scale**2).masked_fill_(heavy, 0.0)
        expected = float(heavy.sum() + rates.sum())
        if math.isnan(expected):
            raise ValueError(NAN_MESSAGE)
        if expected > self.k:
            return self._thin_chunk(segments, round_)  # far too many keys: raise x first
        counts = self._poisson(rates)
        hit = counts.nonzero().squeeze(1)
        heavy = heavy.nonzero().squeeze(1)
        if hit.numel() == 0 and heavy.numel() == 0:
            return
        blocks = torch.cat([heavy, hit])
        rate = self._load(segments, scale).view(-1, BLOCK_ENTRIES).index_select(0, blocks).square_()
        counts = counts.index_select(0, hit)
        if heavy.numel():
            certain = self._key_certain_entries(segments, heavy, rate[: heavy.numel()], scale, round_)
            counts = torch.cat([certain, counts])
        self._key_hit_entries(segments, blocks, rate, counts, scale, round_)

    def _thin_chunk(self, segments, round_: Round) -> None:
        """λ of every entry of the chunk: before there is any threshold, in later rounds, and as a fallback."""
        scale = self._rate_scale(round_)
        if scale == 0.0:
            return
        last = segments[-1]
        small = last.start + last.size <= SMALL_CHUNK_ENTRIES
        out_of_range = scale is None and (self.pool.full or round_.threshold > 0)  # no float32 scale for x
        if small or out_of_range:
            buffer = self._load(segments, 1.0)
            self._exclude(segments, buffer, round_.keyed)
            local = buffer.nonzero().squeeze(1)
            return self._offer(segments, local, buffer.index_select(0, local), round_)
        buffer = self._load(segments, 1.0 if scale is None else scale)
        self._exclude(segments, buffer, round_.keyed)
        if scale is None:
            # No threshold yet: the chunk's k largest I get keys directly and set one.
            self._direct_top_k(segments, buffer, None, round_)
            scale = self._rate_scale(round_)
            if not scale:
                local = buffer.nonzero().squeeze(1)
                return self._offer(segments, local, buffer.index_select(0, local), round_)
            buffer.mul_(scale)
        rate = buffer.square_().view(-1, BLOCK_ENTRIES)
        heavy = rate.amax(1) >= 1.0
        expected = float(heavy.sum() + rate.sum(1).masked_fill_(heavy, 0.0).sum())
        if math.isnan(expected):
            raise ValueError(NAN_MESSAGE)
        if expected > self.k:
            # The threshold is far below this chunk's keys: its k largest get keys directly, which raises it.
            self._direct_top_k(segments, buffer, scale, round_)
            new_scale = self._rate_scale(round_)
            if not new_scale:
                local = buffer.nonzero().squeeze(1)
                return self._offer(segments, local, buffer.index_select(0, local), round_, scale=scale)
            buffer.mul_((new_scale / scale) ** 2)
            scale = new_scale
            heavy = rate.amax(1) >= 1.0
        heavy = heavy.nonzero().squeeze(1)
        counts = self._poisson(rate.sum(1, dtype=torch.float64).index_fill_(0, heavy, 0.0))
        if heavy.numel():
            part = rate.index_select(0, heavy)
            counts.index_copy_(0, heavy, self._key_certain_entries(segments, heavy, part, scale, round_))
            rate.index_copy_(0, heavy, part)
        self._key_hit_entries(segments, torch.arange(rate.shape[0], device=rate.device), rate, counts, scale, round_)

    def _key_certain_entries(
        self, segments, blocks: torch.Tensor, rate: torch.Tensor, scale: float, round_: Round
    ) -> torch.Tensor:
        """Entries with λ ≥ 1 in `blocks` (rows of `rate`, λ = (scale·I)²) get a key directly and leave the
        thinning; returns the Poisson counts of what is left of each block."""
        certain = rate >= 1.0
        block, col = certain.nonzero().unbind(1)
        local = blocks.index_select(0, block) * BLOCK_ENTRIES + col
        self._offer(segments, local, rate.masked_select(certain), round_, scale=scale)
        rate.masked_fill_(certain, 0.0)
        return self._poisson(rate.sum(1, dtype=torch.float64))

    def _poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Independent Poisson(rate) counts (float64 rates), drawn as one Poisson total spread ∝ rate."""
        ends = rates.cumsum(0)
        counts = torch.zeros_like(rates)
        total = float(ends[-1]) if ends.numel() else 0.0
        if total > 0:
            n = int(torch.poisson(rates.new_tensor([total]), generator=self.generator))
            point = torch.rand(n, dtype=torch.float64, device=rates.device, generator=self.generator) * total
            where = torch.searchsorted(ends, point, right=True).clamp_(max=rates.numel() - 1)
            counts.index_add_(0, where, torch.ones_like(point)).masked_fill_(rates <= 0, 0.0)
        return counts

    def _key_hit_entries(
        self, segments, blocks, rate: torch.Tensor, counts: torch.Tensor, scale: float, round_: Round
    ) -> None:
        """Drop counts[i] points on block blocks[i], each on an entry with probability ∝ λ (rows of `rate`); every
        entry hit gets a key, conditioned on beating the threshold."""
        hit = counts.nonzero().squeeze(1)
        if hit.numel() == 0:
            return
        blocks, rate, counts = blocks.index_select(0, hit), rate.index_select(0, hit), counts.index_select(0, hit)
        ends = rate.cumsum(1, dtype=torch.float64)
        offset = torch.cat([ends.new_zeros(1), ends[:, -1].cumsum(0)[:-1]])
        ends += offset.unsqueeze(1)  # the blocks' λ laid end to end
        row = torch.repeat_interleave(counts.long())
        start, width = offset.index_select(0, row), (ends[:, -1] - offset).index_select(0, row)
        point = start + torch.rand(row.shape, dtype=torch.float64, device=row.device, generator=self.generator) * width
        slot = torch.searchsorted(ends.view(-1), point, right=True)
        first = row * BLOCK_ENTRIES
        slot = torch.minimum(torch.maximum(slot, first), first + BLOCK_ENTRIES - 1)
        slot = slot.unique()
        lam = rate.view(-1).index_select(0, slot)
        landed = lam > 0  # only a point rounded onto the end of its block can land on an entry with λ = 0
        slot, lam = slot.masked_select(landed), lam.masked_select(landed)
        local = blocks.index_select(0, slot // BLOCK_ENTRIES) * BLOCK_ENTRIES + slot % BLOCK_ENTRIES
        self._offer(segments, local, lam, round_, scale=scale, hit=True)

    def _direct_top_k(self, segments, values: torch.Tensor, scale: float | None, round_: Round) -> None:
        """Keys for the chunk's k entries of largest `values` (I, or λ = (scale·I)²); they leave the thinning."""
        first = torch.topk(values.abs(), min(self.k, values.numel()), sorted=False).indices
        chosen = values.index_select(0, first)
        nonzero = chosen != 0
        first = first.masked_select(nonzero)
        self._offer(segments, first, chosen.masked_select(nonzero), round_, scale=scale)
        values.index_fill_(0, first, 0.0)

    def _exclude(self, segments, buffer: torch.Tensor, keyed: dict[int, torch.Tensor] | None) -> None:
        """Zero the entries that already have a key (from an earlier round)."""
        if not keyed:
            return
        for segment in segments:
            index = keyed.get(segment.tensor_id)
            if index is not None:
                buffer.index_fill_(0, segment.positions(index), 0.0)

    def _offer(
        self,
        segments,
        local: torch.Tensor,
        values: torch.Tensor,
        round_: Round,
        scale: float | None = None,
        hit: bool = False,
    ) -> None:
        """Offer buffer positions `local` to the pool with the key log I - ½ log E, E ~ Exp(1) conditioned on
        E > I²/previous (keys of earlier rounds were below the round's `previous`) and, for entries the thinning
        hit, on beating the threshold: E ≤ I²/previous + λ. `values`: the entries' I (`scale` None) or
        λ = (scale·I)².

        I comes from the chunk's buffer rather than from the parameters: one set of tensor operations for all the
        tensors packed in a chunk (gathering them tensor by tensor cost a quarter of the step's overhead)."""
        if local.numel() == 0:
            return
        magnitude = values.abs() if scale is None else values.sqrt().div_(scale)
        if hit:
            # Inverse CDF of Exp(1) truncated to [0, λ].
            lam = values.double()
            uniform = torch.rand(lam.shape, dtype=torch.float64, device=lam.device, generator=self.generator)
            exp = -torch.log1p(uniform * torch.expm1(-lam))
        else:
            exp = torch.empty(local.shape, dtype=torch.float64, device=local.device)
            exp.exponential_(generator=self.generator)
        if round_.previous < math.inf:
            exp += magnitude.double().square() / round_.previous  # memorylessness of Exp(1)
        keys = magnitude.log_().sub_(exp.log_().mul_(0.5).to(magnitude.dtype))
        tensor, index = locate(segments, local)
        self._keyed.append((tensor, index))
        self.pool.offer(keys, tensor, index, self._carried(segments, tensor, index))

    def _carried(self, segments, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The gradients at the offered entries, for a pool that carries them."""
        if self.pool.values is None:
            return None
        return gather_gradients(segments, tensor, index)
