"""The global draw of k entries over all candidate tensors, by method and strategy.

Importance of an entry is I = |μ ⊙ θ ⊙ g| (`importance`). The draw picks k entries of the whole model at once:

* ``stochastic``: successive sampling without replacement with probability ∝ I² — the distribution of
  ``numpy.random.choice(n, k, replace=False, p=I²/ΣI²)``. It is the top-k of the keys ``log I - ½·log E`` with
  E ~ Exp(1) (Efraimidis–Spirakis, equivalent to Gumbel-top-k).
* ``top``: the k largest I.
* ``random``: k entries uniformly at random: the k smallest E.

Entries of zero importance are never drawn by ``stochastic`` / ``top`` unless fewer than k entries have non-zero
importance; the remainder is then filled uniformly from the zero-importance entries (their k' smallest E).

E is a function of (seed, step, entry) alone (`entry_keys`): the draw does not depend on the order in which entries
are visited, so the dense draw, the streaming draw of memory-lean training and the sharded draw of FSDP2 draw the
same entries for the same seed, whatever the chunking and the number of processes.

``strategy="fast"`` (the default) gives keys only to the entries that can win (`thinning`); ``strategy="dense"``
computes a key for every entry (the reference; also used under a budget): the same distribution at a higher cost.
A budget (`max_new`) caps how many drawn entries may lie outside the already-changed set: the result is the top-k
of the changed entries' keys together with the best `max_new` keys of the others, which is successive sampling
that stops taking new entries once the budget is spent.
"""

from __future__ import annotations

import hashlib

import torch

from .entry_keys import EntryKeys
from .importance import Source, chunk_entries_for, importance, row_chunks
from .key_pool import KeyPool, split_by_tensor
from .thinning import Thinning

STRATEGIES = ("fast", "dense")


def draw_uniform(sources: list[Source], k: int, generator: EntryKeys | torch.Generator) -> list[torch.Tensor]:
    """k distinct entries uniformly over whole tensors: the k entries of smallest E."""
    device = sources[0].param.device
    tensor, index = EntryKeys.of(generator).smallest([s.numel for s in sources], k, device)
    return split_by_tensor(tensor, index, sources)


def chunk_keys(
    source: Source, start: int, stop: int, method: str, keys: EntryKeys | torch.Generator, tensor_id: int = 0
) -> torch.Tensor:
    """Sort keys (float64) of rows [start, stop) of source `tensor_id`; -inf marks entries that may not be drawn."""
    keys = EntryKeys.of(keys)
    per_row = max(1, source.param.shape[1:].numel()) if source.param.dim() else 1
    n = (stop - start) * per_row
    device = source.param.device
    if method != "top":
        exp = keys.exp_range(tensor_id, keys.offset(tensor_id) + source.first_entry + start * per_row, n, device)
    if method == "random":
        return exp.neg_()
    if source.grad is None:
        weight = torch.zeros(n, device=device)
    else:
        weight = importance(source, slice(start, stop))
    if method == "fill":
        # Uniform keys for the zero-importance entries only.
        return exp.neg_().masked_fill_(weight > 0, float("-inf"))
    if method == "top":
        return weight.double().masked_fill_(weight == 0, float("-inf"))
    # log I - ½ log E with E ~ Exp(1): the top-k of these is successive sampling ∝ I² (Efraimidis–Spirakis).
    return weight.double().log_().sub_(exp.log_().mul_(0.5))


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
    entry_keys: EntryKeys,
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
            keys = chunk_keys(source, start, stop, method, entry_keys, tensor_id)
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
    generator: EntryKeys | torch.Generator,
    max_new: int | None = None,
    chunk_entries: int | None = None,
    strategy: str = "fast",
) -> list[torch.Tensor]:
    """Draw k entries over all `sources`; returns the sorted flat indices drawn in each source.

    `max_new` (optional) caps the drawn entries outside each source's `changed` set. `strategy="dense"` computes
    a key for every entry instead of thinning (the same draw, slower); a budget always uses it. `generator`: the
    step's `EntryKeys`, or a generator to take them from (one number drawn from it).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    device = sources[0].param.device
    keys = EntryKeys.of(generator)
    if chunk_entries is None:
        chunk_entries = chunk_entries_for(device)
    if max_new is not None or strategy == "dense":
        drawn = _draw_pass(sources, k, method, keys, max_new, chunk_entries)
    elif method == "random":
        drawn = draw_uniform(sources, k, keys)
    else:
        drawn = Thinning(k, method, keys, device, chunk_entries).run(sources)
    count = sum(d.numel() for d in drawn)
    if count < k and method != "random":
        # Fewer than k entries have non-zero importance: fill the rest uniformly from the zero-importance entries.
        remaining_new = None if max_new is None else max_new - _count_new(sources, drawn)
        fill = _draw_pass(sources, k - count, "fill", keys, remaining_new, chunk_entries, exclude=drawn)
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
    continues with the draws an uninterrupted run would make. `rank`: an independent stream per process (the draws
    themselves take the same seed on every process: their keys are indexed by global entry positions)."""
    digest = hashlib.blake2b(f"{seed}:{step}{'' if rank is None else f':{rank}'}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
