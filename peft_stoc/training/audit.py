"""The audit: every base entry may only change in an intercepted optimizer step, and there only if it was drawn.

It catches any change to the base that did not pass through a confined step (a manual update, a `param.data`
assignment, an optimizer outside `torch.optim`, an optimizer that moves entries it was not given a gradient for) and
raises, instead of letting training run dense in silence.

Exact, not sampled: each candidate tensor has a checksum of its *base* — the bit patterns of its current values, with
the originals in place of the entries the record of originals holds (`originals.Originals`). Training changes only
recorded entries, and switching adapters only writes recorded entries, so the base checksum stays the same through
both; any other change to any entry moves it (a change of a single entry always does: the checksum weights every
64-bit word by an odd number). Computing it reads each weight once, as integers (a few ms per 20M entries), and the
recorded entries are accounted for in time ∝ changed entries. Between steps not even recorded entries may change:
their own checksum (`touched`) is kept too. After a step, base and recorded entries give each tensor's whole checksum
as it must stay (`whole`): the check at the next forward is then one pass over the weights, and only a tensor whose
whole checksum moved is looked at entry by entry.
"""

from __future__ import annotations

import torch

from ..distributed import shards
from ..sampling.one_thread import on_one_thread
from ..tuner.candidates import Candidate
from ..tuner.originals import Originals
from .checksums import checksums, entry_terms
from .record_sums import RecordSums

BYPASS_HINT = (
    "outside an optimizer step that StocTuning intercepted (a manual update, an assignment to `param.data`, or an "
    "optimizer that is not a torch.optim.Optimizer). StocTuning confines `optimizer.step()` of torch.optim "
    "optimizers, which is what transformers Trainer, accelerate and plain PyTorch loops call; update the base "
    "through such an optimizer, or call `model.base_model.stoc_sync()` after changing weights on purpose."
)


class Audit:
    """The base checksum of every candidate tensor, and the checksum of its recorded (changed) entries."""

    def __init__(self, candidates: list[Candidate], patch: Originals):
        self.candidates, self.patch = candidates, patch
        # One int64 sum per candidate tensor, on the first one's device; None: taken at the next check.
        self.base: torch.Tensor | None = None
        self.touched: torch.Tensor | None = None
        # The checksum of every tensor as it is (recorded entries as they are): a check finds them unchanged in one
        # pass over the weights, without the recorded entries' terms. None: unknown, the full check runs.
        self.whole: torch.Tensor | None = None
        self._record_sums = RecordSums()

    def _held(self, candidate: Candidate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries held here (under FSDP2: this process's rows), and the recorded positions among them with
        their originals, positions local to the held entries."""
        flat, start = shards.local_entries(candidate.param)
        index = self.patch.index.get(candidate.name)
        if index is None or index.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64, device=flat.device)
            return flat, empty, flat[:0]
        index = index.to(flat.device)
        original = self.patch.original[candidate.name].to(flat.device)
        if start or shards.is_shard(candidate.param):
            inside = (index >= start) & (index < start + flat.numel())
            index, original = index[inside] - start, original[inside]
        return flat, index, original

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base checksums, checksums of the recorded entries' current values, whole checksums), one per tensor."""
        bases, touched = [], []
        held = [self._held(candidate) for candidate in self.candidates]
        wholes = checksums([flat for flat, _, _ in held])
        for (flat, index, original), whole in zip(held, wholes):
            current = entry_terms(flat.index_select(0, index), index)
            bases.append(whole - current + entry_terms(original, index))
            touched.append(current)
        return self._stack(bases), self._stack(touched), self._stack(wholes)

    def _wholes(self) -> torch.Tensor:
        return self._stack(checksums([shards.local_entries(c.param)[0] for c in self.candidates]))

    @on_one_thread
    def _touched(self, with_originals: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(checksums of the recorded entries' current values, and — `with_originals` — of their originals), one per
        tensor (∝ changed entries)."""
        held = [self._held(candidate) for candidate in self.candidates]
        device = self.candidates[0].param.device if self.candidates else torch.device("cpu")
        current = self._record_sums.current(held, device)
        return current, self._record_sums.originals(held, device) if with_originals else None

    def _stack(self, sums: list[torch.Tensor]) -> torch.Tensor:
        if not sums:
            return torch.zeros(0, dtype=torch.int64)
        return torch.stack([value.to(sums[0].device) for value in sums])

    def _raise_for_first(self, differs: torch.Tensor, context: str) -> None:
        if bool(differs.any()):  # the one value a check reads back
            name = self.candidates[int(differs.nonzero()[0])].name
            raise RuntimeError(f"StocTuning: base parameter '{name}' changed {context}")

    def forget(self) -> None:
        """The weights were converted (`.to(dtype)`, `.half()`, a device move): the base is taken anew at the next
        check, from the converted values."""
        self.base = self.touched = self.whole = None
        self._record_sums = RecordSums()

    def invalidate(self) -> None:
        """Our own writes (an adapter applied, reverted or loaded) changed recorded entries only: the base checksum
        stays, the recorded entries' checksum is taken anew at the next check."""
        self.touched = self.whole = None

    def take_touched(self) -> None:
        """After a step that moved recorded entries only: their checksum as they are now, and so the whole
        checksum every entry must keep until the next step (∝ changed entries)."""
        if self.base is not None:
            self.touched, originals = self._touched(with_originals=True)
            self.whole = self.base - originals + self.touched

    def refresh(self) -> None:
        self.base, self.touched, self.whole = self._sums()

    def verify(self, allowed: Originals | None = None, context: str = "") -> None:
        """Raise if any entry outside the recorded ones changed since the base was taken, or — without `allowed` —
        if a recorded entry changed since the last check."""
        if self.base is None:
            self.refresh()
            return
        if allowed is None and self.whole is not None and bool((self._wholes() == self.whole).all()):
            return  # nothing changed at all: one pass over the weights, the recorded entries need no terms
        base, touched, whole = self._sums()
        differs = base != self.base
        if allowed is None and self.touched is not None:
            differs |= touched != self.touched
        self._raise_for_first(differs, context)
        self.touched, self.whole = touched, whole

    def verify_touched(self, context: str = "") -> None:
        """The cheap check between steps (∝ changed entries): no recorded entry changed since the last check."""
        if self.touched is not None:
            self._raise_for_first(self._touched()[0] != self.touched, context)
