"""`WeightGuard`: a backward runs on the weights its graph was built with.

Switching adapters and showing the base (`disable_adapter()`) write into the weights without bumping their version
counters (`shards.writable_entries`): a graph built before a switch is valid again after the switch back, which is
what DPO's reference pass needs (TRL switches between the policy's forward and its backward). The case torch's
version check would have caught — a backward while the weights show something else — is refused here instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class WeightGuard:
    """Refuses the gradient of a candidate weight unless the weights show the adapter being trained.

    Candidate weights require gradients only while an adapter trains, so a gradient that reaches one comes from a
    graph built while that adapter was shown; computing it while the base or another adapter is shown would give
    gradients of other weights than the graph's (and of no adapter being trained)."""

    def __init__(self, showing_trained: Callable[[], bool], describe: Callable[[], str]):
        self._showing_trained, self._describe = showing_trained, describe
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}

    def watch(self, params: Iterable[torch.nn.Parameter]) -> None:
        for param in params:
            if id(param) not in self._handles:
                self._handles[id(param)] = param.register_hook(self._check)

    def _check(self, grad: torch.Tensor) -> None:
        if not self._showing_trained():
            raise RuntimeError(
                f"A backward reached StocTuning's weights while they show {self._describe()}, not the adapter the "
                "graph was built with. Leave `disable_adapter()` (or switch back with `set_adapter`) before calling "
                "backward; nothing was updated."
            )

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
