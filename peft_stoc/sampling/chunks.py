"""Chunks: rows of one or more tensors laid out in one buffer, so a sampler works on many small tensors at once.

A chunk is a list of `Segment`s, each a run of rows of one tensor placed at an offset of the buffer. Buffer
positions map back to (tensor id, flat index) with `locate`. Every segment starts in a fresh block of `BLOCK` buffer
positions, at the position its first entry has in its tree node of `BLOCK` entries (`entry_keys`): each block of the
buffer then holds the entries of one node, and a sampler tests a whole block against that node's minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .entry_keys import BLOCK
from .importance import Source, importance, row_chunks, rows_view


@dataclass
class Segment:
    """Rows of one tensor, laid out in a chunk's buffer from position `start`."""

    tensor_id: int
    source: Source
    rows: slice | torch.Tensor  # a range of rows, or the indices of the rows visited
    start: int
    size: int

    def load(self, out: torch.Tensor, scale: float) -> None:
        """Write scale·I of the rows to `out`."""
        importance(self.source, self.rows, scale, out)

    @property
    def per_row(self) -> int:
        return rows_view(self.source.param).shape[1]

    def flat_index(self, position: torch.Tensor) -> torch.Tensor:
        """Buffer positions inside this segment → flat indices in the tensor."""
        local = position - self.start
        per_row = self.per_row
        if isinstance(self.rows, slice):
            return local + self.rows.start * per_row + self.source.first_entry
        return self.rows.index_select(0, local // per_row) * per_row + local % per_row + self.source.first_entry

    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """Flat indices of the tensor → buffer positions, for those inside this segment."""
        per_row = self.per_row
        index = index - self.source.first_entry
        row = index // per_row
        if isinstance(self.rows, slice):
            inside = (row >= self.rows.start) & (row < self.rows.stop)
            return index.masked_select(inside) - self.rows.start * per_row + self.start
        slot = torch.searchsorted(self.rows, row).clamp_(max=self.rows.numel() - 1)
        inside = self.rows.index_select(0, slot) == row
        return self.start + slot.masked_select(inside) * per_row + (index % per_row).masked_select(inside)


def chunks(sources: list[Source], chunk_entries: int, ids: list[int] | None = None, offsets: list[int] | None = None):
    """Lists of segments holding about `chunk_entries` buffer positions: rows of a large tensor, or small tensors
    packed. `ids`: the tensor id of each source (default: its position); `offsets`: per tensor id, the global flat
    index of the tensor's first local entry (an FSDP2 shard's start; default 0).

    Tensors without a gradient are left out, and so are embedding rows whose μ is 0 in every factor (tokens absent
    from the batch): their importance is 0.
    """
    chunk, filled = [], 0
    for tensor_id, source in zip(range(len(sources)) if ids is None else ids, sources):
        if source.grad is None:
            continue
        offset = (0 if offsets is None else offsets[tensor_id]) + source.first_entry
        for rows, size, first in _row_groups(source, chunk_entries, offset):
            start = -(-filled // BLOCK) * BLOCK + first % BLOCK
            if filled and start + size > chunk_entries:
                yield chunk
                chunk, start = [], first % BLOCK
            chunk.append(Segment(tensor_id, source, rows, start, size))
            filled = start + size
    if chunk:
        yield chunk


def _row_groups(source: Source, chunk_entries: int, offset: int = 0):
    """(rows, entries, global flat index of the first entry) groups of one tensor: ranges of rows (`row_chunks`), or
    only the live rows of a table whose rows are whole blocks."""
    rows, per_row = rows_view(source.param).shape
    aligned = per_row % BLOCK == 0 and offset % BLOCK == 0 and not source.first_row
    if aligned and rows > 1 and source.means and all(v is not None and d == 0 for v, d in source.means):
        live = (sum(v for v, _ in source.means) != 0).nonzero().squeeze(1)
        if live.numel() < rows // 2:
            step = max(1, chunk_entries // per_row)
            for start in range(0, live.numel(), step):
                group = live[start : start + step]
                yield group, group.numel() * per_row, offset
            return
    for start, stop in row_chunks(source.param.shape, chunk_entries):
        yield slice(start, stop), (stop - start) * per_row, offset + start * per_row


def block_nodes(segments: list[Segment], blocks: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of a chunk's buffer → (tensor ids, numbers of the tree nodes of `BLOCK` entries they hold), with the
    global offsets of `keys` (`entry_keys.EntryKeys`)."""
    device = blocks.device
    if len(segments) == 1:
        position = torch.clamp(blocks * BLOCK, min=segments[0].start)
    else:
        starts = torch.tensor([s.start for s in segments], device=device)
        which = torch.searchsorted(starts.div(BLOCK, rounding_mode="floor"), blocks, right=True) - 1
        position = torch.maximum(blocks * BLOCK, starts.index_select(0, which))
    tensor, index = locate(segments, position)
    return tensor, keys.global_index(tensor, index).div_(BLOCK, rounding_mode="floor")


def gather_gradients(segments: list[Segment], tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gradient values (float32) at (tensor ids, flat indices) of the tensors laid out in `segments`."""
    if len(segments) == 1:
        source = segments[0].source
        return source.grad.reshape(-1).index_select(0, index - source.first_entry).float()
    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    # One source per tensor, or several tiles of rows of one tensor (`Source.first_row`).
    for tensor_id, source in {id(s.source): (s.tensor_id, s.source) for s in segments}.values():
        first = source.first_entry
        inside = (tensor == tensor_id) & (index >= first) & (index < first + source.numel)
        local = index.masked_select(inside) - first
        out.masked_scatter_(inside, source.grad.reshape(-1).index_select(0, local).float())
    return out


def locate(segments: list[Segment], local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer positions of a chunk → (tensor ids, flat indices in those tensors), for all its segments at once."""
    if len(segments) == 1:
        return torch.full_like(local, segments[0].tensor_id), segments[0].flat_index(local)
    device = local.device
    which = torch.searchsorted(torch.tensor([s.start for s in segments], device=device), local, right=True) - 1
    tensor = torch.tensor([s.tensor_id for s in segments], device=device).index_select(0, which)
    if all(isinstance(s.rows, slice) for s in segments):
        shift = [s.rows.start * s.per_row + s.source.first_entry - s.start for s in segments]
        shift = torch.tensor(shift, device=device)
        return tensor, local + shift.index_select(0, which)
    flat = torch.empty_like(local)
    for i in which.unique().tolist():
        inside = which == i
        flat.masked_scatter_(inside, segments[i].flat_index(local.masked_select(inside)))
    return tensor, flat
