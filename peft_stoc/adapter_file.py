"""The adapter file: `adapter_model.safetensors` with sparse deltas, task-head tensors and a descriptive header.

For each changed base tensor `<name>` the file holds `base_model.model.<name>.stoc_indices` (sorted flat indices,
int32 below 2^31 entries, else int64) and `base_model.model.<name>.stoc_delta` (the value added at each index).
The header metadata records the format version, counts and the base-model fingerprint.

Reading parses the 8-byte length and the JSON header itself, within limits, and checks every entry's name, dtype
and shape before any tensor is materialised: a hostile header is refused at the cost of reading it. Everything read
is validated before any of it touches a model; errors name the offending tensor. Writing refuses NaN/inf values,
and `staged_folder` replaces a whole adapter folder so that a crash at any moment leaves the old adapter or the new.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import secrets
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import fingerprint as fingerprints
from .delta import SparseDelta, add_delta

WEIGHTS_NAME = "adapter_model.safetensors"
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
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The safetensors dtypes an adapter file may use (task heads may hold integer buffers).
FILE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class AdapterFileError(ValueError):
    """An adapter file that cannot be used as it is."""


# -- limits on what a header may hold ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """The most a header may hold; checked on its raw bytes, before it is parsed."""

    max_tensors: int
    max_header_bytes: int
    scope: str = "for this model"  # completes "an adapter file ... has at most"

    @property
    def max_values(self) -> int:
        """Bound on the JSON values the header may hold (each one past the first follows a comma): this bounds
        what parsing it allocates. A real entry holds fewer than 8."""
        return 8 * self.max_tensors + 4096


# Without a model to compare with (the command line): room for 16,384 changed tensors. Reading a file that large
# takes ~2 s and ~80 MB, which is then also the most a hostile header can cost.
DEFAULT_LIMITS = Limits(max_tensors=2**15, max_header_bytes=16 * 2**20, scope="read without its base model")


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
        return Limits(max_tensors=len(DELTA_SUFFIXES) * len(self.numels) + len(self.heads),
                      max_header_bytes=2**20 + 2 * per_entry)


# -- reading -----------------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]  # empty until `load_tensors`
    entries: dict[str, dict] = field(default_factory=dict)  # the header's tensor entries: dtype, shape, offsets

    def _json_entry(self, key: str):
        raw = self.metadata.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as error:
            raise AdapterFileError(f"{self.path}: header entry '{key}' is not valid JSON ({error}).") from error

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
        if not isinstance(counts, dict) or not all(_is_count(v) for v in counts.values()):
            raise AdapterFileError(f"{self.path}: header entry '{META_COUNTS}' must be a JSON object of counts, "
                                   f"got {fingerprints.json_kind(counts)}.")
        return counts

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Shapes of the base tensors this file changes."""
        shapes = self._json_entry(META_SHAPES)
        if shapes is None and META_SHAPES not in self.metadata:
            return {}
        if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(_is_count(n) for n in s) for s in shapes.values()
        ):
            raise AdapterFileError(f"{self.path}: header entry '{META_SHAPES}' must map tensor names to shapes, "
                                   f"got {fingerprints.json_kind(shapes)}.")
        return shapes

    def numels(self) -> dict[str, int]:
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    def delta(self) -> SparseDelta:
        """The validated delta, checked against the shapes recorded in the header."""
        return parse_delta(self.tensors, self.numels(), source=self.path)


def read(path: str, require_format: bool = True, expected: Expected | None = None,
         limits: Limits | None = DEFAULT_LIMITS) -> AdapterFile:
    """Read an adapter file; raise `AdapterFileError` for unreadable files and for files of another format.

    With `expected`, the header must fit that model (limits derived from it, names, dtypes, shapes) before any
    tensor is read. `limits=None` trusts the file (one this process just wrote).
    """
    file = read_metadata(path, require_format, expected.limits() if expected is not None else limits)
    check_entries(file.entries, expected, path)
    return load_tensors(file)


def read_metadata(path: str, require_format: bool = True, limits: Limits | None = DEFAULT_LIMITS) -> AdapterFile:
    """The file's header only (its `tensors` stay empty), parsed within `limits`."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"No adapter file at {path}.")
    entries, metadata = read_header(path, limits)
    if require_format and metadata.get(META_FORMAT) != FORMAT_VERSION:
        found = metadata.get(META_FORMAT)
        raise AdapterFileError(
            f"{path} is not a peft-stoc adapter file of format {FORMAT_VERSION} (its header says "
            f"{META_FORMAT}={found!r}). Save it with `save_pretrained` of this peft-stoc version."
        )
    return AdapterFile(path, metadata, {}, entries)


def load_tensors(file: AdapterFile) -> AdapterFile:
    """`file` with its tensors read (check its header first: this allocates what the header describes)."""
    try:
        with safe_open(file.path, framework="pt") as handle:
            file.tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise _corrupt(file.path, str(error)) from error
    return file


def read_header(path: str, limits: Limits | None = DEFAULT_LIMITS) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (name -> dtype, shape, offsets) and metadata of a safetensors file, parsed within
    `limits` (None: none) and checked for consistency with the file's size."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "it is shorter than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if limits is not None and length > limits.max_header_bytes:
                raise AdapterFileError(
                    f"{path} has a header of {length:,} bytes; an adapter file {limits.scope} has at most "
                    f"{limits.max_header_bytes:,}. Refusing to read it."
                )
            if 8 + length > size:
                raise _corrupt(path, f"its header claims {length:,} bytes but the file has {size:,}")
            raw = handle.read(length)
    except OSError as error:
        raise AdapterFileError(f"Cannot read {path}: {error}.") from error
    if limits is not None:
        _check_raw_counts(raw, limits, path)
    header = _parse_header(raw, path)
    metadata = _check_metadata(header.pop("__metadata__", {}), path)
    _check_layout(header, size - 8 - length, path)
    return header, metadata


def _check_raw_counts(raw: bytes, limits: Limits, path: str) -> None:
    """Bound the tensors and values before parsing: every tensor entry is a JSON object, so `{` counts them."""
    objects = raw.count(b"{") - 2  # the header and its metadata
    if objects > limits.max_tensors + 8:  # + JSON text in metadata values (counts, shapes, fingerprint)
        raise AdapterFileError(
            f"{path} lists up to {objects:,} tensors in its header; an adapter file {limits.scope} holds at most "
            f"{limits.max_tensors:,}. Refusing to read it."
        )
    if raw.count(b",") > limits.max_values:
        raise AdapterFileError(f"{path} has a header with more values than an adapter file {limits.scope} can "
                               "hold. Refusing to read it.")


def _parse_header(raw: bytes, path: str) -> dict:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise _corrupt(path, f"its header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"its header is {fingerprints.json_kind(header)}, not a JSON object")
    return header


def _check_metadata(metadata, path: str) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "its header metadata must map strings to strings")
    return metadata


def _check_layout(entries: dict, data_bytes: int, path: str) -> None:
    """Every entry names a known dtype, a shape and a byte range of that size inside the file."""
    for name, entry in entries.items():
        if not name or not isinstance(entry, dict):
            raise _corrupt(path, f"its header entry {name!r} is not a tensor description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FILE_DTYPES:
            raise AdapterFileError(f"Tensor '{name}' in {path} has dtype {dtype!r}; adapter files hold "
                                   f"{', '.join(FILE_DTYPES)}.")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise _corrupt(path, f"tensor '{name}' has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_bytes):
            raise _corrupt(path, f"tensor '{name}' lies outside the file's {data_bytes:,} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * FILE_DTYPES[dtype].itemsize:
            raise _corrupt(path, f"tensor '{name}' has {offsets[1] - offsets[0]:,} bytes for shape {shape}")


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
            raise AdapterFileError(f"Tensors '{index_key}' ({pair[index_key]}) and '{values_key}' "
                                   f"({pair[values_key]}) differ in length.")
        exact = [pair.get(stem + EXACT_AT_SUFFIX), pair.get(stem + EXACT_SUFFIX)]
        if exact != [None, None] and (None in exact or exact[0] != exact[1] or exact[0] > pair[index_key]):
            raise AdapterFileError(f"Tensors '{stem}{EXACT_AT_SUFFIX}' and '{stem}{EXACT_SUFFIX}' must both be "
                                   f"present, of one length, at most that of '{index_key}'.")
        if expected is not None:
            _check_fits(index_key, pair[index_key], stem.removeprefix(MODEL_PREFIX), expected.numels)
    if unexpected:
        raise AdapterFileError(f"{path} holds tensors this model has no place for: {sorted(unexpected)[:5]}.")


def _check_fits(key: str, length: int, name: str, numels: dict[str, int]) -> None:
    if name not in numels:
        raise AdapterFileError(f"Tensor '{key}' refers to '{name}', which is not a candidate parameter of this base "
                               "model.")
    if length > numels[name]:
        raise AdapterFileError(f"Tensor '{key}' has {length:,} entries, more than the {numels[name]:,} of '{name}'.")


def _corrupt(path: str, why: str) -> AdapterFileError:
    return AdapterFileError(
        f"{path} is not a readable safetensors file ({why}); it is probably truncated or corrupt. "
        "Save the adapter again or download it anew."
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        raise AdapterFileError(f"Tensor '{key}' is a {dtype} tensor; the model's is {want_dtype}: a task-head "
                               "weight must be a floating-point tensor.")
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
    _check_delta_spec(at_key, at.dtype, tuple(at.shape))
    _check_delta_spec(exact_key, exact.dtype, tuple(exact.shape))
    at = at.long()
    if at.shape != exact.shape or (at.numel() and (
            int(at.min()) < 0 or int(at.max()) >= values.numel()
            or (at.numel() > 1 and not bool((at[1:] > at[:-1]).all())))):
        raise AdapterFileError(f"Tensor '{at_key}' must hold sorted, unique positions below {values.numel()}, as many "
                               f"as '{exact_key}' has values.")
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
            raise AdapterFileError(f"Tensor '{key}' has values beyond the range of {dtype}, the model's dtype for it "
                                   f"(largest magnitude {float(tensor.abs().max()):.3g}).")
    unexpected = sorted(set(others) - set(expected))
    if unexpected:
        raise AdapterFileError(f"{source} holds tensors this model has no place for: {unexpected[:5]}.")


def check_ranges(delta: SparseDelta, dtypes: dict[str, torch.dtype], base_values=None,
                 source: str = "the adapter file") -> None:
    """Refuse deltas that would turn base weights into inf: beyond the range of the base tensor's dtype on their
    own, or, given `base_values(name, positions)`, once added to the base as applying does."""
    for name, (index, values) in delta.tensors.items():
        dtype = dtypes.get(name)
        if dtype is None or not dtype.is_floating_point or not values.numel():
            continue
        key = MODEL_PREFIX + name + VALUES_SUFFIX
        largest, limit = float(values.abs().max()), torch.finfo(dtype).max
        if largest > limit:
            raise AdapterFileError(f"Tensor '{key}' in {source} holds a delta of {largest:.3g}, beyond the largest "
                                   f"{dtype} value ({limit:.3g}) of '{name}'.")
        if base_values is None:
            continue
        base = base_values(name, index)
        total = add_delta(base, values)
        if bool((torch.isfinite(base) & ~torch.isfinite(total)).any()):
            raise AdapterFileError(f"Tensor '{key}' in {source}: added to the base values of '{name}' its deltas "
                                   f"overflow {dtype}.")


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
        raise AdapterFileError(f"Tensor '{key}' has NaN or infinite values (as {tensor.dtype}); refusing to write "
                               "an adapter file that cannot be loaded.")


def write(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write an adapter file atomically (a crash leaves the old file or the new one); NaN/inf values are refused."""
    for key, tensor in tensors.items():
        _refuse_non_finite(key, tensor)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".safetensors.tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add_metadata(path: str, metadata: dict[str, str]) -> None:
    """Rewrite `path` (a file this process just wrote) with `metadata` in its header, atomically."""
    write(path, read(path, require_format=False, limits=None).tensors, metadata)


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# -- replacing an adapter folder atomically -----------------------------------------------------------------------
STAGE_TAG = ".stoc-stage-"
OLD_TAG = ".stoc-old-"
MAX_CARRIED = 10_000  # other entries linked into a new folder; beyond this, files are replaced one by one


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike):
    """Yield an empty folder to save an adapter into; on success it takes the place of `target`.

    `target` holds its old adapter or the new one at every moment: the new folder is written beside it and synced,
    receives hard links to everything else `target` holds (a tokenizer, a checkpoint's optimizer state) and is
    swapped in by one rename. Where a folder cannot be swapped (a mount point, the working directory, a parent we
    cannot write to), the files are renamed in one by one, the weights last.
    """
    target = os.path.realpath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target} is a file, not a folder.")
    recover(target)
    stage, swap = _make_stage(target)
    try:
        readme = os.path.join(target, "README.md")
        if os.path.isfile(readme):
            shutil.copyfile(readme, os.path.join(stage, "README.md"))  # the writers update a card, keeping edits
        yield stage
        _sync_tree(stage)
        if swap:
            _swap_in(stage, target)
        else:
            _replace_files(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def recover(target: str, tidy: bool = True) -> None:
    """Undo what a crash during `staged_folder` left: the old folder goes back if it was moved away and the new one
    never arrived; with `tidy`, leftovers of saves whose process is gone are removed."""
    target = os.path.realpath(target)
    parent, base = os.path.split(target)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(f".{base}{OLD_TAG}") and not os.path.lexists(target):
            os.rename(path, target)  # it was renamed away whole: a complete adapter
        elif tidy and name.startswith((f".{base}{OLD_TAG}", f".{base}{STAGE_TAG}")) and not _alive(name):
            shutil.rmtree(path, ignore_errors=True)
    if tidy and os.path.isdir(target):
        for name in os.listdir(target):
            if name.startswith(STAGE_TAG) and not _alive(name):
                shutil.rmtree(os.path.join(target, name), ignore_errors=True)


def _alive(name: str) -> bool:
    """Whether the process that made the leftover `name` (its pid follows the tag) still runs."""
    try:
        pid = int(name.rsplit(".stoc-", 1)[1].split("-")[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True  # os.kill would terminate it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _make_stage(target: str) -> tuple[str, bool]:
    """A new empty folder beside `target` (True: to be swapped in) or, failing that, inside it (False)."""
    parent, base = os.path.split(target)
    if _can_swap(target):
        try:
            os.makedirs(parent, exist_ok=True)
            stage = os.path.join(parent, f".{base}{STAGE_TAG}{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(stage)
        except OSError:
            pass
        else:
            if os.path.isdir(target):
                os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode))  # the folder keeps its permissions
            return stage, True
    os.makedirs(target, exist_ok=True)
    stage = os.path.join(target, f"{STAGE_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(stage)
    return stage, False


def _can_swap(target: str) -> bool:
    if len(os.path.basename(target)) > 200:
        return False  # no room for the stage's longer name
    if not os.path.exists(target):
        return True
    cwd = os.path.realpath(os.getcwd())
    # A process's working directory follows the folder it is in: it would end up in the removed old folder.
    return not os.path.ismount(target) and cwd != target and not cwd.startswith(target + os.sep)


def _swap_in(stage: str, target: str) -> None:
    parent, base = os.path.split(target)
    if not os.path.exists(target):
        os.rename(stage, target)
        _sync_dir(parent)
        return
    if not _carry(target, stage):
        _replace_files(stage, target)
        return
    _sync_tree(stage, files=False)
    if _exchange(stage, target):
        _sync_dir(parent)  # `stage` now names the old folder, which the caller removes
        return
    old = os.path.join(parent, f".{base}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    os.rename(stage, target)  # a crash between these two renames is undone by `recover`
    _sync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux `renameat2` with RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # an old kernel or a file system without it
    raise OSError(error, os.strerror(error), second)


def _carry(source: str, stage: str) -> bool:
    """Link into `stage` every entry of `source` that `stage` lacks (recursively); False, doing nothing, when there
    are too many or some cannot be carried (sockets, pipes)."""
    plan: list[tuple[str, str, bool]] = []
    if not _plan_carry(source, stage, plan):
        return False
    for src, dst, is_dir in plan:
        if is_dir:
            os.mkdir(dst)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)  # a file system without hard links
    for src, dst, is_dir in reversed(plan):
        if is_dir:
            shutil.copystat(src, dst)
    return True


def _plan_carry(source: str, stage: str, plan: list) -> bool:
    for entry in os.scandir(source):
        if entry.name.startswith(STAGE_TAG) or (entry.name.startswith(".adapter-") and entry.name.endswith(".tmp")):
            continue  # leftovers of interrupted saves
        dst = os.path.join(stage, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(dst):
                plan.append((entry.path, dst, True))
            elif not os.path.isdir(dst) or os.path.islink(dst):
                continue  # the new save has a file of that name
            if not _plan_carry(entry.path, dst, plan):
                return False
        elif not os.path.lexists(dst):
            if not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                return False
            plan.append((entry.path, dst, False))
        if len(plan) > MAX_CARRIED:
            return False
    return True


def _replace_files(stage: str, target: str) -> None:
    """Rename the staged files into `target` one by one, each atomically; the weights files go last, so a folder
    whose config does not change holds a complete adapter throughout."""
    moves = []
    for folder, _, files in os.walk(stage):
        relative = os.path.relpath(folder, stage)
        moves += [(os.path.join(folder, f), os.path.normpath(os.path.join(target, relative, f))) for f in files]
    moves.sort(key=lambda move: os.path.basename(move[0]) == WEIGHTS_NAME)
    for src, dst in moves:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    for folder in sorted({os.path.dirname(dst) for _, dst in moves}):
        _sync_dir(folder)


def _sync_tree(root: str, files: bool = True) -> None:
    """Flush `root`'s files (optionally) and folders to disk, so a rename never publishes unwritten data."""
    for folder, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    _fsync(path)
        _sync_dir(folder)


def _sync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # platforms that cannot sync a folder
    finally:
        os.close(fd)
