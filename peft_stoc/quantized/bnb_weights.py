"""bitsandbytes weights as StocTuning sees them: what kind each is, its dequantized values, the tensors that store it,
and the float layer a merge turns it into.

A 4-bit weight (`Params4bit`: NF4 or FP4, blockwise, optionally with double quantization) or an 8-bit one
(`Int8Params`, row-wise absmax) stays as it is: the adapter is a sparse float32 delta over its dequantized values,
added in the forward (`overlay`). Everything bitsandbytes-specific is here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import compat

# Weight classes of bitsandbytes, by name (bitsandbytes is imported only when such a weight exists).
KINDS = {"Params4bit": "bitsandbytes 4-bit", "Int8Params": "bitsandbytes 8-bit"}


def kind(param) -> str | None:
    """'bitsandbytes 4-bit' / 'bitsandbytes 8-bit' for a bitsandbytes weight, else None."""
    return KINDS.get(type(param).__name__)


def is_four_bit(module: nn.Module) -> bool:
    return type(module.weight).__name__ == "Params4bit"


def canonical_storage(module: nn.Module) -> bool | None:
    """Keep the weight in bitsandbytes' portable layout. On a CPU with AVX512-BF16, a 4-bit layer's first forward
    without gradients rewrites its storage into a CPU-only layout (and computes in bfloat16): the storage would
    change under the adapter. It is put back the way bitsandbytes' own `state_dict()` puts it back, and that
    rewrite is switched off for this layer. Returns the layer's setting before (None: it has none)."""
    if not is_four_bit(module):
        return None
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        warnings.warn(
            "A 4-bit layer ran a forward without gradients on the CPU before StocTuning was attached, and bitsandbytes "
            "rewrote it for CPU inference, rounding its scales to bfloat16: its values now differ slightly from the "
            "checkpoint's, and an adapter trained on it is refused on a freshly loaded base (its fingerprint differs). "
            "Attach StocTuning before running the quantized model.",
            stacklevel=6,
        )
        weight.data, weight.quant_state = compat.bnb_unpack_cpu_weight(weight.data, weight.quant_state)
    before = getattr(module, "support_avx512bf16_for_cpu", None)
    if before:
        module.support_avx512bf16_for_cpu = False
    return before


def hold_canonical(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """`canonical_storage` for every 4-bit layer of `model`, tuned or not: while StocTuning is attached no layer is
    rewritten for CPU inference, since an untuned layer rewritten by an evaluation or a reference pass would change
    the base's fingerprint, and its adapter would be refused on a freshly loaded base. Returns the layers whose
    rewrite was on, with that setting, for `release_canonical`."""
    layers = (m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    return [(m, before) for m in layers if (before := canonical_storage(m))]


def release_canonical(layers: list[tuple[nn.Module, object]]) -> None:
    """Give `layers` their setting of bitsandbytes' CPU inference rewrite back (StocTuning is detached)."""
    for module, before in layers:
        module.support_avx512bf16_for_cpu = before


def own_weights(model: nn.Module) -> None:
    """A 4-bit weight keeps a reference to its layer (`Params4bit.module`, which bitsandbytes updates when the weight
    moves), and its `__deepcopy__` copies the reference, not the layer: in a copied model each weight gets its own
    copied layer back, or moving the copy would change the original, and pickling it would take the original along."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit" and getattr(weight, "module", None) is not module:
            weight.module = module


def storage(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor that holds the weight's values: the packed codes and their scales (nested ones included)."""
    weight = module.weight
    tensors = [weight.data]
    if is_four_bit(module):
        state = weight.quant_state
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
    else:
        tensors.append(_row_scales(module))
    return [t for t in tensors if t is not None]


def _row_scales(module: nn.Module) -> torch.Tensor:
    """An 8-bit weight's row scales: on the weight until its first forward, then on the layer's state."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight's values (out_features x in_features) in float32, as bitsandbytes dequantizes them."""
    import bitsandbytes.functional as F

    weight = module.weight
    if is_four_bit(module):
        values = F.dequantize_4bit(weight.data, weight.quant_state)
    else:
        values = F.int8_vectorwise_dequant(weight.data, _row_scales(module))
    return values.reshape(module.out_features, module.in_features).float()


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype the layer computes in: a 4-bit layer's `compute_dtype`; an 8-bit layer computes in its input's."""
    return getattr(module, "compute_dtype", None) if is_four_bit(module) else None


def describe(module: nn.Module) -> dict:
    """The quantization of one weight, as an adapter's fingerprint records it."""
    weight = module.weight
    if is_four_bit(module):
        state = weight.quant_state
        dtype = compute_dtype(module)
        return {
            "format": str(state.quant_type),
            "block_size": int(state.blocksize),
            "double_quant": bool(state.nested),
            "compute_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        }
    return {"format": "int8", "threshold": float(getattr(module.state, "threshold", 0.0) or 0.0)}


def refuse_without_compute_dtype(module: nn.Module, name: str) -> None:
    """A 4-bit layer without a compute dtype computes in whatever its input is: its merged weights and its
    adapter's fingerprint would have no dtype to follow."""
    if is_four_bit(module) and compute_dtype(module) is None:
        raise ValueError(
            f"'{name}' is a 4-bit weight without a compute dtype. Load the base with "
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16) (or float16 / float32)."
        )


def dequantized_linear(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A plain `nn.Linear` computing with `weight` (float32, the dequantized weight with the delta added) in
    `dtype`, with the layer's bias."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return linear


def forget_quantization(model: nn.Module) -> None:
    """A model none of whose weights is quantized any more says so: transformers would otherwise save its
    quantization config and quantize the float weights again when the model is loaded."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
