"""The audit's checksum terms of every tensor's recorded entries, summed for all tensors in a few operations.

A check between steps, and the checksum taken after a step, sum the terms of each tensor's recorded entries
(`checksums.entry_terms`). Tensor by tensor that is a dozen small operations each, for every candidate tensor of the
model, at every step. Here each tensor's recorded values are gathered, and the terms of all of them are taken
together, one vector per device and dtype, and summed per tensor from one running sum; the originals' checksums are
kept while the record is the same (it changes only at draws). The sums are the same, bit for bit: int64 arithmetic
wraps, in any order.
"""

from __future__ import annotations

import torch

from .checksums import bits_of, word_weights
from .unchanged import Unchanged

Held = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (a tensor's entries, recorded positions, their originals)


class _Group:
    """The tensors whose recorded entries share a device and a dtype: their terms are summed as one vector. Nothing
    ∝ the recorded entries is kept: the word weights are worked out at each sum, in a few operations for all."""

    def __init__(self, tensors: list[int], held: list[Held], slots: int):
        self.tensors = tensors
        device = held[tensors[0]][1].device
        counts = torch.tensor([held[t][1].numel() for t in tensors], device=device)
        self.last = counts.cumsum(0) - 1  # where each tensor's entries end in the joined vectors
        self.slots = torch.tensor(tensors, device=device)
        self.size = len(held)

    def sums(self, values: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
        """Per tensor (of all `size`), the checksum terms of its recorded entries at `indices` holding `values` (in
        `tensors`' order)."""
        values = torch.cat(values)
        byte = torch.cat(indices) * values.element_size()
        # (bits << shift) · weight, as bits · (weight << shift): the same product mod 2⁶⁴
        running = (bits_of(values) * (word_weights(byte // 8) << ((byte % 8) * 8))).cumsum(0)
        ends = running.index_select(0, self.last)
        per_tensor = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
        return torch.zeros(self.size, dtype=torch.int64, device=ends.device).index_copy_(0, self.slots, per_tensor)


class RecordSums:
    """The checksum terms of the recorded entries of a fixed list of tensors, per tensor."""

    def __init__(self):
        self._made_for: list | None = None  # the record the groups were made for (`_hold`)
        self._groups: list[_Group] = []
        self._originals: torch.Tensor | None = None

    def current(self, held: list[Held], device: torch.device) -> torch.Tensor:
        """Per tensor, the checksum terms of its recorded entries' current values (int64, on `device`)."""
        self._follow(held, device)
        total = torch.zeros(len(held), dtype=torch.int64, device=device)
        for group in self._groups:
            values = [held[t][0].index_select(0, held[t][1]) for t in group.tensors]
            total += group.sums(values, [held[t][1] for t in group.tensors]).to(device)
        return total

    def originals(self, held: list[Held], device: torch.device) -> torch.Tensor:
        """Per tensor, the checksum terms of its recorded entries' originals (kept while the record is the same)."""
        self._follow(held, device)
        return self._originals

    def _follow(self, held: list[Held], device: torch.device) -> None:
        """Make the groups anew when the record changed (other tensors, or tensors written in place)."""
        if self._made_for is not None and len(self._made_for) == len(held):
            if all(_same(kept, now) for kept, now in zip(self._made_for, held)):
                return
        by_kind: dict[tuple, list[int]] = {}
        for position, (_, index, original) in enumerate(held):
            if index.numel():  # (values read back as the originals were: a quantized weight's overlay reads floats)
                by_kind.setdefault((original.device, original.dtype), []).append(position)
        self._groups = [_Group(tensors, held, len(held)) for tensors in by_kind.values()]
        self._originals = torch.zeros(len(held), dtype=torch.int64, device=device)
        for group in self._groups:
            indices = [held[t][1] for t in group.tensors]
            self._originals += group.sums([held[t][2] for t in group.tensors], indices).to(device)
        self._made_for = [_hold(entry) for entry in held]


def _hold(entry: Held) -> tuple[Unchanged, Unchanged] | None:
    """A tensor's record: its positions and originals (None: nothing recorded)."""
    _, index, original = entry
    return (Unchanged(index), Unchanged(original)) if index.numel() else None


def _same(kept: tuple[Unchanged, Unchanged] | None, entry: Held) -> bool:
    if kept is None:
        return entry[1].numel() == 0
    return kept[0].holds(entry[1]) and kept[1].holds(entry[2])
