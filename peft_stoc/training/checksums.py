"""The audit's checksum: Σ word · weight(word position) mod 2⁶⁴ over a tensor's bytes read as 64-bit words.

Each word's weight is odd, so a change of any single entry moves the sum; the terms of single entries add up to the
sum of their tensor, so recorded entries can be swapped in and out of it in time ∝ their count.
"""

from __future__ import annotations

import torch

_WORDS = 1 << 19  # 64-bit words per chunk (4 MiB of temporaries)
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_SALT = 0x7F4A7C159E3779B9
_UNSIGNED = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: -1}
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def word_weights(words: torch.Tensor) -> torch.Tensor:
    """The odd weight of each 64-bit word (global word positions `words`), wrapping int64 arithmetic."""
    position, chunk = words % _WORDS, words // _WORDS
    return ((position * _MIX + _SALT) | 1) * (chunk * 2 + 1)


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _first_chunk_weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = word_weights(torch.arange(_WORDS, dtype=torch.int64, device=device))
    return _WEIGHTS[device]


def _weighted_sum(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ words · weights, wrapping. On a CPU one pass of `torch.dot`: no temporary, and no thread pool to wake for
    each of a model's hundreds of tensors (reading the weights is bound by memory, not by arithmetic); CUDA's dot
    takes floating point only."""
    if words.device.type == "cpu":
        return torch.dot(words, weights)
    return (words * weights).sum()


def checksum(flat: torch.Tensor) -> torch.Tensor:
    """Σ word · weight(word position) mod 2⁶⁴ over the bytes of `flat` (contiguous), read as 64-bit words: an int64
    scalar on `flat`'s device (read nothing back: a check compares all tensors' sums at once). A quantized weight's
    overlay has its own (`overlay.Overlay.checksum`)."""
    if not isinstance(flat, torch.Tensor):
        return flat.checksum()
    try:
        raw = flat.view(torch.uint8)
        raw[: raw.numel() // 8 * 8].view(torch.int64)
    except RuntimeError:  # entries not aligned to 8 bytes in their storage (a view into a larger buffer)
        raw = flat.clone().view(torch.uint8)
    whole = raw.numel() // 8
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    words = raw[: whole * 8].view(torch.int64)
    weights = _first_chunk_weights(flat.device)
    for chunk, start in enumerate(range(0, whole, _WORDS)):
        part = words[start : start + _WORDS]
        total += _weighted_sum(part, weights[: part.numel()]) * (chunk * 2 + 1)
    tail = raw[whole * 8 :]
    if tail.numel():  # the last, partial word, its bytes little-endian
        shifts = torch.arange(tail.numel(), dtype=torch.int64, device=flat.device) * 8
        word = (tail.to(torch.int64) << shifts).sum()
        total += word * word_weights(torch.tensor(whole, device=flat.device))
    return total


def entry_terms(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """What the entries at flat `positions`, holding `values`, contribute to `checksum` of their tensor (an int64
    scalar on `values`' device)."""
    if positions.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=values.device)
    byte = positions.to(torch.int64) * values.element_size()
    shifted = bits_of(values) << ((byte % 8) * 8)
    return (shifted * word_weights(byte // 8).to(shifted.device)).sum()


def bits_of(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of `values` as non-negative int64."""
    size = values.element_size()
    return values.contiguous().view(_INT_OF_SIZE[size]).to(torch.int64) & _UNSIGNED[size]
