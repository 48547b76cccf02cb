"""Showing the base in place while adapters are disabled (`disable_adapter()`, DPO's reference pass).

Every read of a weight then sees the base: a module's forward, a fused kernel that reads `lm_head.weight` itself
(TRL's log-prob helpers), an encoder that `generate` calls outside the model's forward, `state_dict()`.
"""

from __future__ import annotations

import torch

from ..distributed import shards
from .originals import Originals, Params


class BaseView:
    """The base written into the weights for as long as adapters are disabled, the adapted values kept aside.

    Opening keeps the current (adapted) values of the changed entries and writes their originals; closing writes the
    adapted values back, bit for bit. Memory and time are ∝ changed entries. The writes leave the parameters' version
    counters alone (`shards.writable_entries`), so a graph built before `disable_adapter()` and run after it — DPO
    computes its reference between the policy's forward and its backward — stays valid; `weight_guard.WeightGuard`
    refuses a backward while the weights show something else than the graph was built on. Under FSDP2 each process
    writes the rows it holds and FSDP2's unsharded copies are dropped, so every forward gathers what is shown.
    """

    def __init__(self, patch: Originals, params: Params):
        self.patch, self.params = patch, params
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.open()

    @property
    def is_open(self) -> bool:
        return bool(self._kept)

    def open(self) -> None:
        with torch.no_grad():
            for name, index in self.patch.index.items():
                flat, start = shards.writable_entries(self.params[name])
                local = index.to(flat.device) - start if start else index.to(flat.device)
                self._kept.append((flat, local, flat.index_select(0, local)))
                flat.index_copy_(0, local, self.patch.original[name].to(flat.device))
        self._kept.append((torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0)))  # open even if empty
        shards.reshard(self.params.values())

    def close(self) -> None:
        with torch.no_grad():
            for flat, local, adapted in reversed(self._kept):
                flat.index_copy_(0, local, adapted)
        self._kept.clear()
        shards.reshard(self.params.values())
