"""`WeightGuard`: a backward runs on the weights its graph was built with.

Switching adapters and showing the base (`disable_adapter()`) write into the weights without bumping their version
counters (`shards.writable_entries`): a graph built before a switch is valid again after the switch back, which is
what DPO's reference pass needs (TRL switches between the policy's forward and its backward). The case torch's
version check would have caught — a backward while the weights show something else than its graph was built on —
is refused here instead.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Hashable, Iterable

import torch

from ..distributed import shards
from ..training.weak_hooks import weak_call


class WeightGuard:
    """Refuses the gradient of a candidate weight unless the weights show what they showed when the latest forward
    with gradients ran (`note`): the same adapters, with the same deltas, being trained.

    `shown()` names what the weights show now (None while no adapter trains); a gradient that reaches a candidate
    while it differs from the noted value would be the gradient of other weights than the graph's. Under FSDP2 the
    gradients reach the shards only once reduced: the check runs there, and the gradient is dropped before raising."""

    def __init__(
        self, shown: Callable[[], Hashable | None], describe: Callable[[], str], built_on: Hashable | None = None
    ):
        self._shown, self._describe = shown, describe
        self._built_on = built_on  # what the weights showed at the latest forward with gradients (`note`)
        # id → (the parameter, weakly; its hook): a parameter freed and another made at its address is watched anew.
        self._handles: dict[int, tuple[weakref.ref, torch.utils.hooks.RemovableHandle]] = {}

    def note(self) -> None:
        """A forward with gradients ran: its graph is built on what the weights show now."""
        self._built_on = self._shown()

    def watch(self, params: Iterable[torch.nn.Parameter]) -> None:
        for param in params:
            known = self._handles.get(id(param))
            if known is not None and known[0]() is param:
                continue
            if shards.is_shard(param):
                handle = param.register_post_accumulate_grad_hook(weak_call(self._check_shard))
            else:
                handle = param.register_hook(weak_call(self._check))
            self._handles[id(param)] = (weakref.ref(param), handle)

    def _refusal(self) -> RuntimeError | None:
        now = self._shown()
        if now is not None and now == self._built_on:
            return None
        return RuntimeError(
            f"A backward reached StocTuning's weights while they show {self._describe()}, not what the graph was "
            "built on. Leave `disable_adapter()` (or switch back with `set_adapter`) before calling backward, and "
            "keep the adapters' deltas as they were between a forward and its backward; nothing was updated."
        )

    def check(self) -> None:
        """Raise if the weights do not show what the latest forward's graph was built on (a gradient computed
        without reaching the weight itself: `sparse_backward`)."""
        error = self._refusal()
        if error is not None:
            raise error

    def _check(self, grad: torch.Tensor) -> None:
        self.check()

    def _check_shard(self, param: torch.Tensor) -> None:
        error = self._refusal()
        if error is not None:
            param.grad = None
            raise error

    def __deepcopy__(self, memo) -> WeightGuard:
        # A copied model's parameters are new tensors without hooks: its guard watches them afresh.
        return WeightGuard(copy.deepcopy(self._shown, memo), copy.deepcopy(self._describe, memo), self._built_on)

    def remove(self) -> None:
        for _, handle in self._handles.values():
            handle.remove()
        self._handles.clear()
