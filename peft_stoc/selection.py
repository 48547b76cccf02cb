"""Importance and the global draw: pure functions on tensors.

Importance of an entry is I = |μ ⊙ θ ⊙ g|. The draw picks k entries of the whole model at once:

* ``stochastic``: successive sampling without replacement with probability ∝ I² — the distribution of
  ``numpy.random.choice(n, k, replace=False, p=I²/ΣI²)``. It is computed exactly as the top-k of the keys
  ``log I - ½·log E`` with E ~ Exp(1) (Efraimidis–Spirakis, equivalent to Gumbel-top-k).
* ``top``: the k largest I.
* ``random``: k entries uniformly at random.

Entries of zero importance are never drawn by ``stochastic`` / ``top`` unless fewer than k entries have non-zero
importance; the remainder is then filled uniformly from the zero-importance entries.

Tensors are visited in row chunks and the best keys kept in a running pool of size k, so memory stays bounded by
a chunk plus the pool, and a chunk's keys below the pool's current threshold are discarded before any sort.
A budget (`max_new`) caps how many drawn entries may lie outside the already-changed set: the result is the top-k
of the changed entries' keys together with the best `max_new` keys of the others, which is successive sampling
that stops taking new entries once the budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tracking import MeanFactor

CHUNK_ENTRIES = 1 << 20  # entries per chunk: bounds the temporary memory of a draw to a few MB


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


def importance(source: Source, start: int, stop: int) -> torch.Tensor:
    """|μ ⊙ θ ⊙ g| for rows [start, stop) of a tensor, flattened, in float32."""
    value = _rows(source.param.detach())[start:stop].float() * _rows(source.grad)[start:stop]
    mu = None
    for vector, dim in source.means:
        if vector is None:
            term = 1.0
        elif dim == 0:
            term = vector[start:stop].unsqueeze(1)
        else:
            term = vector.unsqueeze(0)
        mu = term if mu is None else mu + term
    if mu is not None:
        value = value * mu
    return value.abs_().reshape(-1)


class _Pool:
    """The best `size` keys seen so far, with the (tensor, flat index) each belongs to."""

    def __init__(self, size: int, device):
        self.size = size
        self.keys = torch.empty(0, device=device)
        self.tensor = torch.empty(0, dtype=torch.long, device=device)
        self.index = torch.empty(0, dtype=torch.long, device=device)

    def offer_chunk(self, keys: torch.Tensor, tensor_id: int, offset: int) -> None:
        """Offer one chunk's keys (-inf = not eligible); keys below the current threshold are dropped unsorted."""
        if self.size == 0:
            return
        floor = float(self.keys.min()) if self.keys.numel() >= self.size else float("-inf")
        index = (keys > floor).nonzero().squeeze(1)
        if index.numel() > self.size:
            index = index[torch.topk(keys[index], self.size, sorted=False).indices]
        self._add(keys[index], torch.full_like(index, tensor_id), index + offset)

    def _add(self, keys: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor) -> None:
        device = self.keys.device
        self.keys = torch.cat([self.keys, keys.to(device)])
        self.tensor = torch.cat([self.tensor, tensor.to(device)])
        self.index = torch.cat([self.index, index.to(device)])
        if self.keys.numel() > self.size:
            self.keys, top = torch.topk(self.keys, self.size, sorted=False)
            self.tensor, self.index = self.tensor[top], self.index[top]

    def merged_with(self, other: _Pool) -> _Pool:
        merged = _Pool(self.size, self.keys.device)
        merged._add(torch.cat([self.keys, other.keys]), torch.cat([self.tensor, other.tensor]),
                    torch.cat([self.index, other.index]))
        return merged

    def split(self, sources: list[Source]) -> list[torch.Tensor]:
        return [self.index[self.tensor == t].sort().values.to(s.param.device) for t, s in enumerate(sources)]


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
) -> list[torch.Tensor]:
    """Draw k entries over all `sources`; returns the sorted flat indices drawn in each source.

    `max_new` (optional) caps the drawn entries outside each source's `changed` set.
    """
    drawn = _draw_pass(sources, k, method, generator, max_new, chunk_entries)
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
