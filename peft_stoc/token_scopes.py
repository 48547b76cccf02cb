"""Token scopes: the model itself and every sub-model that takes token inputs (an encoder, a decoder) with its own
`attention_mask`, and where each one's forward receives its mask and its token inputs.
"""

from __future__ import annotations

import inspect

from torch import nn

# Arguments that make a module a token scope: it takes model inputs, and its `attention_mask` describes them.
TOKEN_INPUTS = ("input_ids", "inputs_embeds", "input_features", "input_values", "pixel_values")


def _forward_parameters(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


class ScopeArguments:
    """Where a token scope's forward receives its padding mask and its token inputs."""

    def __init__(self, parameters: list[str], mask: str | None, tokens: tuple[str, ...]):
        self.positions = {name: i for i, name in enumerate(parameters)}
        self.mask = mask
        self.tokens = tokens

    def find(self, name: str | None, args: tuple, kwargs: dict):
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name)
        return args[position] if position is not None and position < len(args) else None


def scope_arguments(root: nn.Module) -> dict[nn.Module, ScopeArguments]:
    """The token scopes of `root` (itself included), with where each receives its mask and token inputs.

    An encoder-decoder wrapper's own computations (the LM head) run on decoder tokens: its mask is the decoder's."""
    scopes: dict[nn.Module, ScopeArguments] = {}
    for module in root.modules():
        params = _forward_parameters(module)
        if "decoder_input_ids" in params or "decoder_attention_mask" in params:
            scopes[module] = ScopeArguments(
                params, "decoder_attention_mask", ("decoder_input_ids", "decoder_inputs_embeds")
            )
        elif "attention_mask" in params and any(arg in params for arg in TOKEN_INPUTS):
            scopes[module] = ScopeArguments(params, "attention_mask", ("input_ids", "inputs_embeds"))
        elif module is root:
            scopes[module] = ScopeArguments(params, None, ("input_ids", "inputs_embeds"))
    return scopes
