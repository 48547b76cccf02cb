"""`Originals`: the original value of every base entry that currently differs from the base, recorded once when an
optimizer step first changes it — what unmerging, `disable_adapter()` and every delta are computed from.

Its state (and each adapter's, `layer.AdapterSlot`) is saved under keys that name tensors rather than attributes:
`StateHolder` leads torch.distributed.checkpoint along such keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import sharded_draw, shards
from ..training.unchanged import Unchanged
from .delta import SparseDelta, add_delta

Params = dict[str, nn.Parameter]


def flat(param: torch.Tensor) -> torch.Tensor:
    return shards.local_entries(param)[0]


def _interleave_sorted(old: torch.Tensor, new: torch.Tensor, at: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """`old` and `new` interleaved: `new` at positions `at` (marked in `taken`), `old` in order elsewhere."""
    out = torch.empty(taken.numel(), dtype=old.dtype, device=old.device)
    out.index_copy_(0, at, new)
    return out.masked_scatter_(~taken, old)


class _StatePath:
    """Where `torch.distributed.checkpoint` is led while it follows a key of the adapters' state: every attribute is
    itself."""

    def __getattr__(self, name: str):
        if name.startswith("_"):  # (hooks such as `_fqn_modifiers` are looked up along the way)
            raise AttributeError(name)
        return self


class _ToStatePath(dict):
    """`_fqn_modifiers` of a holder of such state: every name leads to its `_state_path`."""

    def get(self, key, default=None):
        return "_state_path"


class StateHolder(nn.Module):
    """A module whose state-dict keys name no attributes (the tensors' own names, joined by dots).

    torch.distributed.checkpoint (FSDP2's full and sharded state dicts, accelerate's `get_state_dict`) follows every
    part of a state-dict key as an attribute path from the model; `_fqn_modifiers` is its way to redirect that path,
    here to a `_StatePath` that accepts any name."""

    _state_path = _StatePath()

    def _fqn_modifiers(self) -> dict[str, str]:
        return _ToStatePath()


class Originals(StateHolder):
    """Original base values of the entries that currently differ from the base (memory ∝ changed entries).

    A module of the layer so that `state_dict()` / `load_state_dict()` / `.to()` carry it; its tensors change size as
    training goes, so they are plain attributes, written and read by hand."""

    def __init__(self):
        super().__init__()
        self.index: dict[str, torch.Tensor] = {}  # sorted int64 flat indices per tensor
        self.original: dict[str, torch.Tensor] = {}
        self.applied: tuple[str, ...] = ()  # adapters whose deltas are in the weights (kept by the layer)
        self.after_load = None  # called once `load_state_dict` replaced this record
        self.whole = None  # the tuner's: the record of every process (FSDP2 shards hold parts; a collective)
        # Per tensor: the indices last recorded and the record they left (`Unchanged`). A step that reuses its mask
        # records the same indices again: known without a search.
        self._covered: dict[str, tuple] = {}

    def __getstate__(self):
        # (pickled or deep-copied with the model: what was recorded into this process's tensors is known afresh)
        return {**self.__dict__, "_covered": {}}

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.index = {name: fn(index) for name, index in self.index.items()}
        self.original = {name: fn(values) for name, values in self.original.items()}
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        record = self.whole() if self.whole is not None else {n: (i, self.original[n]) for n, i in self.index.items()}
        for name, (index, original) in record.items():
            destination[f"{prefix}{name}.index"] = index
            destination[f"{prefix}{name}.original"] = original
        destination[f"{prefix}applied"] = torch.tensor(list(",".join(self.applied).encode()), dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not ours:
            return  # a state dict from a plain model
        index, original = {}, {}
        for key, value in ours.items():
            name, _, field = key.rpartition(".")
            if field == "index":
                index[name] = value.clone()
            elif field == "original":
                original[name] = value.clone()
        self.index, self.original = index, original
        applied = bytes(ours.get("applied", torch.empty(0, dtype=torch.uint8)).tolist()).decode()
        self.applied = tuple(name for name in applied.split(",") if name)
        if self.after_load is not None:
            self.after_load()

    @property
    def count(self) -> int:
        return sum(index.numel() for index in self.index.values())

    def record(self, name: str, param: torch.Tensor, index: torch.Tensor) -> None:
        """Remember the current values at `index` (sorted, unique) unless already remembered."""
        if self._covers(name, index):
            return
        self._record(name, param, index)
        self._covered[name] = (Unchanged(index), Unchanged(self.index[name])) if name in self.index else None

    def _covers(self, name: str, index: torch.Tensor) -> bool:
        """Whether `index` was recorded into this very record (neither changed since)."""
        covered, current = self._covered.get(name), self.index.get(name)
        return covered is not None and current is not None and covered[0].holds(index) and covered[1].holds(current)

    def _record(self, name: str, param: torch.Tensor, index: torch.Tensor) -> None:
        old = self.index.get(name)
        if old is not None and old.numel():
            # Both sorted: membership and merging by binary search, linear in the entries changed so far.
            slot = torch.searchsorted(old, index)
            known = old.index_select(0, slot.clamp(max=old.numel() - 1)) == index
            index = index.masked_select(~known)
        if index.numel() == 0:
            return
        flat, start = shards.local_entries(param)  # under FSDP2: the rows held here; indices stay whole-tensor
        values = flat.index_select(0, index - start if start else index)
        if old is None or old.numel() == 0:
            self.index[name], self.original[name] = index.clone(), values
            return
        at = torch.searchsorted(old, index) + torch.arange(index.numel(), device=index.device)
        taken = torch.zeros(old.numel() + index.numel(), dtype=torch.bool, device=index.device).index_fill_(0, at, True)
        self.index[name] = _interleave_sorted(old, index, at, taken)
        self.original[name] = _interleave_sorted(self.original[name], values, at, taken)

    def restore(self, params: Params) -> None:
        """Write the original values back (bit for bit) and forget them."""
        with torch.no_grad():
            for name, index in self.index.items():
                flat, start = shards.writable_entries(params[name])
                flat[index.to(flat.device) - start if start else index.to(flat.device)] = self.original[name].to(
                    flat.device
                )
        self.index.clear()
        self.original.clear()
        shards.reshard(params.values())

    def hold_only(self, params: Params) -> None:
        """Keep the entries this process holds (FSDP2: the rows of its shards); other processes keep theirs."""
        for name in list(self.index):
            param = params.get(name)
            if param is None or not shards.is_shard(param):
                continue
            flat, start = shards.local_entries(param)
            index = self.index[name]
            inside = (index >= start) & (index < start + flat.numel())
            self.index[name] = index[inside]
            self.original[name] = self.original[name][inside.to(self.original[name].device)]

    def delta(self, params: Params, masters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> SparseDelta:
        """current − original in float32 over the remembered entries, exact zeros dropped.

        `masters`: float32 master values (sorted indices, values) of low-precision tensors, which hold what training
        accumulated below the weights' resolution; where given they stand for the current values. Each delta is
        chosen so that adding it to the original the way `StocTuningState.apply` does gives the current weight bit
        for bit."""
        tensors = {}
        for name, index in self.index.items():
            flat, start = shards.local_entries(params[name])
            index_here = index.to(flat.device)
            weights = flat.index_select(0, index_here - start if start else index_here)
            current = weights.float()
            if masters and name in masters:
                current = _with_masters(current, index_here, *masters[name])
            diff = exact_delta(self.original[name].to(flat.device), current, weights)
            nonzero = diff != 0
            if nonzero.any():
                tensors[name] = (index[nonzero.to(index.device)], diff[nonzero])
        return SparseDelta(tensors)

    def base_values(self, name: str, param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Base values at `positions`, looking through any change currently applied. Under FSDP2 each process reads
        the positions it holds and the values are summed over the processes: call it on every process."""
        if shards.is_shard(param):
            return self._sharded_base_values(name, param, positions)
        values = flat(param)[positions].clone()
        index = self.index.get(name)
        if index is not None and index.numel():
            positions = positions.to(index.device)
            slot = torch.searchsorted(index, positions).clamp_max(index.numel() - 1)
            hit = index[slot] == positions
            values[hit.to(values.device)] = self.original[name][slot[hit]].to(values.device)
        return values

    def _sharded_base_values(self, name: str, param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        flat, start = shards.local_entries(param)
        positions = positions.to(flat.device)
        inside = (positions >= start) & (positions < start + flat.numel())
        values = torch.zeros(positions.shape, dtype=torch.float64, device=flat.device)
        held = positions.masked_select(inside)
        found = flat.index_select(0, held - start).clone()
        index = self.index.get(name)
        if index is not None and index.numel() and held.numel():
            slot = torch.searchsorted(index, held).clamp_max(index.numel() - 1)
            hit = index[slot] == held
            found[hit] = self.original[name][slot[hit]].to(found.device)
        values.masked_scatter_(inside, found.double())
        values = values.to(sharded_draw.comm_device())
        torch.distributed.all_reduce(values, group=param.device_mesh.get_group())
        return values.to(device=flat.device, dtype=param.dtype)


def _with_masters(current: torch.Tensor, index: torch.Tensor, master_index: torch.Tensor, master: torch.Tensor):
    """`current` (values at sorted `index`) with the master values where the masters have an entry."""
    master_index, master = master_index.to(index.device), master.to(index.device)
    if master_index.numel() == 0:
        return current
    slot = torch.searchsorted(master_index, index).clamp_(max=master_index.numel() - 1)
    hit = master_index.index_select(0, slot) == index
    return torch.where(hit, master.index_select(0, slot), current)


def exact_delta(original: torch.Tensor, current: torch.Tensor, weights: torch.Tensor, tries: int = 4) -> torch.Tensor:
    """d ≈ current − original such that `add_delta(original, d)` equals `weights` bit for bit.

    current − original is rounded to float32, and adding it back can land one rounding step away from the trained
    weight; moving d by one float32 step toward the target fixes that wherever a float32 d can reach it. Where none
    can (an entry that moved by more than its own size), the tensor's deltas are kept in float64, in which the
    difference of two float32 values is exact."""
    base = original.float()
    delta = current - base
    for _ in range(tries):
        landed = add_delta(original, delta)
        off = landed != weights
        if not bool(off.any()):
            return delta
        direction = torch.where(landed.float() < weights.float(), math.inf, -math.inf)
        delta = torch.where(off, torch.nextafter(delta, direction), delta)
    off = add_delta(original, delta) != weights
    if bool(off.any()):
        return torch.where(off, current.double() - original.double(), delta.double())
    return delta
