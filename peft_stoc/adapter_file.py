"""The adapter file: `adapter_model.safetensors` with sparse deltas, task-head tensors and a descriptive header.

For each changed base tensor `<name>` the file holds `base_model.model.<name>.stoc_indices` (sorted flat indices,
int32 below 2^31 entries, else int64) and `base_model.model.<name>.stoc_delta` (the value added at each index).
The header metadata records the format version, counts and the base-model fingerprint.

Reading parses the 8-byte length and the JSON header itself, within limits, and checks every entry's name, dtype
and shape before any tensor is materialised: a hostile header is refused at the cost of reading it. Everything read
is validated before any of it touches a model; errors name the offending tensor. Writing refuses NaN/inf values,
and `atomic_folder.staged_folder` replaces a whole adapter folder so that a crash at any moment leaves the old
adapter or the new.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import atomic_folder
from . import fingerprint as fingerprints
from .delta import SparseDelta, add_delta
from .safetensors_header import (  # noqa: F401 (AdapterFileError and Limits are part of this module's interface)
    DEFAULT_LIMITS,
    FILE_DTYPES,
    MAX_COUNT,
    AdapterFileError,
    Limits,
    corrupt,
    is_count,
    read_header,
)

WEIGHTS_NAME = atomic_folder.WEIGHTS_NAME
MODEL_PREFIX = "base_model.model."
INDEX_SUFFIX = ".stoc_indices"
VALUES_SUFFIX = ".stoc_delta"
EXACT_AT_SUFFIX = ".stoc_exact_at"
EXACT_SUFFIX = ".stoc_exact"
DELTA_SUFFIXES = (INDEX_SUFFIX, VALUES_SUFFIX, EXACT_AT_SUFFIX, EXACT_SUFFIX)
FORMAT_VERSION = "1"
META_FORMAT = "peft_stoc_format"
META_COUNTS = "peft_stoc_counts"
META_FINGERPRINT = "peft_stoc_fingerprint"
META_SHAPES = "peft_stoc_shapes"
META_HEADS = "peft_stoc_heads"  # the modules_to_save tensors written, with their shapes (absent in older files)
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Expected:
    """What an adapter file for one model may hold: per candidate tensor its entries and dtype, per task-head
    tensor its shape and dtype."""

    numels: dict[str, int]
    dtypes: dict[str, torch.dtype]
    heads: dict[str, tuple[tuple[int, ...], torch.dtype]]

    def limits(self) -> Limits:
        keys = [MODEL_PREFIX + name + INDEX_SUFFIX for name in self.numels] + list(self.heads)
        # An entry is its key and ~100 bytes of dtype, shape and offsets; the shapes metadata repeats each name.
        # A changed tensor has up to four entries: indices, deltas, and exact deltas with their positions.
        per_entry = sum(4 * len(key) + 512 for key in keys)
        return Limits(
            max_tensors=len(DELTA_SUFFIXES) * len(self.numels) + len(self.heads), max_header_bytes=2**20 + 2 * per_entry
        )


# -- reading -----------------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]  # empty until `load_tensors`
    entries: dict[str, dict] = field(default_factory=dict)  # the header's tensor entries: dtype, shape, offsets
    parsed: SparseDelta | None = None  # the validated delta (`validate`)

    def _json_entry(self, key: str):
        raw = self.metadata.get(key)
        if raw is None:
            return None
        cache = self.__dict__.setdefault("_parsed_entries", {})
        if key not in cache:
            try:
                cache[key] = json.loads(raw)
            except (ValueError, RecursionError) as error:
                raise AdapterFileError(f"{self.path}: header entry '{key}' is not valid JSON ({error}).") from None
        return copy.deepcopy(cache[key]) if isinstance(cache[key], (dict, list)) else cache[key]

    @property
    def fingerprint(self) -> dict | None:
        if not self.metadata.get(META_FINGERPRINT):
            return None
        recorded = self._json_entry(META_FINGERPRINT)
        problem = fingerprints.problem(recorded)
        if problem:
            raise AdapterFileError(f"{self.path}: header entry '{META_FINGERPRINT}' {problem}.")
        return recorded

    @property
    def counts(self) -> dict[str, int]:
        counts = self._json_entry(META_COUNTS)
        if counts is None and META_COUNTS not in self.metadata:
            return {}
        return check_counts(counts, f"{self.path}: header entry '{META_COUNTS}'")

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Shapes of the base tensors this file changes."""
        shapes = self._json_entry(META_SHAPES)
        if shapes is None and META_SHAPES not in self.metadata:
            return {}
        if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(is_count(n) for n in s) for s in shapes.values()
        ):
            raise AdapterFileError(
                f"{self.path}: header entry '{META_SHAPES}' must map tensor names to shapes, "
                f"got {fingerprints.json_kind(shapes)}."
            )
        return shapes

    def numels(self) -> dict[str, int]:
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    def delta(self) -> SparseDelta:
        """The validated delta, checked against the shapes recorded in the header."""
        if self.parsed is None:
            self.parsed = parse_delta(self.tensors, self.numels(), source=self.path)
        return self.parsed


def read(
    path: str, require_format: bool = True, expected: Expected | None = None, limits: Limits | None = DEFAULT_LIMITS
) -> AdapterFile:
    """Read an adapter file; raise `AdapterFileError` for unreadable files and for files of another format.

    With `expected`, the header must fit that model (limits derived from it, names, dtypes, shapes) before any
    tensor is read. `limits=None` trusts the file (one this process just wrote).
    """
    file = read_metadata(path, require_format, expected.limits() if expected is not None else limits)
    check_entries(file.entries, expected, path)
    return load_tensors(file)


def read_metadata(path: str, require_format: bool = True, limits: Limits | None = DEFAULT_LIMITS) -> AdapterFile:
    """The file's header only (its `tensors` stay empty), parsed within `limits`; read without its model (the
    default limits), within the limits of the base its own fingerprint describes."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"No adapter file at {path}.")
    entries, metadata = read_header(path, limits, refine=_limits_of_recorded_base if limits is DEFAULT_LIMITS else None)
    if require_format and metadata.get(META_FORMAT) != FORMAT_VERSION:
        found = metadata.get(META_FORMAT)
        raise AdapterFileError(
            f"{path} is not a peft-stoc adapter file of format {FORMAT_VERSION} (its header says "
            f"{META_FORMAT}={found!r}). Save it with `save_pretrained` of this peft-stoc version."
        )
    return AdapterFile(path, metadata, {}, entries)


def _limits_of_recorded_base(metadata: dict) -> Limits | None:
    """Limits for a file read without its model, from the number of base tensors its fingerprint records: at most
    four entries per changed base tensor and a task head, as `Expected.limits` allows for a model (names of up to
    256 characters). None when the fingerprint does not say (the default limits stay)."""
    try:
        base_tensors = json.loads(metadata.get(META_FINGERPRINT, "")).get("num_tensors")
    except (ValueError, RecursionError, AttributeError, TypeError):
        return None
    if not is_count(base_tensors):
        return None
    max_tensors = 5 * base_tensors + 64
    if max_tensors >= DEFAULT_LIMITS.max_tensors:
        return None
    return Limits(
        max_tensors=max_tensors,
        max_header_bytes=min(DEFAULT_LIMITS.max_header_bytes, 2**20 + max_tensors * (4 * 256 + 512)),
        scope=f"for a base of {base_tensors:,} tensors (as its fingerprint says)",
    )


def load_tensors(file: AdapterFile) -> AdapterFile:
    """`file` with its tensors read (check its header first: this allocates what the header describes)."""
    try:
        with safe_open(file.path, framework="pt") as handle:
            file.tensors = {}
            for key in handle.keys():
                empty = _empty(file.entries.get(key))
                file.tensors[key] = empty if empty is not None else handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise corrupt(file.path, str(error)) from error
    return file


def _empty(entry: dict | None) -> torch.Tensor | None:
    """A tensor of no entries, made without reading the file (a header may list thousands)."""
    if entry is None or math.prod(entry["shape"]):
        return None
    return torch.empty(entry["shape"], dtype=FILE_DTYPES[entry["dtype"]])


def check_entries(entries: dict[str, dict], expected: Expected | None, path: str) -> None:
    """Names, dtypes and shapes of the header's entries, before any tensor is read: index and value tensors in
    pairs of one length; with `expected`, only candidates of the model and its head tensors, in their shapes."""
    lengths: dict[str, dict[str, int]] = {}
    unexpected = []
    for key, entry in entries.items():
        dtype, shape = FILE_DTYPES[entry["dtype"]], tuple(entry["shape"])
        if is_delta_key(key):
            _check_delta_spec(key, dtype, shape)
            lengths.setdefault(_stem(key), {})[key] = shape[0]
        elif expected is None:
            continue
        elif key in expected.heads:
            _check_head_spec(key, dtype, shape, expected.heads[key])
        else:
            unexpected.append(key)
    for stem, pair in lengths.items():
        index_key, values_key = stem + INDEX_SUFFIX, stem + VALUES_SUFFIX
        for key in (index_key, values_key):
            if key not in pair:
                raise AdapterFileError(f"Tensor '{key}' is missing from {path}: each changed tensor needs both.")
        if pair[index_key] != pair[values_key]:
            raise AdapterFileError(
                f"Tensors '{index_key}' ({pair[index_key]}) and '{values_key}' ({pair[values_key]}) differ in length."
            )
        exact = [pair.get(stem + EXACT_AT_SUFFIX), pair.get(stem + EXACT_SUFFIX)]
        if exact != [None, None] and (None in exact or exact[0] != exact[1] or exact[0] > pair[index_key]):
            raise AdapterFileError(
                f"Tensors '{stem}{EXACT_AT_SUFFIX}' and '{stem}{EXACT_SUFFIX}' must both be "
                f"present, of one length, at most that of '{index_key}'."
            )
        if expected is not None:
            _check_fits(index_key, pair[index_key], stem.removeprefix(MODEL_PREFIX), expected.numels)
    if unexpected:
        raise AdapterFileError(f"{path} holds tensors this model has no place for: {sorted(unexpected)[:5]}.")


MAX_LOADED_STEP = 2**62  # a loaded adapter trains on from its step count, which must stay within int64


def check_counts(counts, source: str, loading: bool = False) -> dict[str, int]:
    """Counts as a header or `saved_counts` records them: whole numbers that int64 holds (the step count goes into
    the model's state dict). `loading`: the step count also leaves room to train on. Returns `counts`."""
    if not isinstance(counts, dict) or not all(isinstance(k, str) and is_count(v) for k, v in counts.items()):
        raise AdapterFileError(
            f"{source} must be a JSON object of counts (whole numbers from 0 to {MAX_COUNT:,}), "
            f"got {fingerprints.json_kind(counts)}."
        )
    if loading and counts.get("step", 0) > MAX_LOADED_STEP:
        raise AdapterFileError(
            f"{source} records {counts['step']:,} optimizer steps; an adapter loaded to train on may have taken at "
            f"most {MAX_LOADED_STEP:,}."
        )
    return counts


def _check_fits(key: str, length: int, name: str, numels: dict[str, int]) -> None:
    if name not in numels:
        raise AdapterFileError(
            f"Tensor '{key}' refers to '{name}', which is not a candidate parameter of this base model."
        )
    if length > numels[name]:
        raise AdapterFileError(f"Tensor '{key}' has {length:,} entries, more than the {numels[name]:,} of '{name}'.")


def _stem(key: str) -> str:
    for suffix in DELTA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def is_delta_key(key: str) -> bool:
    return key.endswith(DELTA_SUFFIXES)


# -- validating tensors ------------------------------------------------------------------------------------------
def _check_delta_spec(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if key.endswith((INDEX_SUFFIX, EXACT_AT_SUFFIX)):
        if dtype not in INDEX_DTYPES or len(shape) != 1:
            raise AdapterFileError(f"Tensor '{key}' must be a 1-D int32/int64 tensor, got {dtype} with shape {shape}.")
    elif key.endswith(EXACT_SUFFIX):
        if dtype != torch.float64 or len(shape) != 1:
            raise AdapterFileError(f"Tensor '{key}' must be a 1-D float64 tensor, got {dtype} with shape {shape}.")
    elif dtype not in VALUE_DTYPES or len(shape) != 1:
        raise AdapterFileError(f"Tensor '{key}' must be a 1-D float tensor, got {dtype} with shape {shape}.")


def _check_head_spec(key: str, dtype: torch.dtype, shape: tuple[int, ...], spec) -> None:
    """`spec`: the model's shape (a `torch.Size`) or its (shape, dtype)."""
    want_shape, want_dtype = (tuple(spec), None) if isinstance(spec, torch.Size) else (tuple(spec[0]), spec[1])
    if shape != want_shape:
        raise AdapterFileError(f"Tensor '{key}' has shape {shape}, the model expects {want_shape}.")
    if want_dtype is None:
        return
    if want_dtype.is_floating_point and not dtype.is_floating_point:
        raise AdapterFileError(
            f"Tensor '{key}' is a {dtype} tensor; the model's is {want_dtype}: a task-head "
            "weight must be a floating-point tensor."
        )
    if not want_dtype.is_floating_point and dtype != want_dtype:
        raise AdapterFileError(f"Tensor '{key}' is a {dtype} tensor; the model's is {want_dtype}.")


def parse_delta(
    tensors: dict[str, torch.Tensor], numels: dict[str, int], source: str = "the adapter file"
) -> SparseDelta:
    """Validate the delta tensors against the base tensor sizes `numels` and build a `SparseDelta`."""
    stems = dict.fromkeys(_stem(key) for key in tensors if is_delta_key(key))
    out = {}
    for stem in stems:
        name = stem.removeprefix(MODEL_PREFIX)
        index_key, values_key = stem + INDEX_SUFFIX, stem + VALUES_SUFFIX
        for key in (index_key, values_key):
            if key not in tensors:
                raise AdapterFileError(f"Tensor '{key}' is missing from {source}: each changed tensor needs both.")
        index, values = tensors[index_key], tensors[values_key]
        if name not in numels:
            raise AdapterFileError(
                f"Tensor '{index_key}' refers to '{name}', which is not a candidate parameter of this base model."
            )
        _check_delta_spec(index_key, index.dtype, tuple(index.shape))
        _check_delta_spec(values_key, values.dtype, tuple(values.shape))
        if index.numel() != values.numel():
            raise AdapterFileError(
                f"Tensors '{index_key}' ({index.numel()}) and '{values_key}' ({values.numel()}) differ in length."
            )
        index = index.long()
        if index.numel():
            if int(index.min()) < 0 or int(index.max()) >= numels[name]:
                raise AdapterFileError(f"Tensor '{index_key}' has indices outside [0, {numels[name]}) for '{name}'.")
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                raise AdapterFileError(
                    f"Tensor '{index_key}' is not strictly increasing: indices must be sorted and unique."
                )
        if not bool(torch.isfinite(values).all()):
            raise AdapterFileError(f"Tensor '{values_key}' contains NaN or infinite values.")
        out[name] = (index, _with_exact(tensors, stem, values.float(), source))
    return SparseDelta(out)


def _with_exact(tensors: dict[str, torch.Tensor], stem: str, values: torch.Tensor, source: str) -> torch.Tensor:
    """`values`, in float64 with the exact deltas put in, when the file has exact deltas for this tensor."""
    at_key, exact_key = stem + EXACT_AT_SUFFIX, stem + EXACT_SUFFIX
    if at_key not in tensors and exact_key not in tensors:
        return values
    for key in (at_key, exact_key):
        if key not in tensors:
            raise AdapterFileError(f"Tensor '{key}' is missing from {source}: exact deltas need positions and values.")
    at, exact = tensors[at_key], tensors[exact_key]
    _check_delta_spec(at_key, at.dtype, tuple(at.shape))
    _check_delta_spec(exact_key, exact.dtype, tuple(exact.shape))
    at = at.long()
    if at.shape != exact.shape or (
        at.numel()
        and (
            int(at.min()) < 0
            or int(at.max()) >= values.numel()
            or (at.numel() > 1 and not bool((at[1:] > at[:-1]).all()))
        )
    ):
        raise AdapterFileError(
            f"Tensor '{at_key}' must hold sorted, unique positions below {values.numel()}, as many "
            f"as '{exact_key}' has values."
        )
    if not bool(torch.isfinite(exact).all()):
        raise AdapterFileError(f"Tensor '{exact_key}' contains NaN or infinite values.")
    return values.double().index_copy_(0, at, exact)


def check_other_tensors(tensors: dict[str, torch.Tensor], expected: dict, source: str) -> None:
    """The non-delta tensors (task heads): exactly the `expected` keys, same shapes, finite values.

    `expected` maps keys to the model's shapes (`torch.Size`) or to (shape, dtype); with a dtype, a head tensor
    must also be of the same kind (float or not) and its values must stay finite once cast to that dtype.
    """
    others = {key: value for key, value in tensors.items() if not is_delta_key(key)}
    for key, spec in expected.items():
        if key not in others:
            raise AdapterFileError(f"Tensor '{key}' (a modules_to_save weight) is missing from {source}.")
        tensor = others[key]
        _check_head_spec(key, tensor.dtype, tuple(tensor.shape), spec)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(f"Tensor '{key}' contains NaN or infinite values.")
        dtype = None if isinstance(spec, torch.Size) else spec[1]
        if dtype is not None and dtype.is_floating_point and not bool(torch.isfinite(tensor.to(dtype)).all()):
            raise AdapterFileError(
                f"Tensor '{key}' has values beyond the range of {dtype}, the model's dtype for it "
                f"(largest magnitude {float(tensor.abs().max()):.3g})."
            )
    unexpected = sorted(set(others) - set(expected))
    if unexpected:
        raise AdapterFileError(f"{source} holds tensors this model has no place for: {unexpected[:5]}.")


def check_ranges(
    delta: SparseDelta, dtypes: dict[str, torch.dtype], base_values=None, source: str = "the adapter file"
) -> None:
    """Refuse deltas that would turn base weights into inf: beyond the range of the base tensor's dtype on their
    own, or, given `base_values(name, positions)`, once added to the base as applying does."""
    for name, (index, values) in delta.tensors.items():
        dtype = dtypes.get(name)
        if dtype is None or not dtype.is_floating_point or not values.numel():
            continue
        key = MODEL_PREFIX + name + VALUES_SUFFIX
        largest, limit = float(values.abs().max()), torch.finfo(dtype).max
        if largest > limit:
            raise AdapterFileError(
                f"Tensor '{key}' in {source} holds a delta of {largest:.3g}, beyond the largest "
                f"{dtype} value ({limit:.3g}) of '{name}'."
            )
        if base_values is None:
            continue
        base = base_values(name, index)
        total = add_delta(base, values)
        if bool((torch.isfinite(base) & ~torch.isfinite(total)).any()):
            raise AdapterFileError(
                f"Tensor '{key}' in {source}: added to the base values of '{name}' its deltas overflow {dtype}."
            )


# -- the one validation of an adapter -----------------------------------------------------------------------------
def check_config(config, counts: dict | None = None, source: str = "the adapter's config") -> None:
    """What a StocTuning config must satisfy before anything is built from it (PEFT would fail while attaching, or
    a save would fail later): `modules_to_save` a list of names, the saved counts and fingerprint well formed, and
    `k` / `max_changed` that fit the candidates `counts` records."""
    heads = getattr(config, "modules_to_save", None)
    if heads is not None and (not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads)):
        raise AdapterFileError(f"{source}: `modules_to_save` must be a list of module names, got {heads!r}.")
    saved = getattr(config, "saved_counts", None)
    if saved is not None:
        check_counts(saved, f"{source}: `saved_counts`", loading=True)
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


def _head_of(key: str, modules_to_save) -> bool:
    """Whether file key `key` is a tensor of a module that `modules_to_save` names (PEFT's rule: the module's name
    ends with an entry)."""
    if not key.startswith(MODEL_PREFIX):
        return False
    parts = key[len(MODEL_PREFIX) :].split(".")[:-1]
    modules = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return any(module.endswith(wanted) for module in modules for wanted in modules_to_save or [])


def _check_bounds(file: AdapterFile, recorded: dict, expected: Expected | None, modules_to_save) -> dict[str, int]:
    """Before any tensor is read: what the header lists must fit the base its fingerprint describes (a changed
    tensor is one of its tensors), every changed tensor needs a recorded shape, and every other tensor belongs to a
    module in `modules_to_save`. Returns the entries of each changed tensor."""
    stems = {_stem(key) for key in file.entries if is_delta_key(key)}
    base_tensors = recorded.get("num_tensors")
    if is_count(base_tensors) and (len(stems) > base_tensors or len(file.entries) > 5 * base_tensors + 64):
        raise AdapterFileError(
            f"{file.path} lists {len(file.entries):,} tensors ({len(stems):,} changed base tensors); its base has "
            f"{base_tensors:,} tensors. Refusing to read it."
        )
    if expected is not None:
        numels = expected.numels
    else:
        shapes = file.shapes
        numels = {name: math.prod(shape) for name, shape in shapes.items()}
        missing = sorted(s.removeprefix(MODEL_PREFIX) for s in stems if s.removeprefix(MODEL_PREFIX) not in numels)
        if missing:
            raise AdapterFileError(f"{file.path} records no shape for the changed tensors {missing[:5]}.")
    if META_HEADS in file.metadata:
        recorded_heads = file._json_entry(META_HEADS)
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
                raise AdapterFileError(
                    f"Tensor '{key}' in {file.path} has shape {held[key]}; its header records {shape}."
                )
        extra = sorted(set(held) - set(recorded_heads))
        if extra:
            raise AdapterFileError(f"{file.path} holds tensors its header does not list: {extra[:5]}.")
    for key, entry in file.entries.items():
        if is_delta_key(key):
            continue
        if expected is None and not _head_of(key, modules_to_save):
            raise AdapterFileError(
                f"{file.path} holds '{key}', which is neither a delta nor a weight of the modules_to_save "
                f"{modules_to_save!r}: an adapter file never holds full base weights."
            )
        dtype = FILE_DTYPES[entry["dtype"]]
        if expected is None and key.endswith((".weight", ".bias")) and not dtype.is_floating_point:
            raise AdapterFileError(
                f"Tensor '{key}' in {file.path} is a {dtype} tensor: a task-head weight must be a floating-point "
                "tensor."
            )
    return numels


def _widest_float(dtype_names) -> torch.dtype:
    dtypes = [getattr(torch, d, None) for d in dtype_names or []]
    floats = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).max, default=torch.float32)


def validate(path: str, config, expected: Expected | None = None, check_base=None, base_values=None) -> AdapterFile:
    """The one validation of an adapter, before anything is built from it or applied: loading (`load_adapter`,
    `PeftModel.from_pretrained`), `peft-stoc inspect`, `merge` and `compose` all go through it.

    Without `expected` (no model at hand) the header is read within `DEFAULT_LIMITS`, then bounded by the base its
    own fingerprint describes; deltas are checked against the shapes the header records and task-head values against
    the widest float dtype of that base. With `expected` (a model), the limits, names, shapes and dtypes are the
    model's, `check_base(file)` compares fingerprints and `base_values` checks that the deltas added to the base stay
    finite. Returns the file with its tensors and its `delta`."""
    source = path
    file = read_metadata(path, limits=expected.limits() if expected is not None else DEFAULT_LIMITS)
    counts = check_counts(file.counts, f"{path}: header entry '{META_COUNTS}'", loading=True)
    check_config(config, counts, source=f"the config of {os.path.dirname(path) or path}")
    recorded = file.fingerprint
    if recorded is None:
        raise AdapterFileError(f"{path} has no base-model fingerprint in its header.")
    if check_base is not None:
        check_base(file)
    heads = getattr(config, "modules_to_save", None)
    numels = _check_bounds(file, recorded, expected, heads)
    check_entries(file.entries, expected, path)
    for stem in {_stem(key) for key in file.entries if is_delta_key(key)}:
        _check_fits(
            stem + INDEX_SUFFIX, file.entries[stem + INDEX_SUFFIX]["shape"][0], stem[len(MODEL_PREFIX) :], numels
        )
    load_tensors(file)
    file.parsed = parse_delta(file.tensors, numels, source=source)
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
    check_ranges(file.parsed, dtypes, base_values, source=source)
    check_other_tensors(file.tensors, head_specs, source=source)
    return file


# -- writing -----------------------------------------------------------------------------------------------------
def delta_tensors(delta: SparseDelta, numels: dict[str, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors for `delta`; refuses values that are not finite once stored as `dtype`."""
    out = {}
    for name, (index, values) in delta.tensors.items():
        index_dtype = torch.int32 if numels[name] < 2**31 else torch.int64
        out[MODEL_PREFIX + name + INDEX_SUFFIX] = index.to(device="cpu", dtype=index_dtype).contiguous()
        stem = MODEL_PREFIX + name
        stored = values.to(device="cpu", dtype=dtype).contiguous()
        _refuse_non_finite(stem + VALUES_SUFFIX, stored)
        out[stem + VALUES_SUFFIX] = stored
        if values.dtype == torch.float64 and dtype == torch.float32:
            # Entries float32 cannot carry exactly keep their float64 delta (a lower precision is a deliberate choice).
            values = values.cpu()
            exact_at = (stored.double() != values).nonzero().squeeze(1)
            if exact_at.numel():
                out[stem + EXACT_AT_SUFFIX] = exact_at.to(torch.int32 if values.numel() < 2**31 else torch.int64)
                out[stem + EXACT_SUFFIX] = values.index_select(0, exact_at).contiguous()
    return out


def _refuse_non_finite(key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise AdapterFileError(
            f"Tensor '{key}' has NaN or infinite values (as {tensor.dtype}); refusing to write "
            "an adapter file that cannot be loaded."
        )


def write(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write an adapter file atomically (a crash leaves the old file or the new one); NaN/inf values are refused."""
    for key, tensor in tensors.items():
        _refuse_non_finite(key, tensor)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".safetensors.tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        atomic_folder.fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add_metadata(path: str, metadata: dict[str, str]) -> None:
    """Rewrite `path` (a file this process just wrote) with `metadata` in its header, atomically; the header also
    records which task-head tensors the file holds."""
    tensors = read(path, require_format=False, limits=None).tensors
    write(path, tensors, {**metadata, META_HEADS: heads_entry(tensors)})


def heads_entry(tensors: dict[str, torch.Tensor]) -> str:
    """The `META_HEADS` header entry for a file holding `tensors`: each task-head tensor's name and shape."""
    heads = {key: list(tensors[key].shape) for key in sorted(tensors) if not is_delta_key(key)}
    return json.dumps(heads, separators=(",", ":"))
