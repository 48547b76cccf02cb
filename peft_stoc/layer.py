"""Adapter state held beside the base model: the adapters' sparse deltas and the original values of every entry
that currently differs from the base.

The base trains in place, so there are no per-layer wrappers. One `StocTuningLayer` (a PEFT `BaseTunerLayer`,
which `get_model_status` and `disable_adapter` look for) lives on the tuner, outside the transformers model.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import distributed
from .delta import SparseDelta, add_delta

Params = dict[str, nn.Parameter]


def _flat(param: torch.Tensor) -> torch.Tensor:
    return param.detach().view(-1)


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


class _StateHolder(nn.Module):
    """A module whose state-dict keys name no attributes (the tensors' own names, joined by dots).

    torch.distributed.checkpoint (FSDP2's full and sharded state dicts, accelerate's `get_state_dict`) follows every
    part of a state-dict key as an attribute path from the model; `_fqn_modifiers` is its way to redirect that path,
    here to a `_StatePath` that accepts any name."""

    _state_path = _StatePath()

    def _fqn_modifiers(self) -> dict[str, str]:
        return _ToStatePath()


class Patch(_StateHolder):
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
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
        old = self.index.get(name)
        if old is not None and old.numel():
            # Both sorted: membership and merging by binary search, linear in the entries changed so far.
            slot = torch.searchsorted(old, index)
            known = old.index_select(0, slot.clamp(max=old.numel() - 1)) == index
            index = index.masked_select(~known)
        if index.numel() == 0:
            return
        flat, start = distributed.local_entries(param)  # under FSDP2: the rows held here; indices stay whole-tensor
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
                flat, start = distributed.local_entries(params[name])
                flat[index.to(flat.device) - start if start else index.to(flat.device)] = self.original[name].to(
                    flat.device)
        self.index.clear()
        self.original.clear()
        distributed.reshard(params.values())

    def hold_only(self, params: Params) -> None:
        """Keep the entries this process holds (FSDP2: the rows of its shards); other processes keep theirs."""
        for name in list(self.index):
            param = params.get(name)
            if param is None or not distributed.is_shard(param):
                continue
            flat, start = distributed.local_entries(param)
            index = self.index[name]
            inside = (index >= start) & (index < start + flat.numel())
            self.index[name] = index[inside]
            self.original[name] = self.original[name][inside.to(self.original[name].device)]

    def delta(self, params: Params, masters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> SparseDelta:
        """current − original in float32 over the remembered entries, exact zeros dropped.

        `masters`: float32 master values (sorted indices, values) of low-precision tensors, which hold what training
        accumulated below the weights' resolution; where given they stand for the current values. Each delta is
        chosen so that adding it to the original the way `StocTuningLayer.apply` does gives the current weight bit
        for bit."""
        tensors = {}
        for name, index in self.index.items():
            flat, start = distributed.local_entries(params[name])
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
        if distributed.is_shard(param):
            return self._sharded_base_values(name, param, positions)
        values = _flat(param)[positions].clone()
        index = self.index.get(name)
        if index is not None and index.numel():
            positions = positions.to(index.device)
            slot = torch.searchsorted(index, positions).clamp_max(index.numel() - 1)
            hit = index[slot] == positions
            values[hit.to(values.device)] = self.original[name][slot[hit]].to(values.device)
        return values


    def _sharded_base_values(self, name: str, param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        flat, start = distributed.local_entries(param)
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
        values = values.to(distributed._comm_device())
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


class AdapterSlot(_StateHolder):
    """One named adapter: its delta (empty until trained or loaded) and its step count, both in `state_dict()`."""

    def __init__(self, delta: SparseDelta | None = None):
        super().__init__()
        self.delta = delta or SparseDelta()
        self.step = 0  # optimizer steps taken, as last loaded
        self.refresh = None  # the tuner's: stores what training changed since, returns the current step count

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.delta = SparseDelta({name: (fn(i), fn(v)) for name, (i, v) in self.delta.tensors.items()})
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        step = self.refresh() if self.refresh is not None else self.step
        for name, (index, values) in self.delta.tensors.items():
            destination[f"{prefix}delta.{name}.index"] = index
            destination[f"{prefix}delta.{name}.values"] = values
        destination[f"{prefix}step"] = torch.tensor(step)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not ours:
            return
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in ours.items():
            if key.startswith("delta."):
                name, _, field = key[len("delta."):].rpartition(".")
                parts.setdefault(name, {})[field] = value.clone()
        self.delta = SparseDelta({name: (p["index"], p["values"]) for name, p in parts.items()})
        if "step" in ours:
            self.step = int(ours["step"])


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
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, names=names: self._swap_in(m, names), prepend=True))
            self._handles.append(module.register_forward_hook(
                lambda m, args, output: self._swap_out(m), always_call=True))

    def _swap_in(self, module: nn.Module, names: list[str]) -> None:
        swapped = self._swapped.setdefault(id(module), [])
        with torch.no_grad():
            for name in names:
                param = self.params[name]
                base = param.detach().clone()
                _flat(base)[self.patch.index[name].to(base.device)] = self.patch.original[name].to(base.device)
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
                flat, start = distributed.local_entries(self.params[name])
                local = index.to(flat.device) - start
                self._kept.append((flat, local, flat.index_select(0, local).clone()))
                flat.index_copy_(0, local, self.patch.original[name].to(flat.device))
        distributed.reshard(self.params.values())

    def close(self) -> None:
        with torch.no_grad():
            for flat, local, adapted in reversed(self._kept):
                flat.index_copy_(0, local, adapted)
        self._kept.clear()
        distributed.reshard(self.params.values())


def _swaps_per_call(module: nn.Module) -> bool:
    """Modules whose parameters are only read inside their own forward call."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D, nn.LayerNorm)) or type(module).__name__.endswith("RMSNorm")


class StocTuningLayer(nn.Module, BaseTunerLayer):
    """Holds every adapter's delta and applies/reverts them on the base parameters in place.

    It lives in the model it adapts (as `model.stoc_tuning`), so its state travels with the model: `state_dict()`
    holds the original values of every changed entry, each adapter's delta and step count, and which adapters are
    in the weights; `load_state_dict()` restores them (an accelerate or plain checkpoint taken mid-training resumes
    exactly), and `.to()` / `.half()` move them along with the weights.
    """

    adapter_layer_names = ("stoc_adapters",)
    ATTRIBUTE = "stoc_tuning"  # its name in the adapted model

    def __init__(self):
        nn.Module.__init__(self)
        self.stoc_adapters = nn.ModuleDict()
        self.patch = Patch()  # registered after `stoc_adapters`: loaded last, it announces the completed load
        self._view: BaseView | None = None  # while adapters are disabled: the base shown to the forward
        self._active_adapter = "default"
        self.merged_adapters = []
        self._disable_adapters = False

    # -- applying deltas ---------------------------------------------------------------------------------------
    def apply(self, names: tuple[str, ...], params: Params) -> None:
        """Make the weights `base + Σ delta(name)`; the base is restored first, so this is also a switch.

        Raises, before anything changes, if the result would hold inf/NaN where the base is finite."""
        deltas = [self.stoc_adapters[name].delta for name in names]
        combined = deltas[0] if len(deltas) == 1 else SparseDelta.weighted_sum(deltas, [1.0] * len(deltas))
        self._check_finite_result(combined, params, names)
        self.restore(params)
        with torch.no_grad():
            for name, (index, values) in combined.tensors.items():
                param = params[name]
                flat, start = distributed.local_entries(param)
                index = index.to(flat.device)
                if distributed.is_shard(param):  # FSDP2: each process changes the rows it holds
                    inside = (index >= start) & (index < start + flat.numel())
                    index, values = index[inside], values[inside.to(values.device)]
                self.patch.record(name, param, index)
                local = index - start
                flat[local] = add_delta(flat[local], values)
        self.applied = tuple(names)
        distributed.reshard(params.values())

    def _check_finite_result(self, delta: SparseDelta, params: Params, names: tuple[str, ...]) -> None:
        for name, (index, values) in delta.tensors.items():
            param = params[name]
            base = self.patch.base_values(name, param, index.to(param.device))
            if bool((torch.isfinite(base) & ~torch.isfinite(add_delta(base, values))).any()):
                raise ValueError(
                    f"Applying {list(names)} would turn entries of '{name}' into inf or NaN (the deltas overflow "
                    f"{param.dtype} there); nothing was changed. Use smaller weights or fewer adapters together."
                )

    def restore(self, params: Params) -> None:
        """Back to the base, bit for bit."""
        self.show_adapters(params)
        self.patch.restore(params)
        self.applied = ()

    def capture(self, name: str, params: Params, masters=None) -> None:
        """Store what training changed in place as adapter `name`'s delta (it must be the only one applied). Under
        FSDP2 each process holds the changes of its rows, and the delta gathers them all: call it on every process."""
        if self.applied == (name,):
            hidden = self._view
            if isinstance(hidden, ShardedBaseView):
                hidden.close()  # the adapted values, not the base shown while disabled
            delta = self.patch.delta(params, masters)
            group = distributed.shard_group(params.values())
            if group is not False:
                gathered = distributed.gather_entries(delta.tensors, list(params), group)
                delta = SparseDelta({n: (i.to(params[n].device), v.to(params[n].device))
                                     for n, (i, v) in gathered.items()})
            self.stoc_adapters[name].delta = delta
            if isinstance(hidden, ShardedBaseView):
                hidden.open()

    # -- disabling without forgetting --------------------------------------------------------------------------
    def show_base(self, params: Params, owners: dict[str, list[nn.Module]], root: nn.Module) -> None:
        """Show the base to the forward while the adapted values stay in the weights (see `BaseView`; under FSDP2,
        `ShardedBaseView`)."""
        if self._view is None:
            sharded = any(distributed.is_shard(p) for p in params.values())
            self._view = ShardedBaseView(self.patch, params) if sharded else BaseView(self.patch, params, owners, root)

    def show_adapters(self, params: Params | None = None) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None

    @property
    def hidden(self) -> bool:
        return self._view is not None

    def patch_base_values(self, params: Params):
        """A reader of base values at given positions that looks through the applied deltas."""
        return lambda name, positions: self.patch.base_values(name, params[name], positions)

    # -- travelling with the model -----------------------------------------------------------------------------
    # The state itself is saved and loaded by the children (`stoc_adapters.<name>`, `patch`), which PEFT's
    # helpers recognise as an adapter's own keys (`get_base_model_state_dict` leaves them out).

    @property
    def applied(self) -> tuple[str, ...]:
        """The adapters whose deltas are in the base weights."""
        return self.patch.applied

    @applied.setter
    def applied(self, names: tuple[str, ...]) -> None:
        self.patch.applied = tuple(names)

    def forward(self, *args):
        # Not part of the model's computation; a container that calls every child (nn.Sequential) passes through.
        return args[0] if len(args) == 1 else args

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Runs before the children save the adapters' state: under FSDP2, what they need from every process is
        # collected now (a state dict is taken on every process; the main process may then save alone).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        tuner = getattr(self, "tuner", None)
        if tuner is not None:
            tuner.gather_for_save()

    def whole_patch(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The record of originals of the whole model. Under FSDP2 each process holds the entries of its rows, and a
        state dict gathers them all (a collective, as FSDP2's own state dicts are)."""
        patch = self.patch
        tuner = getattr(self, "tuner", None)
        params = tuner._base_params() if tuner is not None else {}
        parts = {name: (index, patch.original[name]) for name, index in patch.index.items()}
        group = distributed.shard_group(params.values())
        if group is False:
            return parts
        gathered = distributed.gather_entries(parts, list(params), group,
                                              dtypes={name: p.dtype for name, p in params.items()})
        return {name: (index.to(params[name].device), values.to(params[name].device))
                for name, (index, values) in gathered.items()}

    # -- BaseTunerLayer bookkeeping ----------------------------------------------------------------------------
    # This layer wraps no module: BaseTunerLayer's `weight` / `bias` would look for a base layer and recurse.
    weight = None
    bias = None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """Deltas follow the parameters they change (see `_apply`); there is no base layer to follow."""

    def set_active(self, names: list[str], enabled: bool) -> None:
        self._active_adapter = names[0] if len(names) == 1 else list(names)
        self._disable_adapters = not enabled


def find_tuner(model, required: bool = False):
    """The StocTuning tuner of `model` — the tuner itself, a PeftModel (also inside DDP's `.module`) or a model
    adapted in place (`inject_adapter_in_model`, transformers' PEFT integration) — found through the state layer
    the adapted model carries. None when it has none, or a TypeError if `required`."""
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, StocTuningLayer) and module.__dict__.get("tuner") is not None:
                return module.tuner
    if required:
        raise TypeError(f"{type(model).__name__} carries no StocTuning adapter.")
    return None
