"""`Overlay`: the changed entries of a quantized weight, added to its layer's output.

A bitsandbytes weight cannot hold a delta in its storage. Its overlay holds the float32 values of the entries that
differ from the dequantized base, and a forward hook adds `x · (values − base)ᵀ` over those entries to the layer's
output, a sparse product that costs ∝ tokens × changed entries. To the rest of StocTuning the overlay *is* the
weight's storage: `index_select` / `index_copy_` read and write effective values at flat indices exactly as a float
weight's flat view is read and written, so training, switching adapters, `disable_adapter()`, saving and loading go
through the same code for float and quantized bases (see `shards.local_entries`).

Its `handle` is the candidate the step engine sees: a float32 parameter of the weight's shape that stores one
number (a zero, expanded). It receives the gradient of the effective weight, which the overlay's backward computes
from the layer's input and output gradient; the optimizer holding it supplies the hyperparameters of the update.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tuner.originals import StateHolder
from . import bnb_weights as quantized


def overlay_of(tensor) -> Overlay | None:
    """The overlay a candidate parameter stands for (None for a float weight)."""
    return getattr(tensor, "stoc_overlay", None)


def _stand_in(shape: tuple[int, int], device) -> torch.Tensor:
    return torch.zeros((), device=device).expand(shape)


class Overlay(StateHolder):
    """The effective values of one quantized weight's changed entries, and the hook that adds them."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.name = name
        self.shape = (int(module.out_features), int(module.in_features))
        device = module.weight.device
        self.index = torch.empty(0, dtype=torch.int64, device=device)  # sorted flat indices of the changed entries
        self.values = torch.empty(0, device=device)  # their values now (float32)
        self.base = torch.empty(0, device=device)  # their dequantized base values
        self.handle = nn.Parameter(_stand_in(self.shape, device), requires_grad=False)
        self.handle.stoc_overlay = self
        self.gradient_sink = None  # the step engine's: (overlay, inputs, output gradients) -> the handle's gradient
        self.__dict__["layer"] = module  # referenced, not registered: the layer stays where the model has it
        self._hook = None

    def attach(self) -> Overlay:
        """Hook onto the layer: from now on its output carries the changed entries."""
        if self._hook is None:
            self._hook = self.layer.register_forward_hook(self._add_to_output)
        return self

    def remove(self) -> None:
        """Take the hook off the layer (the overlay must hold no change by then)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- the flat view StocTuning reads and writes ------------------------------------------------------------------
    dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.index.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantized(self) -> torch.Tensor:
        """The base weight in float32 (this layer only)."""
        return quantized.dequantize(self.layer)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Effective values at flat `index`: the changed entries' values, the dequantized base elsewhere."""
        index = index.to(self.device)
        out = self.dequantized().view(-1).index_select(0, index)
        slot, hit = self._find(index)
        return out.masked_scatter_(hit, self.values.index_select(0, slot.masked_select(hit)))

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(index, slice):  # (`flat[:0]`: no entries)
            index = torch.arange(self.numel(), device=self.device)[index]
        return self.index_select(0, index)

    def index_copy_(self, dim: int, index: torch.Tensor, values: torch.Tensor) -> Overlay:
        """Set effective values at flat `index` (sorted, unique); entries set back to their base leave the overlay."""
        index, values = index.to(self.device), values.to(device=self.device, dtype=torch.float32)
        slot, hit = self._find(index)
        kept_values = self.values.clone()
        kept_values[slot.masked_select(hit)] = values.masked_select(hit)
        new = ~hit
        new_index = index.masked_select(new)
        base = self.dequantized().view(-1).index_select(0, new_index)
        all_index = torch.cat([self.index, new_index])
        all_values = torch.cat([kept_values, values.masked_select(new)])
        all_base = torch.cat([self.base, base])
        order = all_index.argsort()
        all_index, all_values, all_base = (t.index_select(0, order) for t in (all_index, all_values, all_base))
        differs = all_values != all_base
        self.index, self.values, self.base = (t[differs] for t in (all_index, all_values, all_base))
        return self

    def __setitem__(self, index: torch.Tensor, values: torch.Tensor) -> None:
        self.index_copy_(0, index, values)

    def _find(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each of `index` sits among the changed entries, and whether it is one of them."""
        if self.index.numel() == 0:
            return torch.zeros_like(index), torch.zeros(index.shape, dtype=torch.bool, device=index.device)
        slot = torch.searchsorted(self.index, index).clamp_(max=self.index.numel() - 1)
        return slot, self.index.index_select(0, slot) == index

    def checksum(self) -> torch.Tensor:
        """The audit's checksum of the weight as it is now: the quantized storage, with each changed entry's value in
        place of its base value (the audit swaps recorded entries' values for their originals the same way)."""
        from ..training.checksums import checksum, entry_terms  # (the training package reads overlays)

        total = sum(checksum(tensor.detach().reshape(-1).contiguous()) for tensor in quantized.storage(self.layer))
        changed = entry_terms(self.values, self.index) - entry_terms(self.base, self.index)
        return total + changed.to(total.device)

    # -- the forward ------------------------------------------------------------------------------------------------
    # Run eagerly under torch.compile: dynamo cannot trace sparse tensors (bitsandbytes' own kernels break its graph
    # at the same layer), and one compiled hook per layer shape would soon hit the recompile limit.
    @torch.compiler.disable
    def _add_to_output(self, module, args, output):
        self._keep_stand_in()
        training = self.handle.requires_grad and torch.is_grad_enabled()
        if self.index.numel() == 0 and not training:
            return output
        product = _SparseProduct.apply(args[0], self.handle, self)
        return output + product.to(output.dtype)

    def _keep_stand_in(self) -> None:
        """Put the stand-in back if the handle's data was replaced: TRL casts every trainable parameter of a
        quantized model to bfloat16 (`param.data = param.data.to(...)`), which turns the stand-in into a full tensor
        of the weight's shape. The handle carries no values, so its own dtype and storage mean nothing."""
        handle = self.handle
        if handle.dtype != torch.float32 or any(handle.stride()):
            handle.data = _stand_in(self.shape, handle.device)

    def rows_of_weights(self, weights: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """θ of rows [first, last): the dequantized `weights` with the changed entries' values, float32."""
        theta = weights[first:last].clone()
        width = self.shape[1]
        inside = (self.index >= first * width) & (self.index < last * width)
        theta.view(-1)[self.index.masked_select(inside) - first * width] = self.values.masked_select(inside)
        return theta

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with (out x in, float32): dequantized, with the changed entries' values."""
        return self.rows_of_weights(self.dequantized(), 0, self.shape[0])

    def tiles(self, entries: int):
        """(first row, last row, θ of those rows) over tiles of about `entries` entries, for a draw fed a few rows at
        a time: the layer is dequantized once, θ is formed one tile at a time."""
        weights = self.dequantized()
        rows = max(1, entries // self.shape[1])
        for first in range(0, self.shape[0], rows):
            last = min(self.shape[0], first + rows)
            yield first, last, self.rows_of_weights(weights, first, last)

    def weight_gradient(self, inputs: torch.Tensor, grads: torch.Tensor):
        """The handle's gradient for one backward (float32 inputs and output gradients, tokens first)."""
        if self.gradient_sink is not None:
            return self.gradient_sink(self, inputs, grads)
        return grads.t() @ inputs

    # -- travelling with the model ---------------------------------------------------------------------------------
    def __setstate__(self, state) -> None:
        # A copy's handle: `Parameter.__deepcopy__` keeps neither its attributes nor its stand-in layout.
        super().__setstate__(state)
        self.handle.data = _stand_in(self.shape, self.handle.device)
        self.handle.stoc_overlay = self

    def _apply(self, fn, recurse: bool = True):
        # The changed entries follow a device move; their values stay float32, and the handle stays a stand-in.
        device = fn(torch.zeros((), device=self.device)).device
        self.index, self.values, self.base = (t.to(device) for t in (self.index, self.values, self.base))
        self.handle.data = _stand_in(self.shape, device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[f"{prefix}index"] = self.index
        destination[f"{prefix}values"] = self.values
        destination[f"{prefix}base"] = self.base

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not {"index", "values", "base"} <= set(ours):
            return  # a state dict taken before this overlay existed
        self.index, self.values, self.base = (
            ours[key].to(self.device, torch.int64 if key == "index" else torch.float32).clone()
            for key in ("index", "values", "base")
        )


class _SparseProduct(torch.autograd.Function):
    """x ↦ x · Δᵀ for an overlay's sparse Δ (values − base at the changed entries). Its backward gives the input's
    gradient through Δ and hands the effective weight's gradient to the overlay."""

    @staticmethod
    def forward(ctx, x, handle, overlay):
        index, delta = overlay.index, overlay.values - overlay.base
        ctx.overlay = overlay
        ctx.save_for_backward(x if handle.requires_grad else None, index, delta)
        return _times(x, index, delta, overlay.shape, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        x, index, delta = ctx.saved_tensors
        overlay = ctx.overlay
        grad_x = _times(grad, index, delta, overlay.shape, transpose=True) if ctx.needs_input_grad[0] else None
        grad_handle = None
        if ctx.needs_input_grad[1]:
            width, height = overlay.shape[1], overlay.shape[0]
            inputs, grads = x.reshape(-1, width).float(), grad.reshape(-1, height).float()
            grad_handle = overlay.weight_gradient(inputs, grads)
        return grad_x, grad_handle, None


def _times(x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, shape, transpose: bool) -> torch.Tensor:
    """x · Δᵀ (or x · Δ with `transpose`) for Δ of `shape` given by flat `index` and `delta`, in float32."""
    height, width = shape
    rows, cols = index // width, index % width
    size_in, size_out = (height, width) if transpose else (width, height)
    flat = x.reshape(-1, size_in).float()
    if index.numel() == 0:
        return flat.new_zeros(*x.shape[:-1], size_out)
    pairs = torch.stack([cols, rows]) if transpose else torch.stack([rows, cols])
    # Sorted flat indices are sorted (row, column) pairs: coalesced as they are, unless transposed.
    matrix = torch.sparse_coo_tensor(
        pairs, delta, (size_out, size_in), is_coalesced=not transpose, check_invariants=False
    )
    return torch.sparse.mm(matrix, flat.t()).t().reshape(*x.shape[:-1], size_out)
