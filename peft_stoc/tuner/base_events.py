"""What happens to the base under the adapters from outside (a part of `model.StocTuningModel`): FSDP2 replacing its
parameters with shards, state dicts taken on every process, and loads — of the adapters' state with the weights, or
of base weights alone under applied adapters.
"""

from __future__ import annotations

from peft.utils.other import AuxiliaryTrainingWrapper

from .. import compat
from ..distributed import shards
from .stoc_state import StocTuningState


class BaseEvents:
    """Sharding, state dicts and base loads of `StocTuningModel`'s model, with adapters applied to it."""

    # -- FSDP2 -----------------------------------------------------------------------------------------------------
    def _follow_shards(self) -> None:
        """FSDP2's `fully_shard` (applied after `get_peft_model`) replaced the parameters with dim-0 shards: every
        adapter follows the shards, and the record of originals keeps the entries of the rows held here (other
        processes keep theirs). Nothing keeps the whole parameters alive afterwards."""
        candidates = [c for cs in (r.candidates for r in self._adapters.values()) for c in cs]
        attribute = {id(c.param): c.name.rpartition(".")[2] for c in candidates}
        placed = (c for c in candidates if c.uses and c.overlay is None)  # (a quantized weight's handle is the tuner's)
        if all(compat.module_parameters(c.uses[0].module).get(attribute[id(c.param)]) is c.param for c in placed):
            return
        replaced = shards.sharded_replacements(candidates)
        if not replaced:
            return
        for candidate in candidates:
            candidate.param = replaced.get(id(candidate.param), candidate.param)
        managed = shards.fsdp2_shards()
        now = {
            key: managed[(id(module), name)]
            for key, (module, name) in self._homes.items()
            if (id(module), name) in managed
        }
        following = {}
        for key, (param, requires_grad) in self._requires_grad_before.items():
            param = now.get(key, param)
            following[id(param)] = (param, requires_grad)
        self._requires_grad_before = following
        self._homes = {(id(now[key]) if key in now else key): home for key, home in self._homes.items()}
        layer = self.stoc_state
        layer.show_adapters()
        layer.patch.hold_only({c.name: c.param for c in candidates})
        self._fingerprints.clear()
        for engine in self.step_engines():
            engine.parameters_replaced()
            engine.accept_weights(base_too=True)
        self._weight_guard.watch(c.param for c in candidates if c.param.requires_grad)  # the shards now

    def gather_for_save(self) -> None:
        """FSDP2: collect the applied adapters' deltas and the base fingerprints from every process now (state dicts
        are taken on every process), so that a save the main process then makes alone (Trainer under FSDP) needs no
        collective."""
        if shards.shard_group(self.base_params().values()) is None:
            return
        for name in self.stoc_state.applied:
            self._capture(name)
        for config in self.peft_config.values():
            self.base_fingerprint(config)
        self._whole_heads = {}  # the fully trained copies (modules_to_save), gathered whole
        for module_name, module in self.model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
                for adapter, trained in module.modules_to_save.items():
                    for name, param in trained.named_parameters():
                        whole = param.full_tensor() if shards.is_shard(param) else param.detach().clone()
                        self._whole_heads[f"{module_name}.modules_to_save.{adapter}.{name}"] = whole

    # -- loads into the model -----------------------------------------------------------------------------------
    def _after_state_loaded(self) -> None:
        """`load_state_dict` replaced the adapters' state (originals, deltas, steps) along with the weights: what
        the weights hold now is the applied adapters' work, to be captured afresh; training goes on from there."""
        layer = self.stoc_state
        self._forget_engines()
        layer.patch.hold_only(self.base_params())  # FSDP2: a state dict holds the originals of every process
        self._steps_loaded.update({name: slot.step for name, slot in layer.stoc_adapters.items()})
        for record in self._adapters.values():
            record.captured_at = 0
        self._stale.update(layer.applied)
        self._apply_adapter_state()

    def _before_base_load(self, module, state_dict, prefix, *args) -> None:
        """Base weights loaded while adapters are applied (`get_base_model().load_state_dict(...)`, PEFT's
        `set_base_model_state_dict`) replace the base under the adapters: the applied deltas are stored and the
        base restored before the load writes, and `_after_base_load` applies them again on the loaded base. A state
        dict that carries the adapters' state (a checkpoint of the whole model) is loaded as it is instead."""
        layer = self.stoc_state
        if any(key.startswith(f"{prefix}{StocTuningState.ATTRIBUTE}.") for key in state_dict):
            return
        if not layer.applied or not any(f"{prefix}{name}" in state_dict for name in layer.patch.index):
            return
        if args and args[0].get("assign_to_params_buffers"):  # local_metadata of `load_state_dict(assign=True)`
            raise ValueError(
                "load_state_dict(..., assign=True) would replace the parameters that hold the applied StocTuning "
                "adapter, which could then neither be shown nor removed; nothing was loaded. Load without "
                "`assign=True` (the loaded base keeps the adapter on it), or `unload()` first."
            )
        self._store_and_forget_engines()  # their record of the weights (and float32 masters) described the old base
        layer.restore(self.base_params())
        self._loading_base = True

    def _after_base_load(self, module, incompatible_keys) -> None:
        if self._loading_base:
            self._loading_base = False
            self._apply_adapter_state()
