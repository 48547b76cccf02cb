"""Reading a safetensors header within limits: its raw bytes are bounded before they are parsed, and every entry's
dtype, shape and byte range is checked against the file's size, so a hostile header costs no more than reading it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import fingerprint as fingerprints

# The safetensors dtypes an adapter file may use (task heads may hold integer buffers).
FILE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class AdapterFileError(ValueError):
    """An adapter file that cannot be used as it is."""


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


def read_header(
    path: str, limits: Limits | None = DEFAULT_LIMITS, refine: Callable[[dict], Limits | None] | None = None
) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (name -> dtype, shape, offsets) and metadata of a safetensors file, parsed within
    `limits` (None: none) and checked for consistency with the file's size.

    `refine(metadata)` may tighten the limits from the metadata alone (what the file says about its base), read
    first where it leads the header (as safetensors writes it): the rest of the header is then held to them before
    it is parsed."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise corrupt(path, "it is shorter than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if limits is not None and length > limits.max_header_bytes:
                raise AdapterFileError(
                    f"{path} has a header of {length:,} bytes; an adapter file {limits.scope} has at most "
                    f"{limits.max_header_bytes:,}. Refusing to read it."
                )
            if 8 + length > size:
                raise corrupt(path, f"its header claims {length:,} bytes but the file has {size:,}")
            raw = handle.read(length)
    except OSError as error:
        raise AdapterFileError(f"Cannot read {path}: {error}.") from error
    if limits is not None:
        _check_raw_counts(raw, limits, path)
        tighter = refine(_leading_metadata(raw)) if refine is not None else None
        if tighter is not None:
            if length > tighter.max_header_bytes:
                raise AdapterFileError(
                    f"{path} has a header of {length:,} bytes; an adapter file {tighter.scope} has at most "
                    f"{tighter.max_header_bytes:,}. Refusing to read it."
                )
            _check_raw_counts(raw, tighter, path)
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
        raise AdapterFileError(
            f"{path} has a header with more values than an adapter file {limits.scope} can hold. Refusing to read it."
        )


_METADATA_START = b'{"__metadata__":'


def _leading_metadata(raw: bytes) -> dict:
    """The header's metadata when it comes first, parsed alone (its values are strings: cheap); else {}."""
    if not raw.startswith(_METADATA_START):
        return {}
    try:
        metadata, _ = json.JSONDecoder().raw_decode(raw.decode("utf-8"), len(_METADATA_START))
    except (ValueError, RecursionError):
        return {}  # the full parse names the problem
    return metadata if isinstance(metadata, dict) else {}


def _parse_header(raw: bytes, path: str) -> dict:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise corrupt(path, f"its header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise corrupt(path, f"its header is {fingerprints.json_kind(header)}, not a JSON object")
    return header


def _check_metadata(metadata, path: str) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(path, "its header metadata must map strings to strings")
    return metadata


def _check_layout(entries: dict, data_bytes: int, path: str) -> None:
    """Every entry names a known dtype, a shape and a byte range of that size inside the file."""
    for name, entry in entries.items():
        if not name or not isinstance(entry, dict):
            raise corrupt(path, f"its header entry {name!r} is not a tensor description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FILE_DTYPES:
            raise AdapterFileError(
                f"Tensor '{name}' in {path} has dtype {dtype!r}; adapter files hold {', '.join(FILE_DTYPES)}."
            )
        if not isinstance(shape, list) or not all(is_count(s) for s in shape):
            raise corrupt(path, f"tensor '{name}' has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_bytes
        ):
            raise corrupt(path, f"tensor '{name}' lies outside the file's {data_bytes:,} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * FILE_DTYPES[dtype].itemsize:
            raise corrupt(path, f"tensor '{name}' has {offsets[1] - offsets[0]:,} bytes for shape {shape}")


def corrupt(path: str, why: str) -> AdapterFileError:
    return AdapterFileError(
        f"{path} is not a readable safetensors file ({why}); it is probably truncated or corrupt. "
        "Save the adapter again or download it anew."
    )


MAX_COUNT = 2**63 - 1  # counts, sizes and offsets end up in int64 (a step count in a state dict too)


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
