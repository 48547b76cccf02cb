"""Checks of what an adapter file holds: the counts its header records, the names, dtypes and shapes of the entries
it lists (before any tensor is read), and the tensors once read — delta pairs, task-head tensors, value ranges.

Every check raises `AdapterFileError` naming the offending tensor or header entry.
"""

from __future__ import annotations

import torch

from ..tuner.delta import SparseDelta, add_delta
from . import fingerprint as fingerprints
from .file_layout import (
    EXACT_AT_SUFFIX,
    EXACT_SUFFIX,
    INDEX_DTYPES,
    INDEX_SUFFIX,
    MODEL_PREFIX,
    VALUE_DTYPES,
    VALUES_SUFFIX,
    Expected,
    is_delta_key,
    stem,
)
from .safetensors_header import FILE_DTYPES, MAX_COUNT, AdapterFileError, is_count

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


# -- the header's entries, before any tensor is read -------------------------------------------------------------
def check_entries(entries: dict[str, dict], expected: Expected | None, path: str) -> None:
    """Names, dtypes and shapes of the header's entries, before any tensor is read: index and value tensors in
    pairs of one length; with `expected`, only candidates of the model and its head tensors, in their shapes."""
    lengths: dict[str, dict[str, int]] = {}
    unexpected = []
    for key, entry in entries.items():
        dtype, shape = FILE_DTYPES[entry["dtype"]], tuple(entry["shape"])
        if is_delta_key(key):
            check_delta_spec(key, dtype, shape)
            lengths.setdefault(stem(key), {})[key] = shape[0]
        elif expected is None:
            continue
        elif key in expected.heads:
            check_head_spec(key, dtype, shape, expected.heads[key])
        else:
            unexpected.append(key)
    for tensor_stem, pair in lengths.items():
        _check_pair(tensor_stem, pair, path)
        if expected is not None:
            index_key = tensor_stem + INDEX_SUFFIX
            check_fits(index_key, pair[index_key], tensor_stem.removeprefix(MODEL_PREFIX), expected.numels)
    if unexpected:
        raise AdapterFileError(f"{path} holds tensors this model has no place for: {sorted(unexpected)[:5]}.")


def _check_pair(tensor_stem: str, lengths: dict[str, int], path: str) -> None:
    """The entries of one changed tensor (`lengths`: their lengths by key): indices and deltas of one length, exact
    deltas with their positions, no more of them than deltas."""
    index_key, values_key = tensor_stem + INDEX_SUFFIX, tensor_stem + VALUES_SUFFIX
    for key in (index_key, values_key):
        if key not in lengths:
            raise AdapterFileError(f"Tensor '{key}' is missing from {path}: each changed tensor needs both.")
    if lengths[index_key] != lengths[values_key]:
        raise AdapterFileError(
            f"Tensors '{index_key}' ({lengths[index_key]}) and '{values_key}' ({lengths[values_key]}) differ in length."
        )
    exact = [lengths.get(tensor_stem + EXACT_AT_SUFFIX), lengths.get(tensor_stem + EXACT_SUFFIX)]
    if exact != [None, None] and (None in exact or exact[0] != exact[1] or exact[0] > lengths[index_key]):
        raise AdapterFileError(
            f"Tensors '{tensor_stem}{EXACT_AT_SUFFIX}' and '{tensor_stem}{EXACT_SUFFIX}' must both be "
            f"present, of one length, at most that of '{index_key}'."
        )


def check_fits(key: str, length: int, name: str, numels: dict[str, int]) -> None:
    """Index tensor `key` of `length` entries changes `name`, a candidate with at least that many entries."""
    if name not in numels:
        raise AdapterFileError(
            f"Tensor '{key}' refers to '{name}', which is not a candidate parameter of this base model."
        )
    if length > numels[name]:
        raise AdapterFileError(f"Tensor '{key}' has {length:,} entries, more than the {numels[name]:,} of '{name}'.")


def check_delta_spec(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The dtype and shape a delta tensor's key calls for: 1-D indices, float deltas, float64 exact deltas."""
    if key.endswith((INDEX_SUFFIX, EXACT_AT_SUFFIX)):
        if dtype not in INDEX_DTYPES or len(shape) != 1:
            raise AdapterFileError(f"Tensor '{key}' must be a 1-D int32/int64 tensor, got {dtype} with shape {shape}.")
    elif key.endswith(EXACT_SUFFIX):
        if dtype != torch.float64 or len(shape) != 1:
            raise AdapterFileError(f"Tensor '{key}' must be a 1-D float64 tensor, got {dtype} with shape {shape}.")
    elif dtype not in VALUE_DTYPES or len(shape) != 1:
        raise AdapterFileError(f"Tensor '{key}' must be a 1-D float tensor, got {dtype} with shape {shape}.")


def check_head_spec(key: str, dtype: torch.dtype, shape: tuple[int, ...], spec) -> None:
    """A task-head tensor against `spec`: the model's shape (a `torch.Size`) or its (shape, dtype)."""
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


# -- the tensors, once read ----------------------------------------------------------------------------------------
def parse_delta(
    tensors: dict[str, torch.Tensor], numels: dict[str, int], source: str = "the adapter file"
) -> SparseDelta:
    """Validate the delta tensors against the base tensor sizes `numels` and build a `SparseDelta`."""
    stems = dict.fromkeys(stem(key) for key in tensors if is_delta_key(key))
    out = {}
    for tensor_stem in stems:
        name = tensor_stem.removeprefix(MODEL_PREFIX)
        index_key, values_key = tensor_stem + INDEX_SUFFIX, tensor_stem + VALUES_SUFFIX
        for key in (index_key, values_key):
            if key not in tensors:
                raise AdapterFileError(f"Tensor '{key}' is missing from {source}: each changed tensor needs both.")
        index, values = tensors[index_key], tensors[values_key]
        if name not in numels:
            raise AdapterFileError(
                f"Tensor '{index_key}' refers to '{name}', which is not a candidate parameter of this base model."
            )
        index = _checked_index(index_key, index, values_key, values, name, numels[name])
        if not bool(torch.isfinite(values).all()):
            raise AdapterFileError(f"Tensor '{values_key}' contains NaN or infinite values.")
        out[name] = (index, _with_exact(tensors, tensor_stem, values.float(), source))
    return SparseDelta(out)


def _checked_index(
    index_key: str, index: torch.Tensor, values_key: str, values: torch.Tensor, name: str, numel: int
) -> torch.Tensor:
    """The index tensor of `name` (of `numel` entries) as int64, once it is sorted, unique, in range and as long as
    its deltas."""
    check_delta_spec(index_key, index.dtype, tuple(index.shape))
    check_delta_spec(values_key, values.dtype, tuple(values.shape))
    if index.numel() != values.numel():
        raise AdapterFileError(
            f"Tensors '{index_key}' ({index.numel()}) and '{values_key}' ({values.numel()}) differ in length."
        )
    index = index.long()
    if index.numel():
        if int(index.min()) < 0 or int(index.max()) >= numel:
            raise AdapterFileError(f"Tensor '{index_key}' has indices outside [0, {numel}) for '{name}'.")
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise AdapterFileError(
                f"Tensor '{index_key}' is not strictly increasing: indices must be sorted and unique."
            )
    return index


def _with_exact(tensors: dict[str, torch.Tensor], tensor_stem: str, values: torch.Tensor, source: str) -> torch.Tensor:
    """`values`, in float64 with the exact deltas put in, when the file has exact deltas for this tensor."""
    at_key, exact_key = tensor_stem + EXACT_AT_SUFFIX, tensor_stem + EXACT_SUFFIX
    if at_key not in tensors and exact_key not in tensors:
        return values
    for key in (at_key, exact_key):
        if key not in tensors:
            raise AdapterFileError(f"Tensor '{key}' is missing from {source}: exact deltas need positions and values.")
    at, exact = tensors[at_key], tensors[exact_key]
    check_delta_spec(at_key, at.dtype, tuple(at.shape))
    check_delta_spec(exact_key, exact.dtype, tuple(exact.shape))
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


def check_other_tensors(
    tensors: dict[str, torch.Tensor], expected: dict, source: str, specs_checked: bool = False
) -> None:
    """The non-delta tensors (task heads): exactly the `expected` keys, same shapes, finite values.

    `expected` maps keys to the model's shapes (`torch.Size`) or to (shape, dtype); with a dtype, a head tensor
    must also be of the same kind (float or not) and its values must stay finite once cast to that dtype.
    `specs_checked`: the header's entries were checked against `expected` already (`check_entries`), and a tensor
    read has the dtype and shape its entry lists, so only the values are checked here.
    """
    others = {key: value for key, value in tensors.items() if not is_delta_key(key)}
    for key, spec in expected.items():
        if key not in others:
            raise AdapterFileError(f"Tensor '{key}' (a modules_to_save weight) is missing from {source}.")
        tensor = others[key]
        if not specs_checked:
            check_head_spec(key, tensor.dtype, tuple(tensor.shape), spec)
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
