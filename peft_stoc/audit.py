"""The audit: a few fixed entries per candidate tensor that may only change in an intercepted optimizer step.

It catches any change to the base that did not pass through a confined step (a manual update, a `param.data`
assignment, an optimizer outside `torch.optim`) and raises, instead of letting training run dense in silence.
"""

from __future__ import annotations

import torch

from . import shards
from .candidates import Candidate
from .originals import Patch

AUDIT_ENTRIES_PER_TENSOR = 4

BYPASS_HINT = (
    "outside an optimizer step that StocTuning intercepted (a manual update, an assignment to `param.data`, or an "
    "optimizer that is not a torch.optim.Optimizer). StocTuning confines `optimizer.step()` of torch.optim "
    "optimizers, which is what transformers Trainer, accelerate and plain PyTorch loops call; update the base "
    "through such an optimizer, or call `model.base_model.stoc_sync()` after changing weights on purpose."
)


class Audit:
    """A few fixed entries per candidate tensor whose values must only change through intercepted steps."""

    def __init__(self, candidates: list[Candidate]):
        generator = torch.Generator().manual_seed(0x5170C)
        self.candidates = candidates
        # The entries held here: the whole tensor, or under FSDP2 this process's rows (positions are local to them).
        held = [shards.local_entries(c.param) for c in candidates]
        self.starts = [start for _, start in held]
        self.positions = [
            torch.randint(max(1, flat.numel()), (min(AUDIT_ENTRIES_PER_TENSOR, flat.numel()),), generator=generator)
            .unique()
            .to(flat.device)
            for flat, _ in held
        ]
        self.values: torch.Tensor | None = None

    def _gather(self) -> torch.Tensor:
        """The audited values of all tensors in one vector: one comparison per check, whatever the model's size."""
        if not self.candidates:
            return torch.empty(0)
        device = self.candidates[0].param.device  # a model spread over devices is checked on the first one's
        return torch.cat(
            [
                shards.local_entries(c.param)[0].index_select(0, p).to(device)
                for c, p in zip(self.candidates, self.positions)
            ]
        )

    def refresh(self) -> None:
        self.values = self._gather()

    def invalidate(self) -> None:
        """Our own changes to the weights: take a new baseline at the next check."""
        self.values = None

    def verify(self, allowed: Patch | None = None, context: str = "") -> None:
        """Raise if an audited entry changed since the last refresh (entries in `allowed` may change)."""
        if self.values is None:
            self.refresh()
            return
        current = self._gather()
        moved = (self.values != current) & ~(torch.isnan(self.values) & torch.isnan(current))
        if bool(moved.any()):
            sizes = [p.numel() for p in self.positions]
            for candidate, positions, start, moved_here in zip(
                self.candidates, self.positions, self.starts, moved.split(sizes)
            ):
                if not bool(moved_here.any()):
                    continue
                if allowed is not None and candidate.name in allowed.index:
                    changed = allowed.index[candidate.name].to(positions.device) - start
                    moved_here = moved_here & ~torch.isin(positions, changed).to(moved_here.device)
                    if not bool(moved_here.any()):
                        continue
                raise RuntimeError(f"StocTuning: base parameter '{candidate.name}' changed {context}")
        self.values = current
