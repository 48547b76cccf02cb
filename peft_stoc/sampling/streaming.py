"""The exact global draw of one optimizer step, fed one gradient at a time while the backward runs.

In memory-lean training a candidate's gradient is freed as soon as it is complete. `StreamingDraw` takes each tensor
as it arrives and keeps only a pool of the best k keys seen so far, each with the gradient value at its entry. The
result is the draw `selection.draw` makes over all tensors at once — the same distribution for ``stochastic`` and
``random``, the same entries for ``top``:

* stochastic: the thinning of `selection` against the pool's running k-th key. An entry whose key cannot beat it now
  can never be drawn, because the k-th key only grows; only entries that can get a key.
* top: entries below the pool's k-th importance are skipped.
* random, or a mask reused under `mask_interval`: the entries are fixed before any gradient arrives; the stream only
  picks up their gradient values.
* under a budget (`max_new`): a key for every entry, in a pool of already-changed entries and one of new entries, as
  the dense reference does.
* fewer than k entries of non-zero importance in the whole model: the dense draw fills the rest uniformly from the
  zero-importance entries. A uniform reservoir of those is kept until the stream has seen k non-zero entries, so the
  fill can be drawn from it.

Every key comes from the entry's own random number (`entry_keys`), so the stream draws exactly the entries the
dense draw does for the same seed, in whatever order and chunks the gradients arrive. With `EntryKeys` offsets, the
tensors are FSDP2 shards placed in the whole tensors.

Tensors below `PACK_BELOW` entries (biases, norms) wait and are processed packed together, as the dense draw does.
"""

from __future__ import annotations

import math

import torch

from ..distributed.shards import held_locally
from .chunks import chunks
from .entry_keys import EntryKeys
from .importance import Source, chunk_entries_for, entries_per_row, importance, row_chunks
from .key_pool import KeyPool
from .selection import chunk_keys, draw_uniform, membership
from .thinning import Thinning, extents

PACK_BELOW = 1 << 16


class StreamingDraw:
    """One step's draw over the tensors `params` (tensor ids are positions in this list), fed by `add`."""

    def __init__(
        self,
        params: list[torch.Tensor],
        k: int,
        method: str,
        generator: EntryKeys | torch.Generator,
        fixed: list[torch.Tensor] | None = None,
        changed: list[torch.Tensor | None] | None = None,
        max_new: int | None = None,
        chunk_entries: int | None = None,
    ):
        self.sources = [Source(p, None, []) for p in params]
        self.k = k
        self.method = method
        self.keys = EntryKeys.of(generator)
        self.device = params[0].device
        self.chunk_entries = chunk_entries or chunk_entries_for(self.device)
        self.changed = changed if max_new is not None else None
        self.max_new = max_new
        if fixed is None and method == "random" and max_new is None:
            fixed = draw_uniform(self.sources, k, self.keys)
        self.fixed = fixed
        self.received: set[int] = set()
        self._values: list[list[torch.Tensor] | None] = [None] * len(params)  # per tensor, its tiles' values
        self._small: list[tuple[int, Source]] = []
        self._small_entries = 0
        self._thinning = Thinning(k, method, self.keys, self.device, self.chunk_entries, carry=True)
        budget = min(k, max(0, max_new)) if max_new is not None else 0
        self._old, self._new = KeyPool(k, self.device, carry=True), KeyPool(budget, self.device, carry=True)
        # Reservoirs of zero-importance entries (already changed / new, when under a budget) for the fill.
        needs_fill = fixed is None and method != "random"
        self._fill = [KeyPool(k, self.device, carry=True), KeyPool(k, self.device, carry=True)] if needs_fill else None
        self._nonzero = 0
        self._all_keyed = False
        self._upper_cached = False

    # -- feeding ---------------------------------------------------------------------------------------------------
    def add(
        self, tensor_id: int, grad: torch.Tensor, means: list, theta: torch.Tensor | None = None, first_row: int = 0
    ) -> None:
        """Take the complete gradient of tensor `tensor_id` (μ factors `means`); it may be freed afterwards, except
        that a small tensor's gradient is kept until its pack is processed.

        `theta` and `first_row`: the gradient is that of rows [first_row, ...) only, and `theta` holds the weights of
        those rows (a quantized weight, fed a tile at a time: `overlay`). Tiles come in row order, each entry of the
        tensor once."""
        param = self.sources[tensor_id].param if theta is None else theta
        changed = self.changed[tensor_id] if self.changed is not None else None
        source = Source(param, grad, means, changed, first_row)
        self.received.add(tensor_id)
        if self.fixed is not None:
            index = self.fixed[tensor_id].to(grad.device)
            if theta is not None:
                index = held_locally(index, source.first_entry, grad.numel())
            parts = self._values[tensor_id] = self._values[tensor_id] or []
            parts.append(grad.reshape(-1).index_select(0, index).float())
            return
        if self._fill is not None:
            self._feed_fill(tensor_id, source)
        if self.max_new is not None:
            self._feed_budgeted(tensor_id, source)
        elif source.numel < PACK_BELOW:
            self._small.append((tensor_id, source))
            self._small_entries += source.numel
            if self._small_entries >= self.chunk_entries:
                self._flush_small()
        else:
            self._visit([source], [tensor_id])

    def add_values(self, tensor_id: int, values: torch.Tensor) -> None:
        """The gradient values at the fixed mask's entries of tensor `tensor_id`, computed without its gradient
        (`sparse_backward`)."""
        if self.fixed is None:
            raise RuntimeError("Gradient values without a gradient can only be given for a fixed mask.")
        self.received.add(tensor_id)
        self._values[tensor_id] = [values.float()]

    def pending_bytes(self) -> int:
        """Bytes of the small gradients kept until their pack is processed."""
        return sum(s.grad.numel() * s.grad.element_size() for _, s in self._small)

    def _flush_small(self) -> None:
        if self._small:
            ids, sources = zip(*self._small)
            self._small.clear()
            self._small_entries = 0
            self._visit(list(sources), list(ids))

    def _visit(self, sources: list[Source], ids: list[int]) -> None:
        if not self._upper_cached:  # the upper levels of every tensor's tree at once, before the first chunk
            self._upper_cached = True
            self._thinning.prepare(extents(self.sources, self.keys), self.device)
        for segments in chunks(sources, self.chunk_entries, ids, self.keys.offsets):
            self._thinning.stream(segments)

    def _feed_budgeted(self, tensor_id: int, source: Source) -> None:
        """A key for every entry; changed and new entries compete in separate pools (see `selection.draw`)."""
        per_row = entries_per_row(source.param.shape)
        flat_grad = source.grad.reshape(-1) if source.grad is not None else None
        for start, stop in row_chunks(source.param.shape, self.chunk_entries):
            local = start * per_row
            offset = source.first_entry + local  # in the whole tensor
            keys = chunk_keys(source, start, stop, self.method, self.keys, tensor_id)
            if flat_grad is None:
                values = torch.zeros(keys.numel(), device=keys.device)
            else:
                values = flat_grad[local : local + keys.numel()].float()
            is_old = membership(source.changed, offset, keys.numel(), keys.device)
            self._old.offer_chunk(keys.masked_fill(~is_old, -math.inf), tensor_id, offset, values)
            self._new.offer_chunk(keys.masked_fill_(is_old, -math.inf), tensor_id, offset, values)

    def _feed_unreceived(self) -> None:
        """``random`` under a budget keys every entry, also those of tensors that sent no gradient (as dense does)."""
        if self.fixed is None and self.max_new is not None and self.method == "random" and not self._all_keyed:
            self._all_keyed = True
            for tensor_id, source in enumerate(self.sources):
                if tensor_id not in self.received:
                    changed = self.changed[tensor_id] if self.changed is not None else None
                    self._feed_budgeted(tensor_id, Source(source.param, None, [], changed))

    def _feed_fill(self, tensor_id: int, source: Source | None) -> None:
        """Uniform keys for the zero-importance entries of a tensor (or of a tile of its rows), while the fill may
        still be needed."""
        param = self.sources[tensor_id].param if source is None else source.param
        first = 0 if source is None else source.first_entry
        per_row = entries_per_row(param.shape)
        changed = self.changed[tensor_id] if self.changed is not None else None
        for start, stop in row_chunks(param.shape, self.chunk_entries):
            local = start * per_row
            offset = first + local  # in the whole tensor
            if source is None:  # a tensor without a gradient: every entry has zero importance
                size = (stop - start) * per_row
                weight = torch.zeros(size, device=param.device)
                values = weight
            else:
                weight = importance(source, slice(start, stop))
                values = source.grad.reshape(-1)[local : local + weight.numel()].float()
            zero = weight == 0
            zeros = zero.nonzero().squeeze(1)
            self._nonzero += weight.numel() - zeros.numel()
            if zeros.numel() == 0:
                continue  # no zero-importance entry here: nothing for the reservoirs
            if zeros.numel() == weight.numel():
                keys = self.keys.exp_range(
                    tensor_id, self.keys.offset(tensor_id) + offset, zeros.numel(), weight.device
                )
                keys = keys.neg_()
            else:  # the keys of those entries only
                at = zeros + self.keys.offset(tensor_id) + offset
                found = self.keys.exp(torch.full_like(zeros, tensor_id), at).neg_()
                keys = torch.full((weight.numel(),), -math.inf, dtype=torch.float64, device=weight.device)
                keys.index_copy_(0, zeros, found)
            is_old = membership(changed, offset, keys.numel(), keys.device)
            self._fill[0].offer_chunk(keys.masked_fill(~is_old, -math.inf), tensor_id, offset, values)
            self._fill[1].offer_chunk(keys.masked_fill_(is_old, -math.inf), tensor_id, offset, values)
        if self._nonzero >= self.k:
            self._fill = None  # k entries of non-zero importance exist: no fill can be needed

    # -- result ----------------------------------------------------------------------------------------------------
    def finish(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per tensor: the sorted flat indices drawn and the gradient values there (None: no gradient arrived)."""
        if self.fixed is not None:
            empty = torch.empty(0, device=self.device)
            values = [
                torch.cat(v) if v is not None else (None if i not in self.received else empty)
                for i, v in enumerate(self._values)
            ]
            return [f.to(self.sources[i].param.device) for i, f in enumerate(self.fixed)], values
        self._flush_small()
        self._feed_unreceived()
        if self.max_new is not None:
            pool = self._old.merged_with(self._new, size=self.k)
        else:
            pool = self._thinning.pool
        index, values = pool.split_with_values(self.sources)
        count = sum(i.numel() for i in index)
        if count < self.k and self._fill is not None:
            index, values = self._with_fill(index, values, count)
        values = [v if i in self.received else None for i, v in enumerate(values)]
        return index, values

    def pools(self) -> tuple[list[KeyPool], list[KeyPool] | None]:
        """The pools before they are split by tensor, for a draw merged across processes (`sharded_draw.merged_draw`):
        [the pool], or [already-changed, new] under a budget; and the fill reservoirs [already-changed, new], None
        once k entries of non-zero importance were seen. Tensors that sent no gradient join the reservoirs first."""
        self._flush_small()
        self._feed_unreceived()
        pools = [self._thinning.pool] if self.max_new is None else [self._old, self._new]
        if self._fill is not None:
            for tensor_id in range(len(self.sources)):
                if tensor_id not in self.received and self._fill is not None:
                    self._feed_fill(tensor_id, None)
        for pool in pools + (self._fill or []):
            pool.flush()
        return pools, self._fill

    def _with_fill(self, index, values, count):
        """Add k - count entries drawn uniformly from the zero-importance entries (tensors without a gradient too)."""
        for tensor_id in range(len(self.sources)):
            if tensor_id not in self.received and self._fill is not None:
                self._feed_fill(tensor_id, None)
        missing = self.k - count
        old, new = self._fill if self._fill is not None else (KeyPool(0, self.device, True),) * 2
        room = missing
        if self.max_new is not None:
            drawn_new = sum(
                int((~torch.isin(i, c.to(i.device))).sum()) if c is not None else i.numel()
                for i, c in zip(index, self.changed)
            )
            room = min(missing, max(0, self.max_new - drawn_new))
        limited = KeyPool(room, self.device, carry=True)
        new.flush()
        limited.add(new.keys, new.tensor, new.index, new.values)
        extra_index, extra_values = old.merged_with(limited, size=missing).split_with_values(self.sources)
        merged_index, merged_values = [], []
        for a, av, b, bv in zip(index, values, extra_index, extra_values):
            both = torch.cat([a, b])
            order = both.argsort()
            merged_index.append(both.index_select(0, order))
            merged_values.append(torch.cat([av.to(both.device), bv.to(both.device)]).index_select(0, order))
        return merged_index, merged_values
