"""The global draw of k entries over all candidate tensors, by method and strategy.

Importance of an entry is I = |μ ⊙ θ ⊙ g| (`importance`). The draw picks k entries of the whole model at once:

* ``stochastic``: successive sampling without replacement with probability ∝ I² — the distribution of
  ``numpy.random.choice(n, k, replace=False, p=I²/ΣI²)``. It is the top-k of the keys ``log I - ½·log E`` with
  E ~ Exp(1) (Efraimidis–Spirakis, equivalent to Gumbel-top-k).
* ``top``: the k largest I.
* ``random``: k entries uniformly at random.

Entries of zero importance are never drawn by ``stochastic`` / ``top`` unless fewer than k entries have non-zero
importance; the remainder is then filled uniformly from the zero-importance entries.

``strategy="fast"`` (the default) gives keys only to the entries that can win (`thinning`); ``strategy="dense"``
computes a key for every entry (the reference; also used under a budget): the same distribution at a higher cost.
A budget (`max_new`) caps how many drawn entries may lie outside the already-changed set: the result is the top-k
of the changed entries' keys together with the best `max_new` keys of the others, which is successive sampling
that stops taking new entries once the budget is spent.
"""

from __future__ import annotations

import hashlib

import torch

from .importance import Source, chunk_entries_for, importance, row_chunks
from .key_pool import KeyPool, split_by_tensor
from .thinning import Thinning

STRATEGIES = ("fast", "dense")


def draw_uniform(sources: list[Source], k: int, generator: torch.Generator) -> list[torch.Tensor]:
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
            0, inverse, torch.arange(stream.numel(), device=device), "amin"
        )
        chosen = values[first.argsort()]
    chosen = chosen[:k]
    tensor = torch.searchsorted(ends, chosen, right=True)
    local = chosen - (ends - sizes).index_select(0, tensor)
    return split_by_tensor(tensor, local, sources)


def chunk_keys(source: Source, start: int, stop: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """Sort keys of rows [start, stop) of one source; -inf marks entries that may not be drawn."""
    n = (stop - start) * (max(1, source.param.shape[1:].numel()) if source.param.dim() else 1)
    device = source.param.device
    if method == "random":
        return torch.rand(n, device=device, generator=generator)
    if source.grad is None:
        weight = torch.zeros(n, device=device)
    else:
        weight = importance(source, slice(start, stop))
    if method == "fill":
        # Uniform keys for the zero-importance entries only.
        return torch.rand(n, device=device, generator=generator).masked_fill_(weight > 0, float("-inf"))
    if method == "top":
        return weight.masked_fill_(weight == 0, float("-inf"))
    # log I - ½ log E with E ~ Exp(1): the top-k of these is successive sampling ∝ I² (Efraimidis–Spirakis).
    exp = torch.empty_like(weight).exponential_(generator=generator)
    return weight.log_().sub_(exp.log_().mul_(0.5))


def membership(sorted_index: torch.Tensor | None, offset: int, n: int, device) -> torch.Tensor:
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
    pool = KeyPool(k, device)  # without a budget: every entry; with one: the already-changed entries
    new_pool = KeyPool(0 if max_new is None else min(k, max(0, max_new)), device)
    for tensor_id, source in enumerate(sources):
        if source.grad is None and method in ("stochastic", "top"):
            continue  # no gradient, no importance: nothing to draw here in the first pass
        per_row = max(1, source.param.shape[1:].numel()) if source.param.dim() else 1
        for start, stop in row_chunks(source.param.shape, chunk_entries):
            offset = start * per_row
            keys = chunk_keys(source, start, stop, method, generator)
            if exclude is not None:
                keys.masked_fill_(membership(exclude[tensor_id], offset, keys.numel(), keys.device), float("-inf"))
            if max_new is None:
                pool.offer_chunk(keys, tensor_id, offset)
                continue
            is_old = membership(source.changed, offset, keys.numel(), keys.device)
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
        chunk_entries = chunk_entries_for(device)
    if max_new is not None or strategy == "dense":
        drawn = _draw_pass(sources, k, method, generator, max_new, chunk_entries)
    elif method == "random":
        drawn = draw_uniform(sources, k, generator)
    else:
        drawn = Thinning(k, method, generator, device, chunk_entries).run(sources)
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


def step_seed(seed: int, step: int, rank: int | None = None) -> int:
    """The seed of draw number `step`: the draws of a run depend only on (seed, step), so a run resumed at any step
    continues with the draws an uninterrupted run would make. `rank`: the independent stream of one process drawing
    over its FSDP2 shards."""
    digest = hashlib.blake2b(f"{seed}:{step}{'' if rank is None else f':{rank}'}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
