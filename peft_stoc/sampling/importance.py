"""Importance of an entry, I = |μ ⊙ θ ⊙ g|, and `Source`: one candidate tensor as the samplers see it.

Every sampler reads a tensor in chunks of whole rows (dim 0), so that μ factors along dim 0 (embedding rows, norm
gains) and along the last dim (a linear layer's inputs) broadcast against a chunk the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..training.tracking import MeanFactor

CHUNK_ENTRIES = 1 << 20  # entries per chunk on a CPU: a chunk's buffer stays in cache
DEVICE_CHUNK_ENTRIES = 1 << 24  # on accelerators: fewer, larger kernels and host synchronisations
NAN_MESSAGE = (
    "StocTuning: the importance of some entries is NaN (NaN weights, gradients or activations); skip such steps "
    "(e.g. with a gradient scaler) before the optimizer steps."
)


@dataclass
class Source:
    """One candidate tensor as the sampler sees it."""

    param: torch.Tensor
    grad: torch.Tensor | None
    means: list[MeanFactor]
    changed: torch.Tensor | None = None  # sorted flat indices already changed (only needed under a budget)
    # `param` and `grad` hold rows [first_row, first_row + their rows) of the tensor: a tile of a tensor whose
    # gradient is computed a few rows at a time (a quantized weight, `overlay`). Flat indices stay whole-tensor.
    first_row: int = 0

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def first_entry(self) -> int:
        """The whole-tensor flat index of the tile's first entry."""
        return self.first_row * (rows_view(self.param).shape[1] if self.param.dim() else 1)


def chunk_entries_for(device: torch.device) -> int:
    return CHUNK_ENTRIES if device.type == "cpu" else DEVICE_CHUNK_ENTRIES


def rows_view(tensor: torch.Tensor) -> torch.Tensor:
    """2-D (rows, rest) view of a parameter-shaped tensor; a scalar or vector has one entry per row."""
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def entries_per_row(shape) -> int:
    """Entries in one dim-0 row of a tensor of `shape` (a scalar is one row of one entry)."""
    return max(1, int(torch.Size(shape[1:]).numel())) if len(shape) else 1


def row_chunks(shape: torch.Size, chunk_entries: int = CHUNK_ENTRIES):
    """Yield (first_row, last_row) ranges over dim 0 holding about `chunk_entries` entries each."""
    rows = shape[0] if len(shape) else 1
    step = max(1, chunk_entries // entries_per_row(shape))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def mean_factor(source: Source, rows: slice | torch.Tensor) -> torch.Tensor | float | None:
    """μ of `rows` (a slice or row indices), broadcastable against those rows; None when μ is 1."""
    mu = None
    for vector, dim in source.means:
        if vector is None:
            term = 1.0
        elif dim == 0:
            term = (vector[rows] if isinstance(rows, slice) else vector.index_select(0, rows)).unsqueeze(1)
        else:
            term = vector.unsqueeze(0)
        mu = term if mu is None else mu + term
    return mu


def importance(
    source: Source, rows: slice | torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """scale·|θ ⊙ g ⊙ μ| of `rows` (a range or row indices) of a tensor, flattened, in float32; written into `out`
    (exactly as many entries as the rows hold) when given, so a sampler's chunk buffer is reused."""
    param, grad = rows_view(source.param.detach()), rows_view(source.grad)
    if isinstance(rows, slice):
        theta, g = param[rows], grad[rows]
    else:
        theta, g = param.index_select(0, rows), grad.index_select(0, rows)
    if g.dtype == torch.float64:
        g = g.float()  # the product is taken in float32, whatever the gradient's dtype
    value = theta.new_empty(theta.shape, dtype=torch.float32) if out is None else out.view(theta.shape)
    torch.mul(theta if theta.dtype == torch.float32 else theta.float(), g, out=value)
    mu = mean_factor(source, rows)
    factor = mu if scale == 1.0 else scale if mu is None else mu * scale
    if factor is not None:
        value.mul_(factor)
    return value.abs_().reshape(-1)


def finite_means(means: list[MeanFactor]) -> bool:
    """Whether every factor of μ is finite."""
    return all(vector is None or bool(torch.isfinite(vector).all()) for vector, _ in means)
