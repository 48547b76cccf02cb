"""Three `PeftModel` entry points that offer a tuner no hook, extended for StocTuning adapters.

* `save_pretrained`: refuses pickle, refuses to save weights changed outside intercepted steps, writes the
  header metadata (format, counts, base fingerprint) and the model card section.
* `load_adapter` (also reached by `PeftModel.from_pretrained` and `AutoPeftModel*.from_pretrained`): reads and
  validates the whole file — readability, every tensor, the base fingerprint — before anything is applied.
  `ignore_base_mismatch=True` applies an adapter to another base on purpose.
* `push_to_hub`: transformers' version replaces the README with a bare card; this one uploads the adapter with
  its model card.

Models of other PEFT methods go straight to PEFT's own methods.
"""

from __future__ import annotations

import functools
import inspect
import os

from peft import PeftConfig, PeftModel

from . import adapter_file, hub

_MARK = "_peft_stoc_wrapped"
_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "force_download", "local_files_only")


def _tuner(peft_model):
    from .model import StocTuningModel

    tuner = getattr(peft_model, "base_model", None)
    return tuner if isinstance(tuner, StocTuningModel) else None


def _bound(function, self, args, kwargs) -> inspect.BoundArguments:
    bound = inspect.signature(function).bind(self, *args, **kwargs)
    bound.apply_defaults()
    return bound


def _wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        tuner = _tuner(self)
        if tuner is None:
            return original(self, *args, **kwargs)
        call = _bound(original, self, args, kwargs)
        if not call.arguments["safe_serialization"]:
            raise ValueError("StocTuning adapters are saved as safetensors only; drop `safe_serialization=False`.")
        tuner.verify_integrity()
        original(self, *args, **kwargs)
        if not call.arguments["is_main_process"]:
            return
        directory = call.arguments["save_directory"]
        names = call.arguments["selected_adapters"] or list(self.peft_config)
        for name in names:
            folder = directory if name == "default" else os.path.join(directory, name)
            adapter_file.add_metadata(os.path.join(folder, adapter_file.WEIGHTS_NAME), tuner.file_metadata(name))
        hub.write_model_card(directory, {name: self.peft_config[name] for name in names})

    return save_pretrained


def _adapter_path(model_id: str, hub_kwargs: dict) -> str:
    """Local path of the adapter file, downloading it (to the Hub cache PEFT uses next) when needed."""
    subfolder = hub_kwargs.get("subfolder")
    local = os.path.join(model_id, subfolder or "", adapter_file.WEIGHTS_NAME)
    if os.path.isfile(local) or os.path.isdir(model_id):
        return local
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model_id, adapter_file.WEIGHTS_NAME, **hub_kwargs)


def _wrap_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args, ignore_base_mismatch: bool = False, **kwargs):
        tuner = _tuner(self)
        if tuner is None:
            return original(self, model_id, adapter_name, *args, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
        config = self.peft_config.get(adapter_name) or PeftConfig.from_pretrained(model_id, **hub_kwargs)
        file = adapter_file.read(_adapter_path(str(model_id), hub_kwargs))
        tuner.check_file(file, config, ignore_base_mismatch=ignore_base_mismatch)
        tuner.note_loaded(adapter_name, file.counts)
        return original(self, model_id, adapter_name, *args, **kwargs)

    return load_adapter


def _wrap_push_to_hub(original):
    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if _tuner(self) is None:
            return original(self, repo_id, *args, **kwargs)
        kwargs.pop("max_shard_size", None)  # an adapter is one small file
        return hub.push_to_hub(self, repo_id, *args, **kwargs)

    return push_to_hub


def install() -> None:
    """Wrap the three methods once per process (idempotent, also across reloads of peft_stoc)."""
    for name, wrapper in (
        ("save_pretrained", _wrap_save_pretrained),
        ("load_adapter", _wrap_load_adapter),
        ("push_to_hub", _wrap_push_to_hub),
    ):
        current = getattr(PeftModel, name)
        original = getattr(current, _MARK, current)
        wrapped = wrapper(original)
        setattr(wrapped, _MARK, original)
        setattr(PeftModel, name, wrapped)
