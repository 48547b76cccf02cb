"""Which rows of an embedding table a module gathered while it ran.

Embedding subclasses compute their indices inside `forward` (OPT and BART add an offset to positions they derive
from a mask or a shape; Whisper slices the table), so the module's arguments do not say which rows it read: a torch
function mode records the gathers of the table while the module runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class RowGathers(TorchFunctionMode):
    """Records which rows of `weight` torch functions gather while one embedding module runs."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.rows: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rows = _gathered_rows(func, args, kwargs, self.weight)
        if rows is not None:
            self.rows.append(rows.detach())
        return func(*args, **kwargs)


def _gathered_rows(func, args, kwargs, weight: torch.Tensor) -> torch.Tensor | None:
    """Row indices of `weight` that the call `func(*args, **kwargs)` gathers, or None if it gathers none."""
    if func is F.embedding:
        table = args[1] if len(args) > 1 else kwargs.get("weight")
        return args[0] if table is weight and args else None
    if func in (torch.Tensor.index_select, torch.index_select) and args and args[0] is weight:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        index = args[2] if len(args) > 2 else kwargs.get("index")
        return index if dim == 0 else None
    if func is torch.Tensor.__getitem__ and args and args[0] is weight:
        return _rows_of_index(args[1], weight.shape[0], weight.device)
    return None


def _rows_of_index(index, rows: int, device) -> torch.Tensor | None:
    """Rows selected by `weight[index]`, shaped like the lookup's leading dimensions; None for other indexing."""
    if isinstance(index, tuple):
        whole = all(part is Ellipsis or part == slice(None) for part in index[1:])
        return _rows_of_index(index[0], rows, device) if index and whole else None
    if isinstance(index, slice):
        return torch.arange(*index.indices(rows), device=device)
    if isinstance(index, int):
        return torch.tensor(index % rows, device=device)
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
        return index.nonzero().squeeze(-1) if index.dim() == 1 else None
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        return index.remainder(rows)
    return None
