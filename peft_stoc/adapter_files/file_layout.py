"""Where things are in an adapter file: the keys of a changed base tensor's tensors, the header entries, the dtypes
each tensor may have, and what a file for one model may hold (`Expected`).

For each changed base tensor `<name>` the file holds `base_model.model.<name>.stoc_indices` (sorted flat indices,
int32 below 2^31 entries, else int64) and `base_model.model.<name>.stoc_delta` (the value added at each index), and
for entries float32 cannot carry exactly their float64 delta (`.stoc_exact_at`, `.stoc_exact`). The header metadata
records the format version, counts and the base-model fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import atomic_folder
from .safetensors_header import Limits

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


def is_delta_key(key: str) -> bool:
    """Whether file key `key` is one of a changed base tensor's tensors (not a task-head tensor)."""
    return key.endswith(DELTA_SUFFIXES)


def stem(key: str) -> str:
    """`key` without its delta suffix: `base_model.model.<name>` of the changed base tensor."""
    for suffix in DELTA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


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
