"""`StocTuningState`: the adapters' state in the model tree (`model.stoc_tuning`): one `AdapterSlot` per adapter
(its sparse delta and step count) and the `Originals` of changed entries, applied to and reverted from the base in
place.

The base trains in place, so there are no per-layer wrappers. This module is a PEFT `BaseTunerLayer`, which
`get_model_status` and `disable_adapter` look for.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..distributed import sharded_draw, shards
from .base_view import BaseView
from .delta import SparseDelta, add_delta
from .originals import Originals, Params, StateHolder


class AdapterSlot(StateHolder):
    """One named adapter: its delta (empty until trained or loaded) and its step count, both in `state_dict()`."""

    def __init__(self, delta: SparseDelta | None = None):
        super().__init__()
        self.delta = delta or SparseDelta()
        self.step = 0  # optimizer steps taken, as last loaded
        self.version = 0  # bumped whenever the delta is replaced (not when training extends it in place)
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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not ours:
            return
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in ours.items():
            if key.startswith("delta."):
                name, _, field = key[len("delta.") :].rpartition(".")
                parts.setdefault(name, {})[field] = value.clone()
        self.delta = SparseDelta({name: (p["index"], p["values"]) for name, p in parts.items()})
        self.version += 1
        if "step" in ours:
            self.step = int(ours["step"])


class StocTuningState(nn.Module, BaseTunerLayer):
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
        self.overlays = nn.ModuleDict()  # per quantized candidate weight: its changed entries (`overlay.Overlay`)
        self.patch = Originals()  # registered after `stoc_adapters`: loaded last, it announces the completed load
        self._view: BaseView | None = None  # while adapters are disabled: the base shown to the forward
        self._active_adapter = "default"
        self.merged_adapters = []
        self._disable_adapters = False

    def _apply(self, fn, recurse: bool = True):
        # `.to()`, `.half()`, ...: the weights were converted along with this layer's state; the audits' checksums
        # of their bits are taken anew.
        result = super()._apply(fn, recurse)
        tuner = self.__dict__.get("tuner")
        if tuner is not None:
            for engine in tuner.step_engines():
                engine.audit.forget()
        return result

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
                flat, start = shards.writable_entries(param)
                index = index.to(flat.device)
                if shards.is_shard(param):  # FSDP2: each process changes the rows it holds
                    inside = (index >= start) & (index < start + flat.numel())
                    index, values = index[inside], values[inside.to(values.device)]
                self.patch.record(name, param, index)
                local = index - start
                flat[local] = add_delta(flat[local], values)
        self.applied = tuple(names)
        shards.reshard(params.values())

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
        self.show_adapters()
        self.patch.restore(params)
        self.applied = ()

    def capture(self, name: str, params: Params, masters=None) -> None:
        """Store what training changed in place as adapter `name`'s delta (it must be the only one applied). Under
        FSDP2 each process holds the changes of its rows, and the delta gathers them all: call it on every process."""
        if self.applied == (name,):
            view = self._view
            if view is not None:
                view.close()  # the adapted values, not the base shown while disabled
            delta = self.patch.delta(params, masters)
            group = shards.shard_group(params.values())
            if group is not None:
                gathered = sharded_draw.gather_entries(delta.tensors, list(params), group)
                delta = SparseDelta(
                    {n: (i.to(params[n].device), v.to(params[n].device)) for n, (i, v) in gathered.items()}
                )
            self.stoc_adapters[name].delta = delta
            if view is not None:
                view.open()

    # -- disabling without forgetting --------------------------------------------------------------------------
    def show_base(self, params: Params) -> None:
        """Show the base in place while the adapted values wait aside (see `BaseView`)."""
        if self._view is None:
            self._view = BaseView(self.patch, params)

    def show_adapters(self) -> None:
        """Put the adapted values back in place of the shown base (the end of `show_base`)."""
        if self._view is not None:
            self._view.close()
            self._view = None

    @property
    def shown(self) -> tuple[str, ...]:
        """The adapters whose deltas the weights show now: none while the base is shown."""
        return () if self._view is not None else self.applied

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
        params = tuner.base_params() if tuner is not None else {}
        parts = {name: (index, patch.original[name]) for name, index in patch.index.items()}
        group = shards.shard_group(params.values())
        if group is None:
            return parts
        gathered = sharded_draw.gather_entries(
            parts, list(params), group, dtypes={name: p.dtype for name, p in params.items()}
        )
        return {
            name: (index.to(params[name].device), values.to(params[name].device))
            for name, (index, values) in gathered.items()
        }

    # -- BaseTunerLayer bookkeeping ----------------------------------------------------------------------------
    # This layer wraps no module: BaseTunerLayer's `weight` / `bias` would look for a base layer and recurse.
    weight = None
    bias = None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """Deltas follow the parameters they change (see `_apply`); there is no base layer to follow."""

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Switching at this level is the tuner's switch: one adapter at a time, written into the weights."""
        tuner = self.__dict__.get("tuner")
        if tuner is not None and not tuner.switching:
            tuner.set_adapter(adapter_names, inference_mode=inference_mode)
            return
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def set_active(self, names: list[str], enabled: bool) -> None:
        self._active_adapter = names[0] if len(names) == 1 else list(names)
        self._disable_adapters = not enabled


def find_tuner(model, required: bool = False):
    """The StocTuning tuner of `model` — the tuner itself, a PeftModel (also inside DDP's `.module`) or a model
    adapted in place (`inject_adapter_in_model`, transformers' PEFT integration) — found through the state layer
    the adapted model carries. None when it has none, or a TypeError if `required`."""
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, StocTuningState) and module.__dict__.get("tuner") is not None:
                return module.tuner
    if required:
        raise TypeError(f"{type(model).__name__} carries no StocTuning adapter.")
    return None
