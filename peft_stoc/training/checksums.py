"""The audit's checksum: Σ word · weight(word position) mod 2⁶⁴ over a tensor's bytes read as 64-bit words.

Each word's weight is odd, so a change of any single entry moves the sum; the terms of single entries add up to the
sum of their tensor, so recorded entries can be swapped in and out of it in time ∝ their count.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import compat

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


def _words(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the whole 64-bit words of `flat`'s bytes, the bytes of a last partial word)."""
    try:
        raw = flat.view(torch.uint8)
        raw[: raw.numel() // 8 * 8].view(torch.int64)
    except RuntimeError:  # entries not aligned to 8 bytes in their storage (a view into a larger buffer)
        raw = flat.clone().view(torch.uint8)
    whole = raw.numel() // 8
    return raw[: whole * 8].view(torch.int64), raw[whole * 8 :]


def _chunks(words: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(chunk number, its words) of every chunk of `words`."""
    return [(chunk, words[start : start + _WORDS]) for chunk, start in enumerate(range(0, words.numel(), _WORDS))]


def _chunk_term(chunk: int, part: torch.Tensor) -> torch.Tensor:
    """The checksum's terms of the words `part` of chunk number `chunk`."""
    return _weighted_sum(part, _first_chunk_weights(part.device)[: part.numel()]) * (chunk * 2 + 1)


def _tail_term(tail: torch.Tensor, words: int) -> torch.Tensor:
    """The term of the last, partial word (its bytes little-endian), which follows `words` whole ones."""
    if not tail.numel():
        return torch.zeros((), dtype=torch.int64, device=tail.device)
    shifts = torch.arange(tail.numel(), dtype=torch.int64, device=tail.device) * 8
    word = (tail.to(torch.int64) << shifts).sum()
    return word * word_weights(torch.tensor(words, device=tail.device))


def checksum(flat: torch.Tensor) -> torch.Tensor:
    """Σ word · weight(word position) mod 2⁶⁴ over the bytes of `flat` (contiguous), read as 64-bit words: an int64
    scalar on `flat`'s device (read nothing back: a check compares all tensors' sums at once). A quantized weight's
    overlay has its own (`overlay.Overlay.checksum`)."""
    if not isinstance(flat, torch.Tensor):
        return flat.checksum()
    words, tail = _words(flat)
    total = _tail_term(tail, words.numel())
    for chunk, part in _chunks(words):
        total += _chunk_term(chunk, part)
    return total


# Below this many words in all, `checksums` reads on one thread: handing chunks to another costs more.
PARALLEL_WORDS = 1 << 22
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, the pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads for `checksums`; made anew in a forked process (a fork copies no threads) or for more of them."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="stoc-checksum"))
    return _POOL[2]


def _spread() -> int:
    """How many threads `checksums` reads with: torch's, unless a trace or a function mode is running (they hold for
    the calling thread only)."""
    if torch.compiler.is_compiling() or compat.function_mode_enabled():
        return 1
    return torch.get_num_threads()


def _chunk_terms(jobs: list[tuple[int, int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """(tensor position, term) of each job (tensor position, chunk number, its words)."""
    return [(position, _chunk_term(chunk, part)) for position, chunk, part in jobs]


def _shares(jobs: list[tuple[int, int, torch.Tensor]], count: int, threads: int) -> list[list]:
    """`jobs` cut into `threads` consecutive runs of about as many words each."""
    _first_chunk_weights(jobs[0][2].device)  # made here, not by two workers at once
    shares, share, held = [], [], 0
    for job in jobs:
        share.append(job)
        held += job[2].numel()
        if held * threads >= count * (len(shares) + 1) and len(shares) < threads - 1:
            shares.append(share)
            share = []
    shares.append(share)
    return shares


def checksums(flats: list) -> list[torch.Tensor]:
    """`checksum` of each of `flats`. On a CPU with several torch threads the chunks of all tensors are shared among as
    many Python threads: `torch.dot` of int64 runs on one thread (and releases the GIL), so one thread reads the
    weights at half the memory's speed. Wrapping addition does not depend on the order: the sums are the same."""
    threads = _spread()
    if threads < 2:
        return [checksum(flat) for flat in flats]
    totals: list[torch.Tensor] = []
    jobs: list[tuple[int, int, torch.Tensor]] = []
    for position, flat in enumerate(flats):
        if not isinstance(flat, torch.Tensor) or flat.device.type != "cpu":
            totals.append(checksum(flat))
            continue
        words, tail = _words(flat)
        totals.append(_tail_term(tail, words.numel()))
        jobs += [(position, chunk, part) for chunk, part in _chunks(words)]
    count = sum(part.numel() for _, _, part in jobs)
    shares = [jobs] if not jobs or count < PARALLEL_WORDS else _shares(jobs, count, threads)
    futures = [_pool(threads - 1).submit(_chunk_terms, share) for share in shares[1:]]
    parts = _chunk_terms(shares[0]) + [part for future in futures for part in future.result()]
    for position, term in parts:
        totals[position] = totals[position] + term
    return totals


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
