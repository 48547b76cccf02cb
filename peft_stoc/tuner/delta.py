"""`SparseDelta`: what a StocTuning adapter is — for each changed base tensor, sorted flat indices and the value
added at each of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SparseDelta:
    """Per base tensor name: `(indices, values)` with sorted, unique int64 flat indices and float values.

    Args:
        tensors (`dict[str, tuple[torch.Tensor, torch.Tensor]]`): the changed entries of each base tensor.

    Example:

        ```py
        >>> delta = model.base_model.adapter_delta("default")  # a trained StocTuning model
        >>> delta.num_changed  # distinct base entries the adapter changes
        >>> index, values = delta.tensors["bert.encoder.layer.0.attention.self.query.weight"]
        ```
    """

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_changed(self) -> int:
        return sum(index.numel() for index, _ in self.tensors.values())

    def clone(self) -> SparseDelta:
        return SparseDelta({name: (index.clone(), values.clone()) for name, (index, values) in self.tensors.items()})

    @staticmethod
    def weighted_sum(deltas: list[SparseDelta], weights: list[float]) -> SparseDelta:
        """Σ wᵢ·δᵢ over the union of indices; entries that sum to exactly zero are dropped."""
        if len(deltas) != len(weights):
            raise ValueError(f"Got {len(deltas)} adapters but {len(weights)} weights.")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"Weights must be finite numbers, got {list(weights)}.")
        names: dict[str, None] = {}
        for delta in deltas:
            names.update(dict.fromkeys(delta.tensors))
        combined = {}
        for name in names:
            parts = [(d.tensors[name], w) for d, w in zip(deltas, weights) if name in d.tensors]
            index = torch.cat([idx for (idx, _), _ in parts])
            # float64 deltas (kept so where float32 cannot reproduce a trained weight) stay float64.
            wide = torch.float64 if any(vals.dtype == torch.float64 for (_, vals), _ in parts) else torch.float32
            values = torch.cat([vals.to(wide) * w for (_, vals), w in parts])
            union, inverse = torch.unique(index, sorted=True, return_inverse=True)
            summed = torch.zeros(union.numel(), dtype=wide, device=values.device)
            summed.index_add_(0, inverse, values)
            nonzero = summed != 0
            if nonzero.any():
                combined[name] = (union[nonzero], summed[nonzero])
        return SparseDelta(combined)


def add_delta(values: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`values` + `delta`, computed in float32 (float64 for float64 deltas) and rounded to `values`' dtype."""
    wide = torch.float64 if delta.dtype == torch.float64 else torch.float32
    return (values.to(wide) + delta.to(device=values.device, dtype=wide)).to(values.dtype)
