"""The adapter file: `adapter_model.safetensors` with sparse deltas, task-head tensors and a descriptive header
(its layout: `file_layout`).

Reading parses the 8-byte length and the JSON header itself, within limits, and checks every entry's name, dtype
and shape before any tensor is materialised: a hostile header is refused at the cost of reading it. Everything read
is validated before any of it touches a model (`validation.validate`); errors name the offending tensor. Writing
refuses NaN/inf values, and `atomic_folder.staged_folder` replaces a whole adapter folder so that a crash at any
moment leaves the old adapter or the new.
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

from ..tuner.delta import SparseDelta
from . import atomic_folder, file_checks
from . import fingerprint as fingerprints
from .file_layout import (  # noqa: F401 (the file's layout is part of this module's interface)
    DELTA_SUFFIXES,
    EXACT_AT_SUFFIX,
    EXACT_SUFFIX,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    META_COUNTS,
    META_FINGERPRINT,
    META_FORMAT,
    META_HEADS,
    META_SHAPES,
    MODEL_PREFIX,
    VALUES_SUFFIX,
    WEIGHTS_NAME,
    Expected,
    is_delta_key,
)
from .safetensors_header import (  # noqa: F401 (AdapterFileError and Limits are part of this module's interface)
    DEFAULT_LIMITS,
    FILE_DTYPES,
    AdapterFileError,
    Limits,
    corrupt,
    is_count,
    read_header,
)


# -- reading -----------------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]  # empty until `load_tensors`
    entries: dict[str, dict] = field(default_factory=dict)  # the header's tensor entries: dtype, shape, offsets
    parsed: SparseDelta | None = None  # the validated delta (`validation.validate`)

    def json_entry(self, key: str):
        """The header entry `key` parsed as JSON (parsed once; each caller gets its own copy), None if absent."""
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
        recorded = self.json_entry(META_FINGERPRINT)
        problem = fingerprints.problem(recorded)
        if problem:
            raise AdapterFileError(f"{self.path}: header entry '{META_FINGERPRINT}' {problem}.")
        return recorded

    @property
    def counts(self) -> dict[str, int]:
        counts = self.json_entry(META_COUNTS)
        if counts is None and META_COUNTS not in self.metadata:
            return {}
        return file_checks.check_counts(counts, f"{self.path}: header entry '{META_COUNTS}'")

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Shapes of the base tensors this file changes."""
        shapes = self.json_entry(META_SHAPES)
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
            self.parsed = file_checks.parse_delta(self.tensors, self.numels(), source=self.path)
        return self.parsed


def read(
    path: str, require_format: bool = True, expected: Expected | None = None, limits: Limits | None = DEFAULT_LIMITS
) -> AdapterFile:
    """Read an adapter file; raise `AdapterFileError` for unreadable files and for files of another format.

    With `expected`, the header must fit that model (limits derived from it, names, dtypes, shapes) before any
    tensor is read. `limits=None` trusts the file (one this process just wrote).
    """
    file = read_metadata(path, require_format, expected.limits() if expected is not None else limits)
    file_checks.check_entries(file.entries, expected, path)
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
