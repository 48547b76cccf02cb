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

import weakref

import torch

from ..distributed import shards
from ..sampling.one_thread import on_one_thread
from ..tuner.candidates import Candidate
from ..tuner.originals import Originals

BYPASS_HINT = (
    "outside an optimizer step that StocTuning intercepted (a manual update, an assignment to `param.data`, or an "
    "optimizer that is not a torch.optim.Optimizer). StocTuning confines `optimizer.step()` of torch.optim "
    "optimizers, which is what transformers Trainer, accelerate and plain PyTorch loops call; update the base "
    "through such an optimizer, or call `model.base_model.stoc_sync()` after changing weights on purpose."
)

_WORDS = 1 << 19  # 64-bit words per chunk (4 MiB of temporaries)
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_SALT = 0x7F4A7C159E3779B9
_UNSIGNED = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: -1}
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _word_weights(words: torch.Tensor) -> torch.Tensor:
    """The odd weight of each 64-bit word (global word positions `words`), wrapping int64 arithmetic."""
    position, chunk = words % _WORDS, words // _WORDS
    return ((position * _MIX + _SALT) | 1) * (chunk * 2 + 1)


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _first_chunk_weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = _word_weights(torch.arange(_WORDS, dtype=torch.int64, device=device))
    return _WEIGHTS[device]


def _weighted_sum(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ words · weights, wrapping. On a CPU one pass of `torch.dot`: no temporary, and no thread pool to wake for
    each of a model's hundreds of tensors (reading the weights is bound by memory, not by arithmetic); CUDA's dot
    takes floating point only."""
    if words.device.type == "cpu":
        return torch.dot(words, weights)
    return (words * weights).sum()


def checksum(flat: torch.Tensor) -> torch.Tensor:
    """Σ word · weight(word position) mod 2⁶⁴ over the bytes of `flat` (contiguous), read as 64-bit words: an int64
    scalar on `flat`'s device (read nothing back: a check compares all tensors' sums at once). A quantized weight's
    overlay has its own (`overlay.Overlay.checksum`)."""
    if not isinstance(flat, torch.Tensor):
        return flat.checksum()
    try:
        raw = flat.view(torch.uint8)
        raw[: raw.numel() // 8 * 8].view(torch.int64)
    except RuntimeError:  # entries not aligned to 8 bytes in their storage (a view into a larger buffer)
        raw = flat.clone().view(torch.uint8)
    whole = raw.numel() // 8
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    words = raw[: whole * 8].view(torch.int64)
    weights = _first_chunk_weights(flat.device)
    for chunk, start in enumerate(range(0, whole, _WORDS)):
        part = words[start : start + _WORDS]
        total += _weighted_sum(part, weights[: part.numel()]) * (chunk * 2 + 1)
    tail = raw[whole * 8 :]
    if tail.numel():  # the last, partial word, its bytes little-endian
        shifts = torch.arange(tail.numel(), dtype=torch.int64, device=flat.device) * 8
        word = (tail.to(torch.int64) << shifts).sum()
        total += word * _word_weights(torch.tensor(whole, device=flat.device))
    return total


def entry_terms(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """What the entries at flat `positions`, holding `values`, contribute to `checksum` of their tensor (an int64
    scalar on `values`' device)."""
    if positions.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=values.device)
    size = values.element_size()
    bits = values.contiguous().view(_INT_OF_SIZE[size]).to(torch.int64) & _UNSIGNED[size]
    byte = positions.to(torch.int64) * size
    shifted = bits << ((byte % 8) * 8)
    return (shifted * _word_weights(byte // 8).to(shifted.device)).sum()


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
        # Per tensor: (its record's index and originals, held weakly; the checksum of those originals).
        self._originals: dict[str, tuple] = {}

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
        bases, touched, wholes = [], [], []
        for candidate in self.candidates:
            flat, index, original = self._held(candidate)
            whole = checksum(flat)
            current = entry_terms(flat.index_select(0, index), index)
            bases.append(whole - current + entry_terms(original, index))
            touched.append(current)
            wholes.append(whole)
        return self._stack(bases), self._stack(touched), self._stack(wholes)

    def _wholes(self) -> torch.Tensor:
        return self._stack([checksum(shards.local_entries(c.param)[0]) for c in self.candidates])

    @on_one_thread
    def _touched(self, with_originals: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(checksums of the recorded entries' current values, and — `with_originals` — of their originals), one per
        tensor (∝ changed entries)."""
        sums, originals = [], []
        for candidate in self.candidates:
            flat, index, original = self._held(candidate)
            sums.append(entry_terms(flat.index_select(0, index), index))
            if with_originals:
                originals.append(self._original_terms(candidate.name, index, original))
        return self._stack(sums), self._stack(originals) if with_originals else None

    def _original_terms(self, name: str, index: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """The checksum of a tensor's originals, kept while its record is the same (steps that reuse a mask, or
        that draw only entries changed before, record nothing new)."""
        record = self.patch.index.get(name), self.patch.original.get(name)
        kept = self._originals.get(name)
        if kept is not None and record[0] is not None and kept[0]() is record[0] and kept[1]() is record[1]:
            return kept[2]
        terms = entry_terms(original, index)
        if record[0] is not None and record[1] is not None:
            self._originals[name] = (weakref.ref(record[0]), weakref.ref(record[1]), terms)
        return terms

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
        self._originals.clear()

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
