"""`Unchanged`: whether a tensor is the very one seen before, not written in place since.

What is worked out from a tensor that stays the same between draws (a reused mask's indices, the record of
originals) is kept and used again; the tensor is held weakly, with its version counter, so that another tensor, or
the same one edited in place (a loaded state, a user's edit), is told apart and the work is done afresh.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .. import compat


class Unchanged:
    """A tensor held weakly with its version at the time (`on_free`: called when the tensor is freed)."""

    __slots__ = ("_ref", "_version")

    def __init__(self, tensor: torch.Tensor, on_free: Callable | None = None):
        self._ref = weakref.ref(tensor) if on_free is None else weakref.ref(tensor, on_free)
        self._version = compat.tensor_version(tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        return self._ref() is tensor and self._version == compat.tensor_version(tensor)
