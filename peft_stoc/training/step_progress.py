"""Where the step under way stands between two optimizer steps: the forwards and backwards run so far, the order the
candidates' gradients completed in, and whether the running backward ends the step (so the lean strategy can consume
its gradients as they complete).
"""

from __future__ import annotations

import weakref

import torch

from .. import compat
from ..distributed import ranks as distributed
from .consumed_grad import ConsumedGrad
from .gradient_stream import accelerate_syncs_gradients


class StepProgress:
    """The forwards, backwards and completed gradients of one step of one adapter."""

    def __init__(self, candidates: int):
        self.candidates = candidates  # how many there are
        self.hold_gradients = False  # set by `stoc_accumulating()`: this backward is not the last of the step
        # accelerate's gradient state outlives the loop that set it (a notebook that ran a Trainer before a plain
        # loop): its word counts while a Trainer runs, or once it has marked a micro-batch as not the last.
        self.driven_by_trainer = False
        self.accelerate_accumulates = False
        self.forwards_per_step = 1  # as seen at the latest step: the backward of the last of them ends a step
        self.reset()

    def reset(self) -> None:
        """A new step: nothing run yet."""
        self.backward_seen = False  # a backward ran since the latest step
        self.forwards = 0  # forwards with gradients since the latest step
        self._order: dict[int, None] = {}  # candidates in the order their gradients completed
        self._completed: dict[int, tuple] = {}  # position -> (gradient, version) as the latest backward left it

    def stepped(self) -> None:
        """The optimizer stepped: the forwards of this step are what a step takes from now on."""
        if self.forwards:
            self.forwards_per_step = self.forwards
        self.reset()

    def completes(self, position: int, grad: torch.Tensor) -> None:
        """A candidate's gradient is complete for this backward. The order gradients complete in: a draw made at the
        step (accumulation, DDP) visits the tensors in it too, so it consumes the random stream as a streamed draw
        would — one process and several ranks then draw the same entries."""
        self.backward_seen = True
        self._order.setdefault(position, None)
        self._completed[position] = (weakref.ref(grad), compat.tensor_version(grad))

    def order(self) -> list[int]:
        """Every candidate: those whose gradient completed in this step, in that order, then the others."""
        return list(self._order) + [p for p in range(self.candidates) if p not in self._order]

    def streams_now(self, sharded: bool) -> bool:
        """Whether the running backward ends the step, so its gradients can be consumed as they complete."""
        if self.hold_gradients or sharded or distributed.world_size() > 1:
            return False
        synced = accelerate_syncs_gradients()
        if synced is False:
            self.accelerate_accumulates = True
            return False
        if synced and (self.accelerate_accumulates or self.driven_by_trainer):
            return True  # the last micro-batch of a step, by the word of the loop that runs the micro-batches
        # A plain loop: lean from its first step. A loop that accumulates without saying so is refused at its second
        # micro-batch, before anything changed (`StepEngine._after_backward_without_step`); one that declared its
        # micro-batches (`stoc_accumulating()`) at a step is followed from the forwards per step seen there.
        return self.forwards >= self.forwards_per_step

    def gradients_reset(self, grads: list) -> bool:
        """A gradient was dropped or zeroed since the backward that completed it (`zero_grad(set_to_none=False)`
        zeroes in place): the step was abandoned, as when a gradient scaler skips it, whatever the zero_grad mode.
        Only gradients changed since (their version counter moved) are read; a reduction across processes changes
        them without zeroing them."""
        for position, (ref, version) in self._completed.items():
            grad = grads[position]
            if grad is None:
                return True
            if (ref() is grad and compat.tensor_version(grad) == version) or isinstance(grad, ConsumedGrad):
                continue
            if not bool((grad.to_local() if hasattr(grad, "to_local") else grad).any()):
                return True
        return False
