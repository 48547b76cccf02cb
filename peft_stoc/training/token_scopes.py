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


# The layout of activations is the model's own: every module of a Hugging Face model reads its inputs batch-first,
# (batch, seq, ...), except inside these classes, whose code lays them out sequence-first, (seq, batch, ...). XLNet's
# model transposes its inputs on entry and its output back on return (its heads read batch-first values again); FSMT's
# layers and the local self-attention of Longformer and LED work on transposed hidden states.
SEQUENCE_FIRST_INSIDE = frozenset(
    {
        "transformers.models.xlnet.modeling_xlnet.XLNetModel",
        "transformers.models.fsmt.modeling_fsmt.EncoderLayer",
        "transformers.models.fsmt.modeling_fsmt.DecoderLayer",
        "transformers.models.longformer.modeling_longformer.LongformerSelfAttention",
        "transformers.models.led.modeling_led.LEDEncoderSelfAttention",
    }
)


def _sequence_first_class(module: nn.Module) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in SEQUENCE_FIRST_INSIDE for cls in type(module).__mro__)


def sequence_first_modules(root: nn.Module) -> set[int]:
    """Ids of the modules of `root` whose inputs are laid out (seq, batch, ...) by the model's code."""
    found: set[int] = set()
    for module in root.modules():
        if _sequence_first_class(module):
            found.update(id(inner) for inner in module.modules() if inner is not module)
    return found


def fused_head(root: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output embedding) of a model whose forward may project the backbone's output through the output
    embedding's weight itself, without calling that module (TRL's fused LM head: `fused_lm_head=True`)."""
    get_head = getattr(root, "get_output_embeddings", None)
    try:
        head = get_head() if callable(get_head) else None
    except (AttributeError, NotImplementedError):
        head = None
    backbone = getattr(root, "base_model", None)
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module) or backbone is root:
        return None
    return backbone, head
