"""The adapter file: `adapter_model.safetensors` with sparse deltas, task-head tensors and a descriptive header.

For each changed base tensor `<name>` the file holds `base_model.model.<name>.stoc_indices` (sorted flat indices,
int32 below 2^31 entries, else int64) and `base_model.model.<name>.stoc_delta` (the value added at each index).
Where no float32 delta reproduces a trained weight bit for bit (an entry that moved by more than its own size), the
file also holds `<name>.stoc_exact_at` (positions among the tensor's entries, int32) and `<name>.stoc_exact` (their
float64 deltas, with which the addition is exact).
The header metadata records the format version, counts and the base-model fingerprint.

Everything read from a file is validated before any of it touches a model; errors name the offending tensor.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .delta import SparseDelta

WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_PREFIX = "base_model.model."
INDEX_SUFFIX = ".stoc_indices"
VALUES_SUFFIX = ".stoc_delta"
EXACT_AT_SUFFIX = ".stoc_exact_at"
EXACT_SUFFIX = ".stoc_exact"
FORMAT_VERSION = "1"
META_FORMAT = "peft_stoc_format"
META_COUNTS = "peft_stoc_counts"
META_FINGERPRINT = "peft_stoc_fingerprint"
META_SHAPES = "peft_stoc_shapes"
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AdapterFileError(ValueError):
    """An adapter file that cannot be used as it is."""


@dataclass
class AdapterFile:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]

    @property
    def fingerprint(self) -> dict | None:
        raw = self.metadata.get(META_FINGERPRINT)
        return json.loads(raw) if raw else None

    @property
    def counts(self) -> dict:
        return json.loads(self.metadata.get(META_COUNTS, "{}"))

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Shapes of the base tensors this file changes."""
        return json.loads(self.metadata.get(META_SHAPES, "{}"))

    def numels(self) -> dict[str, int]:
        out = {}
        for name, shape in self.shapes.items():
            numel = 1
            for size in shape:
                numel *= size
            out[name] = numel
        return out

    def delta(self) -> SparseDelta:
        """The validated delta, checked against the shapes recorded in the header."""
        return parse_delta(self.tensors, self.numels(), source=self.path)


def delta_tensors(delta: SparseDelta, numels: dict[str, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors for `delta`."""
    out = {}
    for name, (index, values) in delta.tensors.items():
        index_dtype = torch.int32 if numels[name] < 2**31 else torch.int64
        stem = MODEL_PREFIX + name
        out[stem + INDEX_SUFFIX] = index.to(device="cpu", dtype=index_dtype).contiguous()
        stored = values.to(device="cpu", dtype=dtype).contiguous()
        out[stem + VALUES_SUFFIX] = stored
        if values.dtype == torch.float64 and dtype == torch.float32:
            # Entries float32 cannot carry exactly keep their float64 delta (a lower precision is a deliberate choice).
            values = values.cpu()
            exact_at = (stored.double() != values).nonzero().squeeze(1)
            if exact_at.numel():
                out[stem + EXACT_AT_SUFFIX] = exact_at.to(torch.int32 if values.numel() < 2**31 else torch.int64)
                out[stem + EXACT_SUFFIX] = values.index_select(0, exact_at).contiguous()
    return out


def is_delta_key(key: str) -> bool:
    return key.endswith((INDEX_SUFFIX, VALUES_SUFFIX, EXACT_AT_SUFFIX, EXACT_SUFFIX))


def add_metadata(path: str, metadata: dict[str, str]) -> None:
    """Rewrite `path` with `metadata` in its header, atomically (a crash leaves the old or the new file)."""
    tensors = read(path, require_format=False).tensors
    merged = {"format": "pt", **metadata}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".safetensors.tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=merged)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str, require_format: bool = True) -> AdapterFile:
    """Read an adapter file; raise `AdapterFileError` for unreadable files and for files of another format."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"No adapter file at {path}.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({error}); it is probably truncated or corrupt. "
            "Save the adapter again or download it anew."
        ) from error
    if require_format and metadata.get(META_FORMAT) != FORMAT_VERSION:
        found = metadata.get(META_FORMAT)
        raise AdapterFileError(
            f"{path} is not a peft-stoc adapter file of format {FORMAT_VERSION} (its header says "
            f"{META_FORMAT}={found!r}). Save it with `save_pretrained` of this peft-stoc version."
        )
    return AdapterFile(path, metadata, tensors)


def parse_delta(
    tensors: dict[str, torch.Tensor], numels: dict[str, int], source: str = "the adapter file"
) -> SparseDelta:
    """Validate the delta tensors against the base tensor sizes `numels` and build a `SparseDelta`."""
    names = {}
    for key in tensors:
        for suffix in (INDEX_SUFFIX, VALUES_SUFFIX, EXACT_AT_SUFFIX, EXACT_SUFFIX):
            if key.endswith(suffix):
                names[key[: -len(suffix)]] = None
    out = {}
    for stem in names:
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
        if index.dtype not in INDEX_DTYPES or index.dim() != 1:
            raise AdapterFileError(f"Tensor '{index_key}' must be a 1-D int32/int64 tensor, got {index.dtype} "
                                   f"with shape {tuple(index.shape)}.")
        if values.dtype not in VALUE_DTYPES or values.dim() != 1:
            raise AdapterFileError(f"Tensor '{values_key}' must be a 1-D float tensor, got {values.dtype} "
                                   f"with shape {tuple(values.shape)}.")
        if index.numel() != values.numel():
            raise AdapterFileError(f"Tensors '{index_key}' ({index.numel()}) and '{values_key}' ({values.numel()}) "
                                   "differ in length.")
        index = index.long()
        if index.numel():
            if int(index.min()) < 0 or int(index.max()) >= numels[name]:
                raise AdapterFileError(f"Tensor '{index_key}' has indices outside [0, {numels[name]}) for '{name}'.")
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                raise AdapterFileError(f"Tensor '{index_key}' is not strictly increasing: indices must be sorted "
                                       "and unique.")
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
    if at.dtype not in INDEX_DTYPES or at.dim() != 1 or exact.dtype != torch.float64 or exact.shape != at.shape:
        raise AdapterFileError(f"Tensors '{at_key}' and '{exact_key}' must be 1-D int positions and float64 values "
                               "of the same length.")
    at = at.long()
    if at.numel() and (int(at.min()) < 0 or int(at.max()) >= values.numel()
                       or (at.numel() > 1 and not bool((at[1:] > at[:-1]).all()))):
        raise AdapterFileError(f"Tensor '{at_key}' must hold sorted, unique positions below {values.numel()}.")
    if not bool(torch.isfinite(exact).all()):
        raise AdapterFileError(f"Tensor '{exact_key}' contains NaN or infinite values.")
    return values.double().index_copy_(0, at, exact)


def check_other_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """The non-delta tensors (task heads): exactly the `expected` keys, same shapes, finite values."""
    others = {key: value for key, value in tensors.items() if not is_delta_key(key)}
    for key, shape in expected.items():
        if key not in others:
            raise AdapterFileError(f"Tensor '{key}' (a modules_to_save weight) is missing from {source}.")
        if tuple(others[key].shape) != tuple(shape):
            raise AdapterFileError(f"Tensor '{key}' has shape {tuple(others[key].shape)}, the model expects "
                                   f"{tuple(shape)}.")
        if others[key].is_floating_point() and not bool(torch.isfinite(others[key]).all()):
            raise AdapterFileError(f"Tensor '{key}' contains NaN or infinite values.")
    unexpected = sorted(set(others) - set(expected))
    if unexpected:
        raise AdapterFileError(f"{source} holds tensors this model has no place for: {unexpected[:5]}.")
