"""Merging, combining and unloading StocTuning adapters: PEFT's merge API over sparse deltas applied in place."""

from __future__ import annotations

import copy
import warnings

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

from .. import compat
from ..quantized import bnb_weights as quantized
from .config import union_of_excludes, union_of_targets
from .delta import SparseDelta

DEQUANTIZED_MERGE = (
    "merge_and_unload() on a quantized base gives a dequantized model: each quantized layer StocTuning tuned becomes "
    "an nn.Linear in its compute dtype holding the dequantized weight with the adapter's delta added. Merging back "
    "into 4 or 8 bits would round most of the delta away; to keep the base quantized, keep the adapter apart "
    "(PeftModel) or call unload()."
)


class Merging:
    """`merge_adapter`, `unmerge_adapter`, `add_weighted_adapter` and unloading, for `StocTuningModel`."""

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            if name not in self.stoc_state.stoc_adapters:
                raise ValueError(f"Adapter {name!r} not found; adapters: {list(self.stoc_state.stoc_adapters)}")
        # PEFT's rule and wording: adapters merged already stay merged, the others are merged in addition.
        names = check_adapters_to_merge(self.stoc_state, names)
        if not names:
            return
        if safe_merge:
            for name in names:
                _check_finite(self.adapter_delta(name), name)
        self.stoc_state.merged_adapters = list(self.stoc_state.merged_adapters) + names
        self._apply_adapter_state()

    def unmerge_adapter(self) -> None:
        if not self.stoc_state.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.stoc_state.merged_adapters = []
        self._apply_adapter_state()

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear", **options
    ) -> None:
        """Add `adapter_name` = Σ weights[i] · delta(adapters[i]) (union of entries). It is not made active.

        Args:
            combination_type: only "linear" applies to sparse deltas (LoRA's "svd", "cat", "ties", ... combine
                low-rank factors, which StocTuning adapters do not have).
        """
        if combination_type != "linear":
            raise ValueError(
                f"combination_type={combination_type!r} does not apply to StocTuning adapters, which are "
                "sparse deltas: use combination_type='linear' (a weighted sum of the deltas)."
            )
        given = {key: value for key, value in options.items() if value is not None}
        if given:
            raise ValueError(f"{sorted(given)} only apply to other combination types; StocTuning combines linearly.")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists.")
        missing = [a for a in adapters if a not in self.stoc_state.stoc_adapters]
        if missing:
            raise ValueError(f"Unknown adapters {missing}; adapters: {list(self.stoc_state.stoc_adapters)}")
        if not adapters:
            raise ValueError("`adapters` must name at least one adapter.")
        heads = {tuple(sorted(self.peft_config[a].modules_to_save or [])) for a in adapters}
        if len(heads) > 1:
            raise ValueError("Cannot combine adapters whose modules_to_save differ.")
        combined = SparseDelta.weighted_sum([self.adapter_delta(a) for a in adapters], list(weights))
        for name, (_, values) in combined.tensors.items():
            if not bool(torch.isfinite(values.float()).all()):
                raise ValueError(
                    f"The weighted sum overflows in '{name}' (values beyond float range); use smaller "
                    "weights. Nothing was added."
                )
        config = copy.deepcopy(self.peft_config[adapters[0]])
        config.inference_mode = True
        config.target_modules = union_of_targets([self.peft_config[a] for a in adapters])
        config.exclude_modules = union_of_excludes([self.peft_config[a] for a in adapters])
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)
        self.stoc_state.stoc_adapters[adapter_name].delta = combined
        self._copy_modules_to_save(adapters[0], adapter_name)
        self._apply_adapter_state()

    def _copy_modules_to_save(self, source: str, target: str) -> None:
        """The combined adapter keeps the task head of the first adapter."""
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
                if source in module.modules_to_save and target in module.modules_to_save:
                    module.modules_to_save[target].load_state_dict(module.modules_to_save[source].state_dict())

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        layer, params = self.stoc_state, self.base_params()
        if merge:
            names = list(adapter_names) if adapter_names is not None else list(self._adapters_to_apply())
            if safe_merge:
                for name in names:
                    _check_finite(self.adapter_delta(name), name)
            compat.set_adapters_disabled(layer, False)
            layer.merged_adapters = names
            self._apply_adapter_state()
            self._dequantize_merged()
        self._forget_engines()
        if not merge:
            layer.restore(params)
            # `unload` hands back the base exactly as it was given: its original heads, not the trained copies.
            for key, module in list(self.model.named_modules()):
                if isinstance(module, ModulesToSaveWrapper):
                    parent, _, child = compat.get_submodules(self.model, key)
                    setattr(parent, child, module.original_module)
        layer.show_adapters()
        layer.patch = type(layer.patch)()
        self._remove_layer()
        for param, requires_grad in self._requires_grad_before.values():
            param.requires_grad_(requires_grad)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _dequantize_merged(self) -> None:
        """Replace every quantized layer that has an overlay by a float layer computing what it computed."""
        overlays = list(self.stoc_state.overlays.values())
        if not overlays:
            return
        warnings.warn(DEQUANTIZED_MERGE, stacklevel=4)
        for overlay in overlays:
            module = overlay.layer
            weights = overlay.effective_weight()
            dtype = quantized.compute_dtype(module) or getattr(self.model, "dtype", torch.float32)
            parent, _, child = compat.get_submodules(self.model, overlay.name.rpartition(".")[0])
            setattr(parent, child, quantized.dequantized_linear(module, weights, dtype))
            overlay.index, overlay.values, overlay.base = overlay.index[:0], overlay.values[:0], overlay.base[:0]
        if not any(quantized.kind(p) for p in self.model.parameters()):
            quantized.forget_quantization(self.model)


def _check_finite(delta: SparseDelta, adapter_name: str) -> None:
    for name, (_, values) in delta.tensors.items():
        if not torch.isfinite(values).all():
            raise ValueError(f"Adapter {adapter_name!r} has non-finite values in '{name}'; refusing to merge.")
