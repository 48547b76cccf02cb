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

CHUNK_ENTRIES = 1 << 20  # entries per chunk: bounds the temporary memory of a draw to a few MB
BLOCK_ENTRIES = 1024  # entries per block of the thinning pass: one Poisson count per block
SMALL_CHUNK_ENTRIES = 8192  # below this, a key per entry costs less than the thinning pass's fixed work
STRATEGIES = ("fast", "dense")


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


def importance_at(source: Source, index: torch.Tensor) -> torch.Tensor:
    """|μ ⊙ θ ⊙ g| at flat indices `index`, computed exactly as `importance` computes it."""
    param = _rows(source.param.detach())
    row, col = index // param.shape[1], index % param.shape[1]
    value = _gather(param, index, row, col).float() * _gather(_rows(source.grad), index, row, col)
    mu = None
    for vector, dim in source.means:
        term = 1.0 if vector is None else vector.index_select(0, row if dim == 0 else col)
        mu = term if mu is None else mu + term
    if mu is not None:
        value = value * mu
    return value.abs_()


def _gather(tensor: torch.Tensor, index: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """`tensor` (2-D) at flat `index` (= row, col). index_select: advanced indexing is slow on busy CPUs."""
    if tensor.is_contiguous():
        return tensor.view(-1).index_select(0, index)
    return tensor[row, col]  # e.g. an expanded tensor, which has no flat view


def _split_by_tensor(tensor: torch.Tensor, index: torch.Tensor, sources: list[Source]) -> list[torch.Tensor]:
    """Per source, the sorted flat indices whose tensor id is that source's position."""
    index, order = index.sort()
    tensor = tensor.index_select(0, order)
    tensor, order = tensor.sort(stable=True)
    index = index.index_select(0, order)
    counts = torch.bincount(tensor, minlength=len(sources)).tolist()
    return [part.to(s.param.device) for part, s in zip(index.split(counts), sources)]


class _Pool:
    """The best `size` keys seen so far, with the (tensor, flat index) each belongs to."""

    def __init__(self, size: int, device):
        self.size = size
        self.keys = torch.empty(0, device=device)
        self.tensor = torch.empty(0, dtype=torch.long, device=device)
        self.index = torch.empty(0, dtype=torch.long, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_count = 0

    def offer_chunk(self, keys: torch.Tensor, tensor_id: int, offset: int) -> None:
        """Offer one chunk's keys (-inf = not eligible); keys below the current threshold are dropped unsorted."""
        if self.size == 0:
            return
        floor = float(self.keys.min()) if self.keys.numel() >= self.size else float("-inf")
        index = (keys > floor).nonzero().squeeze(1)
        if index.numel() > self.size:
            index = index[torch.topk(keys[index], self.size, sorted=False).indices]
        self._add(keys[index], torch.full_like(index, tensor_id), index + offset)

    def offer(self, keys: torch.Tensor, tensor_id: int, index: torch.Tensor) -> None:
        """Offer keys of the flat `index` entries of one tensor; merged in batches (see `flush`)."""
        if self.size == 0 or keys.numel() == 0:
            return
        self._pending.append((keys, torch.full_like(index, tensor_id), index))
        self._pending_count += keys.numel()
        # Merging costs a top-k over the pool: batch offers, at the price of a threshold that lags a little.
        if self._pending_count >= max(self.size // 4, 1024) or self.keys.numel() < self.size:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            keys, tensor, index = (torch.cat(parts) for parts in zip(*self._pending))
            self._pending.clear()
            self._pending_count = 0
            self._add(keys, tensor, index)

    @property
    def full(self) -> bool:
        return self.keys.numel() >= self.size

    def threshold(self) -> float:
        """The smallest key kept once the pool is full (a lower bound of the final k-th key)."""
        return float(self.keys.min())

    def _add(self, keys: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor) -> None:
        device = self.keys.device
        self.keys = torch.cat([self.keys, keys.to(device)])
        self.tensor = torch.cat([self.tensor, tensor.to(device)])
        self.index = torch.cat([self.index, index.to(device)])
        if self.keys.numel() > self.size:
            self.keys, top = torch.topk(self.keys, self.size, sorted=False)
            self.tensor, self.index = self.tensor.index_select(0, top), self.index.index_select(0, top)

    def merged_with(self, other: _Pool) -> _Pool:
        merged = _Pool(self.size, self.keys.device)
        merged._add(torch.cat([self.keys, other.keys]), torch.cat([self.tensor, other.tensor]),
                    torch.cat([self.index, other.index]))
        return merged

    def split(self, sources: list[Source]) -> list[torch.Tensor]:
        self.flush()
        return _split_by_tensor(self.tensor, self.index, sources)


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

    def flat_index(self, position: torch.Tensor) -> torch.Tensor:
        """Buffer positions inside this segment → flat indices in the tensor."""
        local = position - self.start
        per_row = _rows(self.source.param).shape[1]
        if isinstance(self.rows, slice):
            return local + self.rows.start * per_row
        return self.rows.index_select(0, local // per_row) * per_row + local % per_row


def _chunks(sources: list[Source], chunk_entries: int):
    """Lists of segments holding about `chunk_entries` entries: rows of a large tensor, or small tensors packed.

    Tensors without a gradient are left out, and so are embedding rows whose μ is 0 in every factor (tokens absent
    from the batch): their importance is 0.
    """
    chunk, filled = [], 0
    for tensor_id, source in enumerate(sources):
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
    """The fast exact draw (see the module docstring): one pass computing λ per entry, keys only where needed."""

    def __init__(self, k: int, method: str, generator: torch.Generator, device, chunk_entries: int):
        self.k = k
        self.top = method == "top"
        self.generator = generator
        self.pool = _Pool(k, device)
        self.chunk_entries = chunk_entries
        self._buffer = torch.empty(0, device=device)

    def run(self, sources: list[Source]) -> list[torch.Tensor]:
        for segments in _chunks(sources, self.chunk_entries):
            self.segments = segments
            self._starts = None
            if self.top:
                self._visit_top()
            else:
                self._visit_stochastic()
        return self.pool.split(sources)

    def _scale(self) -> float | None:
        """1/σ with λ = (I/σ)² for a full pool; None if σ is out of float32's range (keys are then drawn directly)."""
        tau = self.pool.threshold()
        sigma = tau if self.top else math.exp(tau) if tau < 88.0 else math.inf
        scale = 1.0 / sigma if sigma > 0 else math.inf
        return scale if 0.0 < scale < 1e30 else None

    def _load(self, scale: float) -> torch.Tensor:
        """θ ⊙ g ⊙ μ·scale of the chunk, zero-padded to whole blocks."""
        last = self.segments[-1]
        used = last.start + last.size
        size = -(-used // BLOCK_ENTRIES) * BLOCK_ENTRIES
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, device=self._buffer.device)
        buffer = self._buffer[:size]
        buffer[used:].zero_()
        for segment in self.segments:
            segment.load(buffer[segment.start : segment.start + segment.size], scale)
        return buffer

    def _visit_top(self) -> None:
        buffer = self._load(1.0).abs_()  # exactly `importance`
        floor = self.pool.threshold() if self.pool.full else 0.0
        by_block = buffer.view(-1, BLOCK_ENTRIES)
        heavy = (by_block.amax(1) >= floor).nonzero().squeeze(1) if floor > 0 else None
        if heavy is None or heavy.numel() * BLOCK_ENTRIES > self.k:
            local = torch.topk(buffer, min(self.k, buffer.numel()), sorted=False).indices
        else:
            # Only blocks whose largest I reaches the pool's k-th can contribute.
            block, col = (by_block.index_select(0, heavy) >= floor).nonzero().unbind(1)
            local = heavy.index_select(0, block) * BLOCK_ENTRIES + col
        keys = buffer.index_select(0, local)
        keep = keys >= floor if floor > 0 else keys > 0
        self._offer(local.masked_select(keep), keys=keys.masked_select(keep))

    def _direct_top_k(self, rate: torch.Tensor) -> None:
        """Keys for the chunk's k entries of largest rate, drawn freely; they leave the thinning pass."""
        first = torch.topk(rate.abs(), min(self.k, rate.numel()), sorted=False).indices
        first = first.masked_select(rate.index_select(0, first) != 0)
        self._offer(first)
        rate.index_fill_(0, first, 0.0)

    def _direct_all(self) -> None:
        """Keys for every entry of the chunk (the dense way): for small chunks, and σ out of float32's range."""
        buffer = self._load(1.0)
        local = buffer.nonzero().squeeze(1)
        magnitude = buffer.index_select(0, local).abs_()
        exp = torch.empty_like(magnitude).exponential_(generator=self.generator)
        self._offer(local, keys=magnitude.log_().sub_(exp.log_().mul_(0.5)))

    def _visit_stochastic(self) -> None:
        scale = self._scale() if self.pool.full else 1.0
        last = self.segments[-1]
        if scale is None or last.start + last.size <= SMALL_CHUNK_ENTRIES:
            return self._direct_all()
        buffer = self._load(scale)
        if not self.pool.full:
            # Nothing to compare with yet: this chunk's k largest I get keys directly and set τ.
            self._direct_top_k(buffer)
            if not self.pool.full:
                return  # everything left has zero importance
            scale = self._scale()
            if scale is None:
                return self._offer(buffer.nonzero().squeeze(1))
            buffer.mul_(scale)
        buffer.square_()  # λ = I²/σ²: an entry beats the pool's k-th key with probability 1 - exp(-λ)
        by_block = buffer.view(-1, BLOCK_ENTRIES)
        rates = by_block.sum(1)
        total = float(rates.sum())
        if math.isnan(total):
            raise ValueError("StocTuning: the importance of some entries is NaN (NaN weights, gradients or "
                             "activations); skip such steps (e.g. with a gradient scaler) before the optimizer steps.")
        if total > self.k:
            # τ is far below this chunk's keys: its k largest get keys directly first, which raises τ.
            self._direct_top_k(buffer)
            new_scale = self._scale()
            if new_scale is None:
                return self._offer(buffer.nonzero().squeeze(1))
            buffer.mul_((new_scale / scale) ** 2)
            rates = by_block.sum(1)
        heavy = (rates >= 1.0).nonzero().squeeze(1)
        if heavy.numel():
            # Blocks that may hold an entry with λ ≥ 1: such entries get their key directly.
            part = by_block.index_select(0, heavy)
            sure = part >= 1.0
            block, col = sure.nonzero().unbind(1)
            self._offer(heavy.index_select(0, block) * BLOCK_ENTRIES + col)
            part.masked_fill_(sure, 0.0)
            by_block.index_copy_(0, heavy, part)
            rates.index_copy_(0, heavy, part.sum(1))
        # Entries with λ < 1: the ones hit by a Poisson process of rate λ are exactly those whose key beats τ.
        counts = torch.poisson(rates, generator=self.generator)
        hit = counts.nonzero().squeeze(1)
        if hit.numel() == 0:
            return
        counts = counts.index_select(0, hit).long()
        points = torch.multinomial(by_block.index_select(0, hit), int(counts.max()), replacement=True,
                                   generator=self.generator)
        landed = torch.arange(points.shape[1], device=points.device) < counts.unsqueeze(1)
        local = (hit.unsqueeze(1) * BLOCK_ENTRIES + points).masked_select(landed).unique()
        self._offer(local, rate=buffer.index_select(0, local))

    def _offer(self, local: torch.Tensor, keys=None, rate=None) -> None:
        """Offer buffer positions `local` to the pool: with their `keys` (top), with a key drawn freely, or with
        a key drawn to beat τ (`rate`: their λ)."""
        if local.numel() == 0:
            return
        if len(self.segments) == 1:
            groups = [(self.segments[0], None)]
        else:
            if self._starts is None:
                self._starts = torch.tensor([s.start for s in self.segments], device=local.device)
            which = torch.searchsorted(self._starts, local, right=True) - 1
            groups = [(self.segments[i], which == i) for i in which.unique().tolist()]
        for segment, mask in groups:
            position = local if mask is None else local.masked_select(mask)
            index = segment.flat_index(position)
            if keys is not None:
                part = keys if mask is None else keys.masked_select(mask)
            else:
                part = importance_at(segment.source, index)
                if rate is None:
                    exp = torch.empty_like(part).exponential_(generator=self.generator)
                else:
                    # E ~ Exp(1) conditioned on E ≤ λ (inverse CDF): the key log I - ½ log E then beats τ.
                    lam = (rate if mask is None else rate.masked_select(mask)).double()
                    uniform = torch.rand(lam.shape, dtype=torch.float64, device=lam.device, generator=self.generator)
                    exp = (-torch.log1p(uniform * torch.expm1(-lam))).to(part.dtype)
                part = part.log_().sub_(exp.log_().mul_(0.5))
            self.pool.offer(part, segment.tensor_id, index)


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
    chunk_entries: int = CHUNK_ENTRIES,
    strategy: str = "fast",
) -> list[torch.Tensor]:
    """Draw k entries over all `sources`; returns the sorted flat indices drawn in each source.

    `max_new` (optional) caps the drawn entries outside each source's `changed` set. `strategy="dense"` computes
    a key for every entry instead of thinning (same distribution, slower); a budget always uses it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    device = sources[0].param.device
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
