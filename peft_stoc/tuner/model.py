"""`StocTuningModel`: the PEFT tuner for Stochastic Tuning.

The base model trains in place: no layers are wrapped and a forward costs what the plain model's does. The tuner
decides which parameters are candidates, keeps every adapter as a sparse delta, applies exactly one of them (or a
merged set) to the base, and runs a `StepEngine` while the active adapter is trainable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper, set_additional_trainable_modules
from torch import nn

from .. import compat
from ..adapter_files.adapter_file import AdapterFile
from ..adapter_files.adapter_io import AdapterFiles
from ..adapter_files.transactions import Transactions
from ..integration.trainer_hooks import register_trainer_callback
from ..quantized import bnb_weights as quantized
from ..quantized.overlay import Overlay
from .adapter_state import AdapterRecord, AdapterState
from .base_events import BaseEvents
from .candidates import (
    Candidate,
    LeftOut,
    describe_left_out,
    find_candidates,
    refuse_unsupported_quantization,
    resolve_count,
)
from .delta import SparseDelta
from .merging import Merging
from .stoc_state import AdapterSlot, StocTuningState
from .training_api import TrainingAPI
from .weight_guard import WeightGuard

# Set while a copy is made only to be pickled: it starts no step engine (its hooks could not be pickled).
_DETACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_stoc_detached", default=False)


@contextlib.contextmanager
def detached_copies():
    """Copies of StocTuning models made inside start no step engine."""
    token = _DETACHED.set(True)
    try:
        yield
    finally:
        _DETACHED.reset(token)


class StocTuningModel(Transactions, AdapterFiles, Merging, TrainingAPI, AdapterState, BaseEvents, BaseTuner):
    """Stochastic Tuning of a transformers model (Akbar-Tajari & Pilehvar).

    Created by `peft.get_peft_model(model, StocTuningConfig(...))`; not meant to be built directly.

    Args:
        model (`torch.nn.Module`): the base model; it trains in place, no module is replaced.
        config (`StocTuningConfig` or `dict[str, StocTuningConfig]`): the adapter's configuration.
        adapter_name (`str`): name of the adapter, `"default"` by default.

    Example:

        ```py
        >>> import torch
        >>> from peft import get_peft_model
        >>> from peft_stoc import StocTuningConfig

        >>> model = get_peft_model(base, StocTuningConfig(k=0.0008, task_type="CAUSAL_LM"))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # any torch optimizer, as for full training
        >>> model(**batch).loss.backward()
        >>> optimizer.step()  # k entries drawn and updated
        >>> model.stoc_stats()  # step, drawn, changed, density, memory held, adapter bytes
        ```

    Attributes:
        model (`torch.nn.Module`): the base model, whose `stoc_tuning` child holds every adapter's state.
        peft_config (`dict[str, StocTuningConfig]`): the adapters' configurations.
    """

    prefix: str = "stoc_"
    tuner_layer_cls = StocTuningState
    target_module_mapping: dict[str, list[str]] = {}
    # True while `set_adapter` runs PEFT's switch, whose call of the layer's `set_adapter` must not come back here.
    switching: bool = False

    # -- injection ---------------------------------------------------------------------------------------------
    @property
    def stoc_state(self) -> StocTuningState:
        """The adapters' state, kept in the model itself (`model.stoc_tuning`); see `StocTuningState`."""
        return self.__dict__["_stoc_layer"]

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        register_trainer_callback()  # transformers' trainer may have finished importing only now
        if "_stoc_layer" not in self.__dict__:
            layer = StocTuningState()
            model.add_module(StocTuningState.ATTRIBUTE, layer)
            # Referenced, not registered: registered here too, its state would appear twice in state_dict().
            self.__dict__["_stoc_layer"] = layer
            object.__setattr__(layer, "tuner", self)  # how hooks on the model find their way back
            layer.patch.after_load = self._after_state_loaded
            layer.patch.whole = layer.whole_patch
            self._awaiting: set[str] = set()  # adapters configured from a saved file whose deltas were not loaded
            self._validated: dict[str, AdapterFile] = {}  # files `load_adapter` validated, until PEFT loads them
            self._cpu_layouts = quantized.hold_canonical(model)
            self._delta_guard = model.register_forward_pre_hook(self._refuse_missing_delta)
            self._weight_guard = WeightGuard(self._trained_view, self._shown_text)
            self._base_load_hooks = (
                model.register_load_state_dict_pre_hook(self._before_base_load),
                model.register_load_state_dict_post_hook(self._after_base_load),
            )
            self._loading_base = False
            self._adapters: dict[str, AdapterRecord] = {}
            self._steps_loaded: dict[str, int] = {}  # optimizer steps an adapter loaded from a file had taken
            self._stale: set[str] = set()  # adapters whose weights changed without a capture (a state dict load)
            self._requires_grad_before = {id(p): (p, p.requires_grad) for p in model.parameters()}
            # Where each parameter lives, to follow FSDP2 when it replaces the parameters with shards.
            self._homes = {
                id(p): (m, n) for m in model.modules() for n, p in compat.module_parameters(m).items() if p is not None
            }
            self._fingerprints: dict[tuple, dict] = {}  # under FSDP2: gathered once (`base_fingerprint`)

    def __setstate__(self, state) -> None:
        """A copy (`copy.deepcopy(peft_model)`: a reference model, a snapshot) trains on its own, from the same
        adapters and step counts, and nothing of it reaches back into the model it was copied from. (A `__deepcopy__`
        here would also answer for the PEFT model, which hands unknown attributes to its tuner.)"""
        super().__setstate__(state)
        self._after_copy()

    def _after_copy(self) -> None:
        """The copied step engines hold copies of this model's hooks and gradients, bound to the original's
        optimizer: the copy stores what its weights hold, retires them and starts its own when it trains."""
        self.__dict__.pop("_state_before", None)  # the record of the original's modules before its first load
        quantized.own_weights(self.model)
        self._requires_grad_before = {id(p): (p, flag) for p, flag in self._requires_grad_before.values()}
        self._homes = {
            id(compat.module_parameters(module)[name]): (module, name)
            for module, name in self._homes.values()
            if compat.module_parameters(module).get(name) is not None
        }
        self._store_and_forget_engines()
        for record in self._adapters.values():
            record.captured_at = 0
        if not _DETACHED.get():
            self._apply_adapter_state()

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("StocTuning trains the base in place and replaces no module.")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Only modules_to_save wrappers are replaced on unload, by a complete module (the trained copy or the
        # original). PEFT's default copies `.weight` over, which heads without one (RobertaClassificationHead) lack.
        setattr(parent, child_name, new_module)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._pre_injection_hook(model, self.peft_config[adapter_name], adapter_name)
        config = self.peft_config[adapter_name]
        candidates = self._candidates_of(model, config)
        k, max_changed = _draw_counts(config, candidates)
        self._adapters[adapter_name] = AdapterRecord(candidates, k, max_changed, trainable=not config.inference_mode)
        if (config.saved_counts or {}).get("changed"):
            self._awaiting.add(adapter_name)
        if not config.inference_mode and not self._trainable_candidates(adapter_name):
            del self._adapters[adapter_name]
            raise ValueError(
                "Every candidate parameter was frozen (requires_grad=False) before wrapping, so there is nothing to "
                "train. Unfreeze the parameters StocTuning should draw from, or pick them with `target_modules`."
            )
        slot = AdapterSlot(self._delta_shared_with(adapter_name))
        slot.refresh = functools.partial(self._refresh, adapter_name)  # (a copy of the model rebinds it)
        self.stoc_state.stoc_adapters[adapter_name] = slot
        if slot.delta.tensors:
            self._awaiting.discard(adapter_name)
        owners = {name.rpartition(".")[0] for name in (c.name for c in candidates)}
        self.targeted_module_names.extend(sorted(owners - set(self.targeted_module_names)))
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        self._apply_adapter_state()

    def _candidates_of(self, model: nn.Module, config) -> list[Candidate]:
        """The candidates of a new adapter with `config`; a warning names the matched weights left out of them."""
        refuse_unsupported_quantization(model)
        left_out: list[LeftOut] = []
        candidates = find_candidates(model, config, left_out, overlay_for=self._overlay_for)
        if config.memory == "dense" and any(c.overlay is not None for c in candidates):
            raise ValueError(
                "StocTuningConfig(memory='dense') keeps a dense gradient of every candidate, which a quantized base's "
                "weights do not have: their gradients are drawn from as the backward computes them. Use the default "
                "memory='auto' (or 'lean') with torch.optim SGD, Adam or AdamW."
            )
        if left_out:
            drawn_from = sum(c.numel for c in candidates)
            share = sum(item.entries for item in left_out) / (drawn_from + sum(item.entries for item in left_out))
            warnings.warn(
                f"StocTuning leaves {len(left_out)} weights of the matched modules out of the candidates "
                f"({share:.1%} of their entries): {describe_left_out(left_out)}. They stay as they are and are not "
                f"tuned; the draw runs over the other {len(candidates)} tensors ({drawn_from:,} entries). To tune "
                "every weight, load the base in a float dtype (e.g. torch_dtype=torch.bfloat16) or quantized with "
                "bitsandbytes.",
                stacklevel=3,  # the caller of `inject_adapter`
            )
        return candidates

    def _overlay_for(self, name: str, module: nn.Module) -> Overlay:
        """The overlay of the quantized weight `name` (owned by `module`), shared by every adapter."""
        overlays = self.stoc_state.overlays
        key = name.replace(".", "-")  # (module names cannot hold dots)
        if key not in overlays:
            quantized.refuse_without_compute_dtype(module, name)
            overlays[key] = Overlay(module, name).attach()
        return overlays[key]

    def _delta_shared_with(self, adapter_name: str) -> SparseDelta | None:
        """An adapter added with the very config object of an existing adapter starts as a copy of that adapter.

        A LoRA adapter so added is a fresh one whose parameters the caller copies (TRL's DPO builds its reference
        adapter from the policy's config and copies every parameter named `.default.`); a StocTuning adapter's
        state is a sparse delta, not parameters, so the copy is made here. Its own training history starts
        afresh."""
        config = self.peft_config[adapter_name]
        for name, other in self.peft_config.items():
            if other is config and name != adapter_name and name in self.stoc_state.stoc_adapters:
                return self.adapter_delta(name).clone()
        return None

    def _remove_layer(self) -> None:
        """The model goes back to the caller without StocTuning's state in its tree."""
        for overlay in self.stoc_state.overlays.values():
            overlay.remove()
        quantized.release_canonical(self._cpu_layouts)
        children = compat.module_children(self.model)
        if isinstance(children.get(StocTuningState.ATTRIBUTE), StocTuningState):
            del children[StocTuningState.ATTRIBUTE]
        self._delta_guard.remove()
        self._weight_guard.remove()
        for handle in self._base_load_hooks:
            handle.remove()

    def _refuse_missing_delta(self, module, args) -> None:
        """transformers' `from_pretrained(adapter_dir)` and `load_adapter` load only tensors the model already has:
        a StocTuning adapter's sparse deltas are left out. Refuse to compute with such a model instead of giving
        the base's outputs under the adapter's name."""
        if not self._awaiting:  # the usual case, and the only check torch.compile traces
            return
        missing = [name for name in self._awaiting if name in self._adapters_to_apply()]
        if missing and compat.hf_peft_config_loaded(self.model):
            counts = self.peft_config[missing[0]].saved_counts or {}
            raise RuntimeError(
                f"StocTuning adapter {missing[0]!r} was loaded through transformers' PEFT integration "
                "(`from_pretrained(adapter_dir)` or `model.load_adapter`), which loads only tensors the model already "
                f"has: its {counts.get('changed', 'sparse')} changed entries were left out, so the outputs would be "
                "the base model's. Load it with `peft.PeftModel.from_pretrained(model, path)` or "
                "`peft.AutoPeftModelFor...from_pretrained(path)` instead."
            )

    # -- PEFT API ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel's per-sample `adapter_names` (mixed-adapter batches): one set of base weights serves the batch.
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "StocTuning changes the base weights themselves, so one adapter serves a whole batch: "
                "`adapter_names` (several adapters in one batch) is not supported. Run one batch per adapter, "
                "switching with `set_adapter`."
            )
        yield

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)  # modules_to_save wrappers
        compat.set_adapters_disabled(self.stoc_state, not enabled)
        self._apply_adapter_state()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(
                "StocTuning activates one adapter at a time. To use several together, combine them with "
                "`add_weighted_adapter` or apply them with `merge_adapter(adapter_names=[...])`."
            )
        if names[0] not in self.stoc_state.stoc_adapters:
            raise ValueError(f"Adapter {names[0]!r} not found; adapters: {list(self.stoc_state.stoc_adapters)}")
        if self.stoc_state.merged_adapters:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            self.stoc_state.merged_adapters = []
        self.switching = True  # PEFT calls the layer's `set_adapter`, which otherwise comes back here
        try:
            super().set_adapter(names[0], inference_mode=inference_mode)  # modules_to_save wrappers
        finally:
            self.switching = False
        self._adapters[names[0]].trainable = not inference_mode
        self._apply_adapter_state()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().set_requires_grad(names, requires_grad=requires_grad)
        for name in names:
            self._adapters[name].trainable = requires_grad
        self._apply_adapter_state()

    def delete_adapter(self, adapter_name: str) -> None:
        layer = self.stoc_state
        if adapter_name not in layer.stoc_adapters:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if adapter_name in layer.merged_adapters:
            raise ValueError(
                f"Cannot delete adapter(s) ['{adapter_name}'] while they are merged. Please unmerge them first."
            )
        self._drop_engine(adapter_name)
        if adapter_name in layer.applied:
            layer.restore(self.base_params())
        del layer.stoc_adapters[adapter_name]
        del self.peft_config[adapter_name]
        self._adapters.pop(adapter_name, None)
        remaining = list(layer.stoc_adapters)
        if adapter_name in self.active_adapters:
            self.active_adapter = remaining[:1]
            if remaining:
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                    f"{remaining[0]}.",
                    stacklevel=2,
                )
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, new_active_adapters=self.active_adapters or None)
        self._apply_adapter_state()


def _draw_counts(config, candidates: list[Candidate]) -> tuple[int, int | None]:
    """Entries drawn per step (`k`) and the budget of changed entries (`max_changed`) of `config`, resolved over
    `candidates`."""
    k = resolve_count(config.k, candidates, "k")
    max_changed = None if config.max_changed is None else resolve_count(config.max_changed, candidates, "max")
    if max_changed is not None and max_changed < k:
        raise ValueError(
            f"max_changed={config.max_changed!r} resolves to {max_changed} entries, fewer than the {k} drawn "
            "per step; raise max_changed or lower k."
        )
    return k, max_changed
