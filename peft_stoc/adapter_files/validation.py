"""The one validation of an adapter (`validate`), before anything is built from it or applied: loading
(`load_adapter`, `PeftModel.from_pretrained`), `peft-stoc inspect`, `merge` and `compose` all go through it, and
`check_config`, what a StocTuning config must satisfy before an adapter is attached.
"""

from __future__ import annotations

import math
import os

import torch

from . import file_checks
from . import fingerprint as fingerprints
from .adapter_file import AdapterFile, load_tensors, read_metadata
from .file_layout import INDEX_SUFFIX, META_COUNTS, META_HEADS, MODEL_PREFIX, Expected, is_delta_key, stem
from .safetensors_header import DEFAULT_LIMITS, FILE_DTYPES, AdapterFileError, is_count


def check_config(config, counts: dict | None = None, source: str = "the adapter's config") -> None:
    """What a StocTuning config must satisfy before anything is built from it (PEFT would fail while attaching, or
    a save would fail later): `modules_to_save` a list of names, the saved counts and fingerprint well formed, and
    `k` / `max_changed` that fit the candidates `counts` records."""
    heads = getattr(config, "modules_to_save", None)
    if heads is not None and (not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads)):
        raise AdapterFileError(f"{source}: `modules_to_save` must be a list of module names, got {heads!r}.")
    saved = getattr(config, "saved_counts", None)
    if saved is not None:
        file_checks.check_counts(saved, f"{source}: `saved_counts`", loading=True)
    recorded = getattr(config, "base_fingerprint", None)
    problem = fingerprints.problem(recorded) if recorded is not None else None
    if problem:
        raise AdapterFileError(f"{source}: `base_fingerprint` {problem}.")
    counts = counts or saved or {}
    candidates = counts.get("candidates")
    if not (is_count(candidates) and candidates):
        return
    k, budget = getattr(config, "k", None), getattr(config, "max_changed", None)
    drawn = [value for value in (k if isinstance(k, int) and not isinstance(k, bool) else None, counts.get("k"))]
    for value in (v for v in drawn if is_count(v)):
        if value >= candidates:
            raise AdapterFileError(
                f"{source}: k={k!r} gives {value:,} entries per step, not below the {candidates:,} candidate entries."
            )
        if isinstance(budget, int) and not isinstance(budget, bool) and budget < value:
            raise AdapterFileError(f"{source}: max_changed={budget!r} is below the {value:,} entries drawn per step.")


def validate(path: str, config, expected: Expected | None = None, check_base=None, base_values=None) -> AdapterFile:
    """The one validation of an adapter, before anything is built from it or applied.

    Without `expected` (no model at hand) the header is read within `DEFAULT_LIMITS`, then bounded by the base its
    own fingerprint describes; deltas are checked against the shapes the header records and task-head values against
    the widest float dtype of that base. With `expected` (a model), the limits, names, shapes and dtypes are the
    model's, `check_base(file)` compares fingerprints and `base_values` checks that the deltas added to the base stay
    finite. Returns the file with its tensors and its `delta`."""
    file = read_metadata(path, limits=expected.limits() if expected is not None else DEFAULT_LIMITS)
    counts = file_checks.check_counts(file.counts, f"{path}: header entry '{META_COUNTS}'", loading=True)
    check_config(config, counts, source=f"the config of {os.path.dirname(path) or path}")
    recorded = file.fingerprint
    if recorded is None:
        raise AdapterFileError(f"{path} has no base-model fingerprint in its header.")
    if check_base is not None:
        check_base(file)
    numels = _check_bounds(file, recorded, expected, getattr(config, "modules_to_save", None))
    file_checks.check_entries(file.entries, expected, path)
    for tensor_stem in {stem(key) for key in file.entries if is_delta_key(key)}:
        length = file.entries[tensor_stem + INDEX_SUFFIX]["shape"][0]
        file_checks.check_fits(tensor_stem + INDEX_SUFFIX, length, tensor_stem[len(MODEL_PREFIX) :], numels)
    load_tensors(file)
    file.parsed = file_checks.parse_delta(file.tensors, numels, source=path)
    _check_values(file, recorded, expected, numels, base_values)
    return file


def _check_values(
    file: AdapterFile, recorded: dict, expected: Expected | None, numels: dict[str, int], base_values
) -> None:
    """The values read: deltas within range of the base's dtypes, task-head tensors finite in theirs. With
    `expected`, the head entries' dtypes and shapes were checked with the header (`check_entries`)."""
    if expected is not None:
        dtypes, head_specs = expected.dtypes, expected.heads
    else:
        widest = _widest_float(recorded.get("dtypes"))
        dtypes = dict.fromkeys(numels, widest)
        head_specs = {
            key: (tuple(t.shape), widest if t.is_floating_point() else t.dtype)
            for key, t in file.tensors.items()
            if not is_delta_key(key)
        }
    file_checks.check_ranges(file.parsed, dtypes, base_values, source=file.path)
    file_checks.check_other_tensors(file.tensors, head_specs, source=file.path, specs_checked=expected is not None)


def _widest_float(dtype_names) -> torch.dtype:
    dtypes = [getattr(torch, d, None) for d in dtype_names or []]
    floats = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).max, default=torch.float32)


# -- before any tensor is read -------------------------------------------------------------------------------------
def _check_bounds(file: AdapterFile, recorded: dict, expected: Expected | None, modules_to_save) -> dict[str, int]:
    """Before any tensor is read: what the header lists must fit the base its fingerprint describes (a changed
    tensor is one of its tensors), every changed tensor needs a recorded shape, and every other tensor belongs to a
    module in `modules_to_save`. Returns the entries of each changed tensor."""
    stems = {stem(key) for key in file.entries if is_delta_key(key)}
    base_tensors = recorded.get("num_tensors")
    if is_count(base_tensors) and (len(stems) > base_tensors or len(file.entries) > 5 * base_tensors + 64):
        raise AdapterFileError(
            f"{file.path} lists {len(file.entries):,} tensors ({len(stems):,} changed base tensors); its base has "
            f"{base_tensors:,} tensors. Refusing to read it."
        )
    if expected is not None:
        numels = expected.numels
    else:
        numels = {name: math.prod(shape) for name, shape in file.shapes.items()}
        missing = sorted(s.removeprefix(MODEL_PREFIX) for s in stems if s.removeprefix(MODEL_PREFIX) not in numels)
        if missing:
            raise AdapterFileError(f"{file.path} records no shape for the changed tensors {missing[:5]}.")
    if META_HEADS in file.metadata:
        _check_listed_heads(file)
    if expected is None:
        _check_heads_without_model(file, modules_to_save)
    return numels


def _check_listed_heads(file: AdapterFile) -> None:
    """The task-head tensors the header lists (`META_HEADS`, with their shapes) are exactly those the file holds."""
    recorded_heads = file.json_entry(META_HEADS)
    if not isinstance(recorded_heads, dict) or not all(
        isinstance(shape, list) and all(is_count(n) for n in shape) for shape in recorded_heads.values()
    ):
        raise AdapterFileError(
            f"{file.path}: header entry '{META_HEADS}' must map tensor names to shapes, "
            f"got {fingerprints.json_kind(recorded_heads)}."
        )
    held = {key: list(entry["shape"]) for key, entry in file.entries.items() if not is_delta_key(key)}
    for key, shape in recorded_heads.items():
        if key not in held:
            raise AdapterFileError(
                f"Tensor '{key}' (a modules_to_save weight) is missing from {file.path}: its header lists it."
            )
        if held[key] != shape:
            raise AdapterFileError(f"Tensor '{key}' in {file.path} has shape {held[key]}; its header records {shape}.")
    extra = sorted(set(held) - set(recorded_heads))
    if extra:
        raise AdapterFileError(f"{file.path} holds tensors its header does not list: {extra[:5]}.")


def _check_heads_without_model(file: AdapterFile, modules_to_save) -> None:
    """Without a model, every tensor besides the deltas is a weight of a module `modules_to_save` names, and a
    head's weight or bias is a floating-point tensor."""
    for key, entry in file.entries.items():
        if is_delta_key(key):
            continue
        if not _head_of(key, modules_to_save):
            raise AdapterFileError(
                f"{file.path} holds '{key}', which is neither a delta nor a weight of the modules_to_save "
                f"{modules_to_save!r}: an adapter file never holds full base weights."
            )
        dtype = FILE_DTYPES[entry["dtype"]]
        if key.endswith((".weight", ".bias")) and not dtype.is_floating_point:
            raise AdapterFileError(
                f"Tensor '{key}' in {file.path} is a {dtype} tensor: a task-head weight must be a floating-point "
                "tensor."
            )


def _head_of(key: str, modules_to_save) -> bool:
    """Whether file key `key` is a tensor of a module that `modules_to_save` names (PEFT's rule: the module's name
    ends with an entry)."""
    if not key.startswith(MODEL_PREFIX):
        return False
    parts = key[len(MODEL_PREFIX) :].split(".")[:-1]
    modules = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return any(module.endswith(wanted) for module in modules for wanted in modules_to_save or [])
