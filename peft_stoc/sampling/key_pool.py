"""`KeyPool`: the best `size` keys seen so far, with the entry (tensor id, flat index) each belongs to.

Every draw is the top-k of one key per entry; the pool is its running state. Its k-th key only grows, so it is a
threshold that later entries must beat. Keys are float64: two entries whose keys round to the same float32 would
otherwise tie at the k-th key about once in 10^6/k draws, and which one a top-k keeps depends on the order the
entries were offered in (dense, streaming and sharded draws visit them in different orders).
"""

from __future__ import annotations

import torch


class KeyPool:
    """The best `size` keys seen so far. With `carry`, every key also carries a value (the gradient at its entry),
    so a draw made while gradients stream past keeps what the update needs once they are freed."""

    def __init__(self, size: int, device, carry: bool = False):
        self.size = size
        self.keys = torch.empty(0, dtype=torch.float64, device=device)
        self.tensor = torch.empty(0, dtype=torch.long, device=device)
        self.index = torch.empty(0, dtype=torch.long, device=device)
        self.values = torch.empty(0, device=device) if carry else None
        self._pending: list[tuple] = []
        self._pending_count = 0

    @property
    def full(self) -> bool:
        return self.keys.numel() >= self.size

    def threshold(self) -> float:
        """The smallest key kept once the pool is full (a lower bound of the final k-th key)."""
        return float(self.keys.min())

    def offer_chunk(self, keys: torch.Tensor, tensor_id: int, offset: int, values: torch.Tensor | None = None) -> None:
        """Offer one chunk's keys (-inf = not eligible); keys below the current threshold are dropped unsorted.
        `values`: the chunk's carried values, aligned with `keys` (pools that carry values)."""
        if self.size == 0:
            return
        floor = self.threshold() if self.full else float("-inf")
        index = (keys > floor).nonzero().squeeze(1)
        if index.numel() > self.size:
            index = index[torch.topk(keys[index], self.size, sorted=False).indices]
        carried = None if values is None else values.index_select(0, index)
        self.add(keys[index], torch.full_like(index, tensor_id), index + offset, carried)

    def offer(
        self, keys: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None
    ) -> None:
        """Offer keys of entries (tensor ids, flat indices), merged in batches: merging costs a top-k over the
        pool, so offers wait until they are many, or until they would fill the pool (which then has a threshold)."""
        if self.size == 0 or keys.numel() == 0:
            return
        self._pending.append((keys, tensor, index) if values is None else (keys, tensor, index, values))
        self._pending_count += keys.numel()
        fills = self.keys.numel() < self.size <= self.keys.numel() + self._pending_count
        if fills or self._pending_count >= max(self.size // 4, 1024):
            self.flush()

    def flush(self) -> None:
        """Merge the waiting offers into the pool."""
        if self._pending:
            parts = [torch.cat(column) for column in zip(*self._pending)]
            self._pending.clear()
            self._pending_count = 0
            self.add(*parts)

    def add(
        self, keys: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None
    ) -> None:
        """Merge these keys into the pool now."""
        device = self.keys.device
        self.keys = torch.cat([self.keys, keys.to(device=device, dtype=torch.float64)])
        self.tensor = torch.cat([self.tensor, tensor.to(device)])
        self.index = torch.cat([self.index, index.to(device)])
        if self.values is not None:
            self.values = torch.cat([self.values, values.to(device=device, dtype=self.values.dtype)])
        if self.keys.numel() > self.size:
            self.keys, top = torch.topk(self.keys, self.size, sorted=False)
            self.tensor, self.index = self.tensor.index_select(0, top), self.index.index_select(0, top)
            if self.values is not None:
                self.values = self.values.index_select(0, top)

    def merged_with(self, other: KeyPool, size: int | None = None) -> KeyPool:
        """One pool of the best `size` (default: this pool's size) keys of both."""
        self.flush()
        other.flush()
        merged = KeyPool(self.size if size is None else size, self.keys.device, carry=self.values is not None)
        values = None if self.values is None else torch.cat([self.values, other.values])
        merged.add(
            torch.cat([self.keys, other.keys]),
            torch.cat([self.tensor, other.tensor]),
            torch.cat([self.index, other.index]),
            values,
        )
        return merged

    def split(self, sources: list) -> list[torch.Tensor]:
        """Per source: the sorted flat indices of the keys kept."""
        self.flush()
        return split_by_tensor(self.tensor, self.index, sources)

    def split_with_values(self, sources: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per source: sorted flat indices and the values carried with them."""
        self.flush()
        return split_by_tensor(self.tensor, self.index, sources, self.values)


def split_by_tensor(
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
