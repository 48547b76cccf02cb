"""Which tokens count in an activation statistic (a part of `tracking.ActivationTracker`): the padding mask of the
token scope a value belongs to, laid out as the value's leading dimensions.

Which tokens are real comes from the padding mask of the *token scope* a module runs in: the model itself and every
sub-model that takes token inputs (an encoder, a decoder) with its own `attention_mask`. An encoder's output keeps
its encoder's mask wherever it is read (cross-attention inside a decoder). Whether a module's values are laid out
(batch, seq) or (seq, batch) is the model's own layout (`token_scopes.sequence_first_modules`), not a guess from a
shape, so a batch as long as it is wide takes its mask like any other; values laid out neither way count all rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .token_scopes import scope_arguments, sequence_first_modules

# Token layouts of a value's leading dimensions relative to the (batch, seq) mask.
BATCH_FIRST, SEQ_FIRST, UNALIGNED = "batch_first", "seq_first", "unaligned"


class TokenMasks:
    """The token scopes a forward is in and the padding masks they bring, and token weights from them."""

    def _init_token_masks(self, root: nn.Module) -> None:
        self._scopes: list[torch.Tensor | None] = []  # (batch, seq) masks of the token scopes entered (None: unknown)
        self._scope_outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # a scope output -> its mask
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}  # per-forward: mask -> weights
        self._sequence_first = sequence_first_modules(root)  # modules whose inputs the model lays out (seq, batch)
        self._layouts: dict[int, str] = {}  # modules whose inputs, unambiguously, did not have the model's layout
        self._scope_arguments = scope_arguments(root)

    def _scope_tensors(self, module, args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The padding mask and the token inputs a scope's forward receives (None where it has none)."""
        arguments = self._scope_arguments.get(module)
        if arguments is None:
            return None, None
        mask = arguments.find(arguments.mask, args, kwargs)
        tokens = next(
            (
                t
                for t in (arguments.find(name, args, kwargs) for name in arguments.tokens)
                if isinstance(t, torch.Tensor) and t.dim() >= 2
            ),
            None,
        )
        return (mask if isinstance(mask, torch.Tensor) else None), tokens

    def _enter_scope(self, module, mask, tokens):
        # Only a (batch, seq) padding mask says which tokens are real; other shapes (4-D masks) are left alone.
        if mask is not None:
            mask = mask.detach() if mask.dim() == 2 else None
        elif module in self._scope_arguments:
            # No mask: every token is real. Its shape still tells how often rows gathered once per position count.
            mask = None if tokens is None else torch.ones(tokens.shape[:2], device=tokens.device)
        self._scopes.append(mask)

    def _leave_scope(self, hidden):
        if not self._scopes:
            return
        mask = self._scopes.pop()
        if hidden is not None and hidden.dim() > 2 and (mask is None or hidden.shape[:2] == mask.shape):
            # An encoder's output read elsewhere (cross-attention keys and values) keeps the encoder's padding.
            self._scope_outputs[id(hidden)] = (hidden, mask)

    def _mask_for(self, values: torch.Tensor) -> torch.Tensor | None:
        known = self._scope_outputs.get(id(values))
        if known is not None and known[0] is values:
            return known[1]
        return self._scopes[-1] if self._scopes else None

    def _layout(self, module: nn.Module, shape: torch.Size, mask: torch.Tensor, broadcast: bool) -> str:
        """How `shape` (a value's token dimensions) lines up with `mask`: the layout the model gives `module`'s inputs.

        A shape that only fits the other layout (a model whose code is sequence-first where no declaration says so)
        teaches this module's layout for the batches where both fit."""
        batch, seq = mask.shape
        targets = {BATCH_FIRST: (batch, seq), SEQ_FIRST: (seq, batch)}
        model = SEQ_FIRST if id(module) in self._sequence_first else BATCH_FIRST
        expected = self._layouts.get(id(module), model)
        if _fits(shape, targets[expected], broadcast):
            return expected
        other = SEQ_FIRST if expected == BATCH_FIRST else BATCH_FIRST
        if _fits(shape, targets[other], broadcast):
            self._layouts[id(module)] = other
            return other
        return UNALIGNED

    def _token_weights(
        self, module: nn.Module, shape: torch.Size, mask: torch.Tensor | None, dtype, device, broadcast: bool = False
    ) -> tuple[torch.Tensor, float] | None:
        """Weights (1 real, 0 padding) for tokens laid out as `shape` and their sum, or None to count every token.

        The weights have the mask's layout, (batch, seq) or (seq, batch), for `shape` to be expanded to."""
        if mask is None:
            return None
        layout = self._layout(module, shape, mask, broadcast)
        if layout == UNALIGNED:
            return None
        key = (id(mask), layout, dtype, device)
        found = self._weights.get(key)
        if found is None or found[0] is not mask:  # once per mask and layout in a forward: the sum synchronises
            weights = (mask if layout == BATCH_FIRST else mask.t()).to(device=device, dtype=dtype)
            found = self._weights[key] = (mask, weights, float(weights.sum()))
        return found[1:]


def _fits(shape: torch.Size, target: tuple[int, int], broadcast: bool) -> bool:
    """`shape` is `target`, or (with `broadcast`) expands to it along dimensions of size 1 or missing ones."""
    if not broadcast:
        return tuple(shape) == target
    if len(shape) > 2:
        return False
    padded = (1,) * (2 - len(shape)) + tuple(shape)
    return all(have in (1, want) for have, want in zip(padded, target)) and len(shape) > 0
