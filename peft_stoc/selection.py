"""Importance and the global draw: pure functions on tensors.

Importance of an entry is I = |μ ⊙ θ ⊙ g|. The draw picks k entries of the whole model at once:

* ``stochastic``: successive sampling without replacement with probability ∝ I² — the distribution of
  ``numpy.random.choice(n, k, replace=False, p=I²/ΣI²)``. It is the top-k of the keys ``log I - ½·log E`` with
  E ~ Exp(1) (Efraimidis–Spirakis, equivalent to Gumbel-top-k).
* ``top``: the k largest I.
* ``random``: k entries uniformly at random.

Entries of zero importance are never drawn by ``stochastic`` / ``top`` unless fewer than k entries have non-zero
importance; the remainder is then filled uniformly from the zero-importance entries.

How the stochastic draw avoids a random number per entry (``strategy="fast"``, the default). Tensors are
visited in row chunks while a pool keeps the best k keys seen so far; its k-th key τ only grows, and is a lower
bound of the final k-th key. An entry visited later can only be drawn if its key beats τ, which happens with
probability 1 - exp(-λ), λ = I²/e^(2τ), independently of everything generated so far. Entries with λ ≥ 1 get
their key directly; for the others, the entries that beat τ are sampled exactly as the entries hit by a Poisson
process of intensity λ laid end to end: per block of entries a Poisson(Σλ) count of points, each landing on an
entry with probability ∝ λ (an entry is hit with probability exactly 1 - exp(-λ)). Only hit entries get a key,
drawn from E ~ Exp(1) conditioned on beating τ. The result is the exact top-k of the keys of all entries, at the
cost of computing λ and a block sum per entry — no random number, no sort. The first chunk, visited while the pool
is not full yet, gives its k largest I their keys directly to set the first τ. ``top`` uses the same pool and
skips blocks whose largest I is below the pool's k-th. Embedding rows whose μ is 0 (tokens absent from the batch)
have zero importance and are never visited.

``strategy="dense"`` computes a key for every entry (the reference; also used under a budget): the same
distribution at a higher cost. A budget (`max_new`) caps how many drawn entries may lie outside the
already-changed set: the result is the top-k of the changed entries' keys together with the best `max_new` keys of
the others, which is successive sampling that stops taking new entries once the budget is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tracking import MeanFactor

CHUNK_ENTRIES = 1 << 20  # entries per chunk on a CPU: a chunk's buffer stays in cache
DEVICE_CHUNK_ENTRIES = 1 << 24  # on accelerators: fewer, larger kernels and host synchronisations
BLOCK_ENTRIES = 64  # entries per block: the first pass keeps each block's largest I and Σ I², then one Poisson count
SMALL_CHUNK_ENTRIES = 8192  # below this, a key per entry costs less than the thinning pass's fixed work
LOWER_BY = 16.0  # a round that ends with fewer than k keys above its threshold: the next one lowers it this much
STRATEGIES = ("fast", "dense")
NAN_MESSAGE = (
    "StocTuning: the importance of some entries is NaN (NaN weights, gradients or activations); skip such steps "
    "(e.g. with a gradient scaler) before the optimizer steps."
)


@dataclass
class Source:
    """One candidate tensor as the sampler sees it."""

    param: torch.Tensor
    grad: torch.Tensor | None
    means: list[MeanFactor]
    changed: torch.Tensor | None = None  # sorted flat indices already changed (only needed under a budget)

    @property
    def numel(self) -> int:
        return self.param.numel()


def row_chunks(shape: torch.Size, chunk_entries: int = CHUNK_ENTRIES):
    """Yield (first_row, last_row) ranges over dim 0 holding about `chunk_entries` entries each."""
    if len(shape) == 0:
        yield 0, 1
        return
    rows = shape[0]
    per_row = max(1, shape[1:].numel())
    step = max(1, chunk_entries // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """2-D (rows, rest) view of a parameter-shaped tensor; a scalar or vector has one entry per row."""
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def _mean_factor(source: Source, rows: slice | torch.Tensor) -> torch.Tensor | float | None:
    """μ of `rows` (a slice or row indices), broadcastable against those rows; None when μ is 1."""
    mu = None
    for vector, dim in source.means:
        if vector is None:
            term = 1.0
        elif dim == 0:
            term = (vector[rows] if isinstance(rows, slice) else vector.index_select(0, rows)).unsqueeze(1)
        else:
            term = vector.unsqueeze(0)
        mu = term if mu is None else mu + term
    return mu


def importance(source: Source, start: int, stop: int) -> torch.Tensor:
    """|μ ⊙ θ ⊙ g| for rows [start, stop) of a tensor, flattened, in float32."""
    value = _rows(source.param.detach())[start:stop].float() * _rows(source.grad)[start:stop]
    mu = _mean_factor(source, slice(start, stop))
    if mu is not None:
        value = value * mu
    return value.abs_().reshape(-1)


def _split_by_tensor(
    tensor: torch.Tensor, index: torch.Tensor, sources: list, values: torch.Tensor | None = None
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per source, the sorted flat indices whose tensor id is that source's position (and the `values` carried
    along with them, when given). `sources` only needs a length and, per entry, a `.param` for the device."""
    index, order = index.sort()
    tensor = tensor.index_select(0, order)
    tensor, second = tensor.sort(stable=True)
    index = index.index_select(0, second)
    counts = torch.bincount(tensor, minlength=len(sources)).tolist()
    parts = [part.to(s.param.device) for part, s in zip(index.split(counts), sources)]
    if values is None:
        return parts
    values = values.index_select(0, order).index_select(0, second)
    return parts, list(values.split(counts))


class _Pool:
    """The best `size` keys seen so far, with the (tensor, flat index) each belongs to.

    With `carry`, every key also carries a value (the gradient at its entry), so a draw made while gradients stream
    past keeps what the update needs once they are freed."""

    def __init__(self, size: int, device, carry: bool = False):
        self.size = size
        self.keys = torch.empty(0, device=device)
        self.tensor = torch.empty(0, dtype=torch.long, device=device)
        self.index = torch.empty(0, dtype=torch.long, device=device)
        self.values = torch.empty(0, device=device) if carry else None
        self._pending: list[tuple] = []
        self._pending_count = 0

    def offer_chunk(self, keys: torch.Tensor, tensor_id: int, offset: int, values: torch.Tensor | None = None) -> None:
        """Offer one chunk's keys (-inf = not eligible); keys below the current threshold are dropped unsorted.
        `values`: the chunk's carried values, aligned with `keys` (pools that carry values)."""
        if self.size == 0:
            return
        floor = float(self.keys.min()) if self.keys.numel() >= self.size else float("-inf")
        index = (keys > floor).nonzero().squeeze(1)
        if index.numel() > self.size:
            index = index[torch.topk(keys[index], self.size, sorted=False).indices]
        carried = None if values is None else values.index_select(0, index)
        self._add(keys[index], torch.full_like(index, tensor_id), index + offset, carried)

    def offer(
        self, keys: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None
    ) -> None:
        """Offer keys of entries (tensor ids, flat indices); merged in batches (see `flush`)."""
        if self.size == 0 or keys.numel() == 0:
            return
        self._pending.append((keys, tensor, index) if values is None else (keys, tensor, index, values))
        self._pending_count += keys.numel()
        # Merging costs a top-k over the pool: batch offers, at the price of a threshold that lags a little.
        if self._pending_count >= max(self.size // 4, 1024):
            self.flush()

    def flush(self) -> None:
        if self._pending:
            parts = [torch.cat(column) for column in zip(*self._pending)]
            self._pending.clear()
            self._pending_count = 0
            self._add(*parts)

    @property
    def full(self) -> bool:
        if self.keys.numel() < self.size <= self.keys.numel() + self._pending_count:
            self.flush()
        return self.keys.numel() >= self.size

    def threshold(self) -> float:
        """The smallest key kept once the pool is full (a lower bound of the final k-th key)."""
        return float(self.keys.min())

    def _add(
        self, keys: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None
    ) -> None:
        device = self.keys.device
        self.keys = torch.cat([self.keys, keys.to(device)])
        self.tensor = torch.cat([self.tensor, tensor.to(device)])
        self.index = torch.cat([self.index, index.to(device)])
        if self.values is not None:
            self.values = torch.cat([self.values, values.to(device=device, dtype=self.values.dtype)])
        if self.keys.numel() > self.size:
            self.keys, top = torch.topk(self.keys, self.size, sorted=False)
            self.tensor, self.index = self.tensor.index_select(0, top), self.index.index_select(0, top)
            if self.values is not None:
                self.values = self.values.index_select(0, top)

    def merged_with(self, other: _Pool, size: int | None = None) -> _Pool:
        """One pool of the best `size` (default: this pool's size) keys of both."""
        self.flush()
        other.flush()
        merged = _Pool(self.size if size is None else size, self.keys.device, carry=self.values is not None)
        values = None if self.values is None else torch.cat([self.values, other.values])
        merged._add(torch.cat([self.keys, other.keys]), torch.cat([self.tensor, other.tensor]),
                    torch.cat([self.index, other.index]), values)
        return merged

    def split(self, sources: list) -> list[torch.Tensor]:
        self.flush()
        return _split_by_tensor(self.tensor, self.index, sources)

    def split_with_values(self, sources: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per source: sorted flat indices and the values carried with them."""
        self.flush()
        return _split_by_tensor(self.tensor, self.index, sources, self.values)


@dataclass
class _Segment:
    """Rows of one tensor, laid out in a chunk's buffer from position `start`."""

    tensor_id: int
    source: Source
    rows: slice | torch.Tensor  # a range of rows, or the indices of the rows visited
    start: int
    size: int

    def load(self, out: torch.Tensor, scale: float) -> None:
        """Write θ ⊙ g ⊙ μ·scale of the rows to `out` (float32) — for scale 1, exactly as `importance` does."""
        param, grad = _rows(self.source.param.detach()), _rows(self.source.grad)
        if isinstance(self.rows, slice):
            theta, g = param[self.rows], grad[self.rows]
        else:
            theta, g = param.index_select(0, self.rows), grad.index_select(0, self.rows)
        value = out.view(theta.shape)
        torch.mul(theta if theta.dtype == torch.float32 else theta.float(), g, out=value)
        mu = _mean_factor(self.source, self.rows)
        factor = mu if scale == 1.0 else scale if mu is None else mu * scale
        if factor is not None:
            value.mul_(factor)

    @property
    def per_row(self) -> int:
        return _rows(self.source.param).shape[1]

    def flat_index(self, position: torch.Tensor) -> torch.Tensor:
        """Buffer positions inside this segment → flat indices in the tensor."""
        local = position - self.start
        per_row = self.per_row
        if isinstance(self.rows, slice):
            return local + self.rows.start * per_row
        return self.rows.index_select(0, local // per_row) * per_row + local % per_row

    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """Flat indices of the tensor → buffer positions, for those inside this segment."""
        per_row = self.per_row
        row = index // per_row
        if isinstance(self.rows, slice):
            inside = (row >= self.rows.start) & (row < self.rows.stop)
            return index.masked_select(inside) - self.rows.start * per_row + self.start
        slot = torch.searchsorted(self.rows, row).clamp_(max=self.rows.numel() - 1)
        inside = self.rows.index_select(0, slot) == row
        return self.start + slot.masked_select(inside) * per_row + (index % per_row).masked_select(inside)


def gather_gradients(segments: list[_Segment], tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gradient values (float32) at (tensor ids, flat indices) of the tensors laid out in `segments`."""
    if len(segments) == 1:
        return segments[0].source.grad.reshape(-1).index_select(0, index).float()
    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    for tensor_id, source in {s.tensor_id: s.source for s in segments}.items():
        inside = tensor == tensor_id
        out.masked_scatter_(inside, source.grad.reshape(-1).index_select(0, index.masked_select(inside)).float())
    return out


def _locate(segments: list[_Segment], local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer positions of a chunk → (tensor ids, flat indices in those tensors), for all its segments at once."""
    if len(segments) == 1:
        return torch.full_like(local, segments[0].tensor_id), segments[0].flat_index(local)
    device = local.device
    which = torch.searchsorted(torch.tensor([s.start for s in segments], device=device), local, right=True) - 1
    tensor = torch.tensor([s.tensor_id for s in segments], device=device).index_select(0, which)
    if all(isinstance(s.rows, slice) for s in segments):
        shift = torch.tensor([s.rows.start * s.per_row - s.start for s in segments], device=device)
        return tensor, local + shift.index_select(0, which)
    flat = torch.empty_like(local)
    for i in which.unique().tolist():
        inside = which == i
        flat.masked_scatter_(inside, segments[i].flat_index(local.masked_select(inside)))
    return tensor, flat


def _chunks(sources: list[Source], chunk_entries: int, ids: list[int] | None = None):
    """Lists of segments holding about `chunk_entries` entries: rows of a large tensor, or small tensors packed.
    `ids`: the tensor id of each source (default: its position).

    Tensors without a gradient are left out, and so are embedding rows whose μ is 0 in every factor (tokens absent
    from the batch): their importance is 0.
    """
    chunk, filled = [], 0
    for tensor_id, source in zip(range(len(sources)) if ids is None else ids, sources):
        if source.grad is None:
            continue
        for rows, size in _row_groups(source, chunk_entries):
            if filled and filled + size > chunk_entries:
                yield chunk
                chunk, filled = [], 0
            chunk.append(_Segment(tensor_id, source, rows, filled, size))
            filled += size
    if chunk:
        yield chunk


def _row_groups(source: Source, chunk_entries: int):
    """(rows, entries) groups of one tensor of at most about `chunk_entries` entries."""
    rows, per_row = _rows(source.param).shape
    step = max(1, chunk_entries // per_row)
    if rows > 1 and source.means and all(v is not None and d == 0 for v, d in source.means):
        live = (sum(v for v, _ in source.means) != 0).nonzero().squeeze(1)
        if live.numel() < rows // 2:
            for start in range(0, live.numel(), step):
                group = live[start : start + step]
                yield group, group.numel() * per_row
            return
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield slice(start, stop), (stop - start) * per_row


class _Thinning:
    """The fast exact draw (see the module docstring)."""

    def __init__(self, k: int, method: str, generator: torch.Generator, device, chunk_entries: int,
                 carry: bool = False):
        self.k = k
        self.top = method == "top"
        self.generator = generator
        self.pool = _Pool(k, device, carry=carry)
        self.chunk_entries = chunk_entries
        self._buffer = torch.empty(0, device=device)
        self._keyed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor ids, flat indices) given a key so far
        self.rounds = 0

    def run(self, sources: list[Source]) -> list[torch.Tensor]:
        chunks = list(_chunks(sources, self.chunk_entries))
        if chunks:
            stats = [self._block_stats(segments) for segments in chunks]
            # Hottest chunks first: the pool's k-th key, a threshold for every later chunk, then rises early.
            order = sorted(range(len(chunks)), key=lambda c: -float(stats[c][0].max()))
            chunks, stats = [chunks[c] for c in order], [stats[c] for c in order]
            if self.top:
                self._run_top(chunks, stats)
            else:
                self._run_stochastic(chunks, stats)
        return self.pool.split(sources)

    # -- the first pass ------------------------------------------------------------------------------------------
    def _load(self, segments: list[_Segment], scale: float) -> torch.Tensor:
        """θ ⊙ g ⊙ μ·scale of a chunk, zero-padded to whole blocks."""
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

    def _block_stats(self, segments: list[_Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block of `BLOCK_ENTRIES` entries of a chunk: the largest I, and Σ I² (float64).

        I² leaves float32's range for I below ~1e-19 or above ~1e19: the sums are taken of (I / the chunk's largest I)²
        and scaled back in float64, so the statistics are right at any magnitude."""
        blocks = self._load(segments, 1.0).abs_().view(-1, BLOCK_ENTRIES)
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
    def _run_top(self, chunks, stats) -> None:
        every = torch.cat([largest for largest, _ in stats])
        # The k-th largest block maximum: at least k entries reach it, so nothing below it can be drawn.
        floor = float(torch.topk(every, self.k).values[-1]) if every.numel() >= self.k else 0.0
        for segments, (largest, _) in zip(chunks, stats):
            reach = max(floor, self.pool.threshold()) if self.pool.full else floor
            if reach > 0:
                blocks = (largest >= reach).nonzero().squeeze(1)
                if blocks.numel() == 0:
                    continue
            buffer = self._load(segments, 1.0).abs_()  # exactly `importance`
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
        tensor, index = _locate(segments, local)
        self.pool.offer(keys, tensor, index, self._carried(segments, tensor, index))

    # -- stochastic ----------------------------------------------------------------------------------------------
    def _run_stochastic(self, chunks, stats) -> None:
        threshold = self._first_threshold(torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats]))
        self.rounds = 1
        for segments, (largest, mass) in zip(chunks, stats):
            if threshold is None:
                self._visit_dense(segments, 0.0, math.inf, None)
            else:
                self._visit(segments, largest, mass, threshold)
        self.pool.flush()
        previous = math.inf
        # Every key ≥ threshold has been generated; done once k of them are. If not (unlucky), lower the
        # threshold and generate the keys in between.
        while threshold and not (self.pool.full and self.pool.threshold() >= 0.5 * math.log(threshold)):
            previous, threshold = threshold, threshold / LOWER_BY if self.rounds < 8 else 0.0
            self.rounds += 1
            keyed = self._keyed_by_tensor()
            for segments in chunks:
                self._visit_dense(segments, threshold, previous, keyed)
            self.pool.flush()

    def _keyed_by_tensor(self) -> dict[int, torch.Tensor]:
        if not self._keyed:
            return {}
        tensor, index = (torch.cat(parts) for parts in zip(*self._keyed))
        return {t: index.masked_select(tensor == t) for t in tensor.unique().tolist()}

    def _rate_scale(self, threshold: float, previous: float) -> float | None:
        """s with λ = (s·I)² = I²/x - I²/previous, x the larger of `threshold` and the pool's k-th key (as I²/E);
        0 when nothing in this round can beat x, None when there is no x yet or s is out of float32's range."""
        if self.pool.full:
            threshold = max(threshold, math.exp(min(2 * self.pool.threshold(), 700.0)))
        if threshold <= 0:
            return None
        if threshold >= previous:
            return 0.0
        squared = 1.0 / threshold - 1.0 / previous
        scale = math.sqrt(squared) if squared > 0 else 0.0
        return scale if 1e-30 < scale < 1e30 else None

    def _visit(self, segments, largest: torch.Tensor, mass: torch.Tensor, threshold: float) -> None:
        """First round: rates per block from the first pass; λ is only looked at in blocks that need it."""
        scale = self._rate_scale(threshold, math.inf)
        if scale is None:
            return self._visit_dense(segments, threshold, math.inf, None)
        heavy = largest >= 1.0 / scale  # blocks holding an entry with λ ≥ 1
        rates = (mass.double() * scale**2).masked_fill_(heavy, 0.0)
        expected = float(heavy.sum() + rates.sum())
        if math.isnan(expected):
            raise ValueError(NAN_MESSAGE)
        if expected > self.k:
            return self._visit_dense(segments, threshold, math.inf, None)  # far too many keys: raise x first
        counts = self._poisson(rates)
        hit = counts.nonzero().squeeze(1)
        heavy = heavy.nonzero().squeeze(1)
        if hit.numel() == 0 and heavy.numel() == 0:
            return
        blocks = torch.cat([heavy, hit])
        rate = self._load(segments, scale).view(-1, BLOCK_ENTRIES).index_select(0, blocks).square_()
        counts = counts.index_select(0, hit)
        if heavy.numel():
            counts = torch.cat([self._sure(segments, heavy, rate[: heavy.numel()], scale, math.inf), counts])
        self._land(segments, blocks, rate, counts, scale, math.inf)

    def _sure(self, segments, blocks: torch.Tensor, rate: torch.Tensor, scale: float, previous: float) -> torch.Tensor:
        """Entries with λ ≥ 1 in `blocks` (rows of `rate`, λ = (scale·I)²) get a key directly and leave the
        thinning; returns the Poisson counts of what is left of each block."""
        sure = rate >= 1.0
        block, col = sure.nonzero().unbind(1)
        local = blocks.index_select(0, block) * BLOCK_ENTRIES + col
        self._offer(segments, local, rate.masked_select(sure), scale=scale, previous=previous)
        rate.masked_fill_(sure, 0.0)
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

    def _land(self, segments, blocks, rate: torch.Tensor, counts: torch.Tensor, scale: float, previous: float) -> None:
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
        self._offer(segments, local, lam, scale=scale, hit=True, previous=previous)

    def _visit_dense(self, segments, threshold: float, previous: float, keyed) -> None:
        """λ of every entry of the chunk: before there is any threshold, in later rounds, and as a fallback."""
        scale = self._rate_scale(threshold, previous)
        if scale == 0.0:
            return
        last = segments[-1]
        if scale is None and (self.pool.full or threshold > 0) or last.start + last.size <= SMALL_CHUNK_ENTRIES:
            # Keys for every entry: small chunks, and thresholds out of float32's range.
            buffer = self._load(segments, 1.0)
            self._exclude(segments, buffer, keyed)
            local = buffer.nonzero().squeeze(1)
            return self._offer(segments, local, buffer.index_select(0, local), previous=previous)
        buffer = self._load(segments, 1.0 if scale is None else scale)
        self._exclude(segments, buffer, keyed)
        if scale is None:
            # No threshold yet: the chunk's k largest I get keys directly and set one.
            self._direct_top_k(segments, buffer, None, previous)
            scale = self._rate_scale(threshold, previous)
            if not scale:
                local = buffer.nonzero().squeeze(1)
                return self._offer(segments, local, buffer.index_select(0, local), previous=previous)
            buffer.mul_(scale)
        rate = buffer.square_().view(-1, BLOCK_ENTRIES)
        heavy = rate.amax(1) >= 1.0
        expected = float(heavy.sum() + rate.sum(1).masked_fill_(heavy, 0.0).sum())
        if math.isnan(expected):
            raise ValueError(NAN_MESSAGE)
        if expected > self.k:
            # The threshold is far below this chunk's keys: its k largest get keys directly, which raises it.
            self._direct_top_k(segments, buffer, scale, previous)
            new_scale = self._rate_scale(threshold, previous)
            if not new_scale:
                local = buffer.nonzero().squeeze(1)
                return self._offer(segments, local, buffer.index_select(0, local), scale=scale, previous=previous)
            buffer.mul_((new_scale / scale) ** 2)
            scale = new_scale
            heavy = rate.amax(1) >= 1.0
        heavy = heavy.nonzero().squeeze(1)
        counts = self._poisson(rate.sum(1, dtype=torch.float64).index_fill_(0, heavy, 0.0))
        if heavy.numel():
            part = rate.index_select(0, heavy)
            counts.index_copy_(0, heavy, self._sure(segments, heavy, part, scale, previous))
            rate.index_copy_(0, heavy, part)
        self._land(segments, torch.arange(rate.shape[0], device=rate.device), rate, counts, scale, previous)

    def _direct_top_k(self, segments, values: torch.Tensor, scale: float | None, previous: float) -> None:
        """Keys for the chunk's k entries of largest `values` (I, or λ = (scale·I)²); they leave the thinning."""
        first = torch.topk(values.abs(), min(self.k, values.numel()), sorted=False).indices
        chosen = values.index_select(0, first)
        nonzero = chosen != 0
        first = first.masked_select(nonzero)
        self._offer(segments, first, chosen.masked_select(nonzero), scale=scale, previous=previous)
        values.index_fill_(0, first, 0.0)

    def _exclude(self, segments, buffer: torch.Tensor, keyed) -> None:
        """Zero the entries that already have a key (from an earlier round)."""
        if not keyed:
            return
        for segment in segments:
            index = keyed.get(segment.tensor_id)
            if index is not None:
                buffer.index_fill_(0, segment.positions(index), 0.0)

    def _offer(self, segments, local: torch.Tensor, values: torch.Tensor, scale: float | None = None,
               hit: bool = False, previous: float = math.inf) -> None:
        """Offer buffer positions `local` to the pool with the key log I - ½ log E, E ~ Exp(1) conditioned on
        E > I²/previous (keys of earlier rounds were below `previous`) and, for entries the thinning hit, on
        beating the threshold: E ≤ I²/previous + λ. `values`: the entries' I (`scale` None) or λ = (scale·I)².

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
        if previous < math.inf:
            exp += magnitude.double().square() / previous  # memorylessness of Exp(1)
        keys = magnitude.log_().sub_(exp.log_().mul_(0.5).to(magnitude.dtype))
        tensor, index = _locate(segments, local)
        self._keyed.append((tensor, index))
        self.pool.offer(keys, tensor, index, self._carried(segments, tensor, index))

    def _carried(self, segments, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The gradients at the offered entries, for a pool that carries them."""
        if self.pool.values is None:
            return None
        return gather_gradients(segments, tensor, index)


def _draw_uniform(sources: list[Source], k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """k distinct entries uniformly: the first k distinct values of a stream of uniform indices."""
    device = sources[0].param.device
    sizes = torch.tensor([s.numel for s in sources], device=device)
    ends = sizes.cumsum(0)
    total = int(ends[-1])
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < k:
        more = torch.randint(total, (k - chosen.numel() + 64,), generator=generator, device=device)
        stream = torch.cat([chosen, more])
        values, inverse = torch.unique(stream, return_inverse=True)
        first = torch.full_like(values, stream.numel()).scatter_reduce_(
            0, inverse, torch.arange(stream.numel(), device=device), "amin")
        chosen = values[first.argsort()]
    chosen = chosen[:k]
    tensor = torch.searchsorted(ends, chosen, right=True)
    local = chosen - (ends - sizes).index_select(0, tensor)
    return _split_by_tensor(tensor, local, sources)


def _chunk_keys(source: Source, start: int, stop: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """Sort keys of rows [start, stop) of one source; -inf marks entries that may not be drawn."""
    n = (stop - start) * (max(1, source.param.shape[1:].numel()) if source.param.dim() else 1)
    device = source.param.device
    if method == "random":
        return torch.rand(n, device=device, generator=generator)
    if source.grad is None:
        weight = torch.zeros(n, device=device)
    else:
        weight = importance(source, start, stop)
    if method == "fill":
        # Uniform keys for the zero-importance entries only.
        return torch.rand(n, device=device, generator=generator).masked_fill_(weight > 0, float("-inf"))
    if method == "top":
        return weight.masked_fill_(weight == 0, float("-inf"))
    # log I - ½ log E with E ~ Exp(1): the top-k of these is successive sampling ∝ I² (Efraimidis–Spirakis).
    exp = torch.empty_like(weight).exponential_(generator=generator)
    return weight.log_().sub_(exp.log_().mul_(0.5))


def _membership(sorted_index: torch.Tensor | None, offset: int, n: int, device) -> torch.Tensor:
    """Boolean mask over [offset, offset + n) of the positions listed in `sorted_index`."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if sorted_index is not None and sorted_index.numel():
        local = sorted_index.to(device) - offset
        mask[local[(local >= 0) & (local < n)]] = True
    return mask


def _draw_pass(
    sources: list[Source],
    k: int,
    method: str,
    generator: torch.Generator,
    max_new: int | None,
    chunk_entries: int,
    exclude: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    device = sources[0].param.device
    pool = _Pool(k, device)  # without a budget: every entry; with one: the already-changed entries
    new_pool = _Pool(0 if max_new is None else min(k, max(0, max_new)), device)
    for tensor_id, source in enumerate(sources):
        if source.grad is None and method in ("stochastic", "top"):
            continue  # no gradient, no importance: nothing to draw here in the first pass
        per_row = max(1, source.param.shape[1:].numel()) if source.param.dim() else 1
        for start, stop in row_chunks(source.param.shape, chunk_entries):
            offset = start * per_row
            keys = _chunk_keys(source, start, stop, method, generator)
            if exclude is not None:
                keys.masked_fill_(_membership(exclude[tensor_id], offset, keys.numel(), keys.device), float("-inf"))
            if max_new is None:
                pool.offer_chunk(keys, tensor_id, offset)
                continue
            is_old = _membership(source.changed, offset, keys.numel(), keys.device)
            pool.offer_chunk(keys.masked_fill(~is_old, float("-inf")), tensor_id, offset)
            new_pool.offer_chunk(keys.masked_fill_(is_old, float("-inf")), tensor_id, offset)
    return pool.merged_with(new_pool).split(sources)


def draw(
    sources: list[Source],
    k: int,
    method: str,
    generator: torch.Generator,
    max_new: int | None = None,
    chunk_entries: int | None = None,
    strategy: str = "fast",
) -> list[torch.Tensor]:
    """Draw k entries over all `sources`; returns the sorted flat indices drawn in each source.

    `max_new` (optional) caps the drawn entries outside each source's `changed` set. `strategy="dense"` computes
    a key for every entry instead of thinning (same distribution, slower); a budget always uses it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    device = sources[0].param.device
    if chunk_entries is None:
        chunk_entries = CHUNK_ENTRIES if device.type == "cpu" else DEVICE_CHUNK_ENTRIES
    if max_new is not None or strategy == "dense":
        drawn = _draw_pass(sources, k, method, generator, max_new, chunk_entries)
    elif method == "random":
        drawn = _draw_uniform(sources, k, generator)
    else:
        drawn = _Thinning(k, method, generator, device, chunk_entries).run(sources)
    count = sum(d.numel() for d in drawn)
    if count < k and method != "random":
        # Fewer than k entries have non-zero importance: fill the rest uniformly from the zero-importance entries.
        remaining_new = None if max_new is None else max_new - _count_new(sources, drawn)
        fill = _draw_pass(sources, k - count, "fill", generator, remaining_new, chunk_entries, exclude=drawn)
        drawn = [torch.cat([a, b]).sort().values for a, b in zip(drawn, fill)]
    return drawn


def _count_new(sources: list[Source], drawn: list[torch.Tensor]) -> int:
    """How many drawn entries lie outside the sources' `changed` sets."""
    total = 0
    for source, idx in zip(sources, drawn):
        if source.changed is None:
            total += idx.numel()
        else:
            total += int((~torch.isin(idx, source.changed.to(idx.device))).sum())
    return total
