"""Base-model fingerprint: tells whether an adapter file was made for the base it is being loaded onto.

It records the candidate tensors' names, shapes and dtypes, and a fixed sample of base values (one entry per tensor
at a position derived from its name, for up to `SAMPLE_TENSORS` tensors) with their checksum. A base loaded in
another dtype (a float32 adapter onto a bfloat16 base) is compared by rounding the recorded values to that dtype.
A quantized base (bitsandbytes) records its quantization too — format, block size, double quantization, compute
dtype — and a base quantized otherwise is another base: the adapter's delta was trained over other values.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable

import torch

from ..quantized import bnb_weights as quantized
from ..quantized.overlay import overlay_of

SAMPLE_TENSORS = 64

BaseValues = Callable[[str, torch.Tensor], torch.Tensor]  # (name, flat positions) -> base values there


def _structure(shapes: dict[str, tuple[tuple[int, ...], str]]) -> str:
    text = "\n".join(f"{name}:{list(shape)}" for name, (shape, _) in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _sample_plan(shapes: dict[str, tuple[tuple[int, ...], str]]) -> list[tuple[str, int]]:
    """(name, flat position) pairs: evenly spread tensors, a name-derived position in each."""
    names = sorted(shapes)
    step = max(1, len(names) // SAMPLE_TENSORS)
    plan = []
    for name in names[::step][:SAMPLE_TENSORS]:
        numel = 1
        for size in shapes[name][0]:
            numel *= size
        if numel:
            plan.append((name, zlib.crc32(name.encode()) % numel))
    return plan


def _checksum(values: list[float]) -> str:
    return hashlib.sha256(torch.tensor(values, dtype=torch.float32).numpy().tobytes()).hexdigest()


def compute(params: dict[str, torch.Tensor], base_values: BaseValues) -> dict:
    """The fingerprint of a base given its candidate tensors and a way to read base values."""
    shapes = {name: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in params.items()}
    values = []
    for name, position in _sample_plan(shapes):
        value = base_values(name, torch.tensor([position], device=params[name].device))
        values.append(float(value.float().item()))
    found = {
        "structure": _structure(shapes),
        "dtypes": sorted({dtype for _, dtype in shapes.values()}),
        "num_tensors": len(shapes),
        "values": values,
        "checksum": _checksum(values),
    }
    quantization = _quantization(params)
    if quantization:
        found["quantization"] = quantization
    return found


def _quantization(params: dict[str, torch.Tensor]) -> list[dict]:
    """Each distinct quantization among the candidate tensors, with the number of tensors quantized so."""
    counts: dict[str, int] = {}
    for param in params.values():
        overlay = overlay_of(param)
        if overlay is not None:
            key = json.dumps(quantized.describe(overlay.layer), sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
    return [{**json.loads(key), "tensors": count} for key, count in sorted(counts.items())]


def _describe_quantization(entries) -> str:
    if not entries:
        return "not quantized"
    return "; ".join(", ".join(f"{k}={v}" for k, v in entry.items()) for entry in entries)


def mismatch(recorded: dict, params: dict[str, torch.Tensor], base_values: BaseValues) -> str | None:
    """Why `params` is not the base `recorded` was made for, or None when it is."""
    current = compute(params, base_values)
    if recorded.get("quantization", []) != current.get("quantization", []):
        return (
            f"it is quantized differently (the adapter's base: {_describe_quantization(recorded.get('quantization'))}; "
            f"this one: {_describe_quantization(current.get('quantization'))})"
        )
    if recorded.get("structure") != current["structure"]:
        return (
            f"its parameter names or shapes differ (the adapter's base had {recorded.get('num_tensors')} candidate "
            f"tensors, this one has {current['num_tensors']} with other names or shapes)"
        )
    if recorded.get("checksum") == current["checksum"]:
        return None
    # Same structure, other values: acceptable only when they are the recorded values rounded to this dtype.
    recorded_values = torch.tensor(recorded.get("values", []), dtype=torch.float32)
    if recorded_values.numel() != len(current["values"]):
        return "its sampled values differ"
    # Either side may be the coarser one (a bf16 adapter onto an fp32 base, or the other way round): values match
    # when rounding the finer one to the coarser dtype makes them equal.
    recorded_dtypes = [
        getattr(torch, d) for d in recorded.get("dtypes", []) if isinstance(getattr(torch, d, None), torch.dtype)
    ]
    plan = _sample_plan({n: (tuple(p.shape), "") for n, p in params.items()})
    for (name, _), expected, actual in zip(plan, recorded_values, current["values"]):
        if float(expected.to(params[name].dtype).float()) == actual:
            continue
        actual_value = torch.tensor(actual, dtype=torch.float32)
        if not any(float(actual_value.to(dtype).float()) == float(expected) for dtype in recorded_dtypes):
            return f"its values differ (e.g. in '{name}')"
    return None


def problem(recorded) -> str | None:
    """What is wrong with a fingerprint read from a file header (to follow "header entry ..."), or None."""
    if not isinstance(recorded, dict):
        return f"must be a JSON object, got {json_kind(recorded)}"
    for key in ("structure", "checksum"):
        if not isinstance(recorded.get(key), str):
            return f"needs a string '{key}', got {json_kind(recorded.get(key))}"
    if "num_tensors" in recorded and not _is_number(recorded["num_tensors"], int):
        return f"needs an integer 'num_tensors', got {json_kind(recorded['num_tensors'])}"
    values = recorded.get("values", [])
    if not isinstance(values, list) or not all(_is_number(v, (int, float)) for v in values):
        return f"needs a list of numbers as 'values', got {json_kind(values)}"
    dtypes = recorded.get("dtypes", [])
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        return f"needs a list of strings as 'dtypes', got {json_kind(dtypes)}"
    quantization = recorded.get("quantization", [])
    if not isinstance(quantization, list) or not all(isinstance(q, dict) for q in quantization):
        return f"needs a list of objects as 'quantization', got {json_kind(quantization)}"
    return None


def _is_number(value, kinds) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


_JSON_KINDS = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}


def json_kind(value) -> str:
    """`value` as an error message names it: 'null', "a JSON list of 2 items", "a JSON string ('abc')". Costs
    no more than a glance at the value, however large or deep it is."""
    if value is None:
        return "null"
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return f"a JSON {kind} of {len(value):,} items"
    text = value[:40] if isinstance(value, str) else value
    return f"a JSON {kind} ({json.dumps(text)[:40]!r})"


def to_json(fingerprint: dict) -> str:
    return json.dumps(fingerprint, separators=(",", ":"))
