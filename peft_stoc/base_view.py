"""Showing the base to a forward without touching weights a graph holds (`disable_adapter()`, DPO's reference pass).

The weights hold the active adapter's values; the base's are swapped in per module call and swapped back after it,
so an autograd graph of the adapted model stays valid.
"""

from __future__ import annotations

import torch
from torch import nn

from . import shards
from .originals import Params, Patch, flat


class BaseView:
    """The base model as the forward sees it while adapters are disabled, with nothing written in place.

    During the forward of a module whose parameters carry applied changes, each such parameter's data is swapped for
    a copy holding the original values (`param.data = ...`, which leaves the parameter's version counter alone) and
    swapped back when the call returns. So a graph that holds the adapted weights stays valid — DPO computes its
    reference pass under `disable_adapter()` between the policy's forward and its backward — and the extra memory is
    one module's changed parameters at a time. Parameters owned by other modules than linear layers and norms
    (embedding tables, parameters read outside their module's forward) are swapped for the whole model forward.
    """

    def __init__(self, patch: Patch, params: Params, owners: dict[str, list[nn.Module]], root: nn.Module):
        self.patch, self.params = patch, params
        self._handles = []
        self._swapped: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        per_module: dict[int, tuple[nn.Module, list[str]]] = {}
        for name in patch.index:
            modules = owners.get(name, [])
            scope = modules if modules and all(_swaps_per_call(m) for m in modules) else [root]
            for module in scope:
                per_module.setdefault(id(module), (module, []))[1].append(name)
        for module, names in per_module.values():
            self._handles.append(
                module.register_forward_pre_hook(lambda m, args, names=names: self._swap_in(m, names), prepend=True)
            )
            self._handles.append(
                module.register_forward_hook(lambda m, args, output: self._swap_out(m), always_call=True)
            )

    def _swap_in(self, module: nn.Module, names: list[str]) -> None:
        swapped = self._swapped.setdefault(id(module), [])
        with torch.no_grad():
            for name in names:
                param = self.params[name]
                base = param.detach().clone()
                flat(base)[self.patch.index[name].to(base.device)] = self.patch.original[name].to(base.device)
                swapped.append((param, param.data))
                param.data = base

    def _swap_out(self, module: nn.Module) -> None:
        for param, data in reversed(self._swapped.pop(id(module), [])):
            param.data = data

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module_id in list(self._swapped):
            for param, data in reversed(self._swapped.pop(module_id)):
                param.data = data


class ShardedBaseView:
    """The base shown to the forward of a model sharded by FSDP2, whose modules compute on unsharded copies FSDP2
    gathers from the shards: each process writes the original values into the rows it holds (keeping the adapted
    ones aside) and FSDP2's unsharded copies are dropped, so every forward gathers the base; `close` puts the adapted
    values back the same way. A backward pending across the switch re-gathers the shards it needs (as FSDP2 does for
    resharded modules), which hold the adapted values again by then."""

    def __init__(self, patch: Patch, params: Params):
        self.patch, self.params = patch, params
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.open()

    def open(self) -> None:
        with torch.no_grad():
            for name, index in self.patch.index.items():
                flat, start = shards.local_entries(self.params[name])
                local = index.to(flat.device) - start
                self._kept.append((flat, local, flat.index_select(0, local).clone()))
                flat.index_copy_(0, local, self.patch.original[name].to(flat.device))
        shards.reshard(self.params.values())

    def close(self) -> None:
        with torch.no_grad():
            for flat, local, adapted in reversed(self._kept):
                flat.index_copy_(0, local, adapted)
        self._kept.clear()
        shards.reshard(self.params.values())


def _swaps_per_call(module: nn.Module) -> bool:
    """Modules whose parameters are only read inside their own forward call."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D, nn.LayerNorm)) or type(module).__name__.endswith("RMSNorm")
