"""Which base entries may be drawn, and through which modules each of them receives its input.

A parameter is a *candidate* when a matched module owns it directly. Its *uses* are every module that owns it (a
tied embedding is owned by the input embedding and the output head), each telling the tracker what value flows
through the parameter's connections.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quantized import bnb_weights as quantized

logger = logging.getLogger(__name__)

# k="bitfit" on a model without biases: the share of entries BitFit trains in the paper's RoBERTa-base (102,912 bias
# entries of 124.6M, 0.083%), so the default draws about as many entries per step on any model.
BITFIT_SHARE = 0.0008
_announced: set[int] = set()  # candidate counts whose fallback k was logged (once per process)

# PEFT wraps these heads in `ModulesToSaveWrapper` for the task types below; they are trained fully, not drawn from.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


class UseKind(Enum):
    """What value flows through a parameter's connections, and along which weight dimension it varies."""

    LINEAR_INPUT = "linear_input"  # nn.Linear (out x in): the input feature, along dim 1
    CONV1D_INPUT = "conv1d_input"  # transformers Conv1D (in x out): the input feature, along dim 0
    EMBEDDING_ROW = "embedding_row"  # nn.Embedding (vocab x dim): the one-hot token, along dim 0
    NORM_GAIN = "norm_gain"  # LayerNorm / RMSNorm gain: the normalised input, along dim 0
    CONSTANT = "constant"  # biases: the connection starts from a constant 1


@dataclass(eq=False)
class Use:
    """One module through which a candidate parameter takes part in the forward pass."""

    module: nn.Module
    kind: UseKind
    module_name: str = ""
    traced: bool = True  # False: a module type whose inputs are not followed (its parameters get μ = 1)

    @property
    def dim(self) -> int:
        return 1 if self.kind is UseKind.LINEAR_INPUT else 0


@dataclass(eq=False)
class Candidate:
    """A base parameter whose entries may be drawn."""

    name: str
    param: nn.Parameter
    uses: list[Use] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def is_bias(self) -> bool:
        return self.name == "bias" or self.name.endswith(".bias")

    @property
    def overlay(self):
        """The `overlay.Overlay` holding this quantized weight's changed entries (`param` is its handle); None for
        a float weight."""
        return getattr(self.param, "stoc_overlay", None)


def is_rms_norm(module: nn.Module) -> bool:
    """RMSNorm modules of torch and transformers (LlamaRMSNorm, ...): no mean subtraction, a gain and an eps.

    T5's family names its RMS norm `T5LayerNorm`: a "LayerNorm" with a `variance_epsilon` and no bias is one."""
    if isinstance(module, getattr(nn, "RMSNorm", ())) or type(module).__name__.endswith("RMSNorm"):
        return True
    name = type(module).__name__
    return (
        name.endswith("LayerNorm")
        and not isinstance(module, nn.LayerNorm)
        and hasattr(module, "variance_epsilon")
        and getattr(module, "bias", None) is None
    )


def use_kind(module: nn.Module, param_name: str) -> UseKind | None:
    """How `module.<param_name>` receives its input; None when the module type is not traced."""
    if param_name == "bias":
        return UseKind.CONSTANT
    if param_name != "weight":
        return None
    if isinstance(module, nn.Linear):
        return UseKind.LINEAR_INPUT
    if isinstance(module, Conv1D):
        return UseKind.CONV1D_INPUT
    if isinstance(module, nn.Embedding):
        return UseKind.EMBEDDING_ROW
    if isinstance(module, nn.LayerNorm) or is_rms_norm(module):
        return UseKind.NORM_GAIN
    return None


def _matches(patterns: list[str] | str | None, name: str) -> bool:
    """PEFT's rule: a str is a regex over the whole name, a list entry equals the name or is its dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _trained_fully(model: nn.Module, config) -> list[str]:
    """Names of modules whose parameters are trained whole (modules_to_save and PEFT's task heads)."""
    names = list(config.modules_to_save or [])
    names += TASK_HEADS.get(str(getattr(config.task_type, "value", config.task_type)), [])
    found = []
    for module_name, module in model.named_modules():
        # PEFT's own test for modules_to_save is a plain suffix match; mirror it so both agree on the head.
        wrapped = isinstance(module, AuxiliaryTrainingWrapper)
        if wrapped or (module_name and any(module_name.endswith(n) for n in names)):
            found.append(module_name)
    return found


# Quantizers of transformers (`quantization_config.quant_method`) StocTuning works with: bitsandbytes through overlays,
# GGUF because transformers dequantizes its weights on loading (they are plain float tensors).
_SUPPORTED_QUANTIZERS = ("bitsandbytes", "gguf")


@dataclass(frozen=True)
class LeftOut:
    """A weight of a matched module that cannot be a candidate, and why."""

    name: str
    module_type: str
    reason: str
    entries: int


def why_not_a_candidate(param: nn.Parameter) -> str | None:
    """Why `param` cannot be drawn from as it is (None when it can): quantized or non-float storage. bitsandbytes
    weights are drawn from through an overlay (`find_candidates`' `overlay_for`)."""
    kind = quantized.kind(param)
    if kind is not None:
        return f"{kind} weights"
    data_type = type(param.data)
    if data_type is not torch.Tensor and data_type.__name__ != "DTensor":
        return f"a quantized tensor ({data_type.__name__})"
    if not param.is_floating_point():
        return f"{param.dtype} entries, not floating point"
    return None


def refuse_unsupported_quantization(model: nn.Module) -> None:
    """Models quantized by a method other than bitsandbytes are refused before anything is attached."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    method = str(getattr(method, "value", method))
    if method not in _SUPPORTED_QUANTIZERS:
        raise ValueError(
            f"StocTuning cannot tune a model quantized with {method!r}: its weights are stored in a form that "
            "can neither be drawn from nor hold a sparse delta. Load the base without quantization (e.g. "
            "torch_dtype=torch.bfloat16), or use a method built for quantized bases (LoRA)."
        )


def _entries(module: nn.Module, param_name: str, param: nn.Parameter) -> int:
    """Entries of a weight as the layer computes with it (a packed quantized weight holds several per element)."""
    if param_name == "weight" and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features) * int(module.out_features)
    return param.numel()


def find_candidates(
    model: nn.Module, config, left_out: list[LeftOut] | None = None, overlay_for=None
) -> list[Candidate]:
    """The candidate parameters of `model` under `config`, in `named_parameters()` order. Weights of matched modules
    that cannot be candidates (`why_not_a_candidate`) are appended to `left_out` when given.

    `overlay_for(name, module)`: the overlay through which a bitsandbytes weight is drawn from (its handle is the
    candidate); without it such weights are left out.

    Raises `ValueError` when `target_modules` / `exclude_modules` leave no candidate.
    """
    owners, selected = _owners_and_targets(model, config)
    candidates, skipped = [], []
    for name, param in model.named_parameters():
        if id(param) not in selected or getattr(param, "stoc_overlay", None) is not None:
            continue  # (an overlay's handle stands for its quantized weight, found as that weight)
        reason = why_not_a_candidate(param)
        module_name, module, param_name = owners[id(param)][0]
        if reason is not None and quantized.kind(param) and overlay_for is not None and param_name == "weight":
            overlay = overlay_for(name, module)
            candidates.append(Candidate(name, overlay.handle, [Use(module, UseKind.LINEAR_INPUT, module_name)]))
            selected.discard(id(param))
            continue
        if reason is not None:
            skipped.append(LeftOut(name, type(module).__name__, reason, _entries(module, param_name, param)))
            selected.discard(id(param))
            continue
        uses = []
        for module_name, module, param_name in owners[id(param)]:
            kind = use_kind(module, param_name)
            # Untraced module types count as a constant input; the tracker warns about them once per model.
            uses.append(Use(module, kind or UseKind.CONSTANT, module_name, traced=kind is not None))
        candidates.append(Candidate(name, param, uses))
        selected.discard(id(param))

    if left_out is not None:
        left_out.extend(skipped)
    _refuse_none(config, candidates, skipped)
    return candidates


def _owners_and_targets(model: nn.Module, config) -> tuple[dict[int, list[tuple[str, nn.Module, str]]], set[int]]:
    """Every parameter's owners (module name, module, parameter name) by id, outside the fully trained heads, and
    the ids of those owned by a module `target_modules` / `exclude_modules` select."""
    excluded_prefixes = tuple(name + "." for name in _trained_fully(model, config))
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    selected: set[int] = set()
    for module_name, module in model.named_modules():
        if module_name.startswith(excluded_prefixes) or (module_name + ".").startswith(excluded_prefixes):
            continue
        targeted = config.target_modules is None or _matches(config.target_modules, module_name)
        targeted = targeted and not _matches(config.exclude_modules, module_name)
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module, param_name))
            if targeted:
                selected.add(id(param))
    return owners, selected


def _refuse_none(config, candidates: list[Candidate], skipped: list[LeftOut]) -> None:
    """Raise when `config` selects no candidate: naming the weights it matched that cannot be candidates, if any."""
    if not candidates and skipped:
        raise ValueError(
            f"target_modules={config.target_modules!r} and exclude_modules={config.exclude_modules!r} match only "
            f"weights StocTuning cannot draw from: {describe_left_out(skipped)}. Target float weights, or load the "
            "base without quantization (e.g. torch_dtype=torch.bfloat16)."
        )
    if not candidates:
        raise ValueError(
            f"No candidate parameters: target_modules={config.target_modules!r} and "
            f"exclude_modules={config.exclude_modules!r} match no module that owns parameters outside "
            f"modules_to_save. Check the module names with `model.named_modules()`."
        )


def describe_left_out(left_out: list[LeftOut], shown: int = 4) -> str:
    """'name (Module: reason), ... and N more' for a warning or an error."""
    text = ", ".join(f"'{item.name}' ({item.module_type}: {item.reason})" for item in left_out[:shown])
    return text + (f" and {len(left_out) - shown} more" if len(left_out) > shown else "")


def bitfit_count(candidates: list[Candidate]) -> tuple[int, bool]:
    """k="bitfit": the number of bias entries among the candidates (the paper's setting) and True; on a model
    without biases (Llama, Mistral, Qwen2, T5), `BITFIT_SHARE` of the candidate entries and False."""
    biases = sum(c.numel for c in candidates if c.is_bias)
    if biases:
        return biases, True
    total = sum(c.numel for c in candidates)
    return max(1, round(BITFIT_SHARE * total)), False


def _suggestion(total: int) -> str:
    """A value of k that fits a model with `total` candidate entries."""
    share = max(1, round(BITFIT_SHARE * total))
    return f"k={share} ({BITFIT_SHARE:.2%} of the {total:,} candidate entries)"


def resolve_count(value, candidates: list[Candidate], name: str) -> int:
    """Turn `k` / `max_changed` (int, fraction or 'bitfit') into a number of entries, validated against the model."""
    total = sum(c.numel for c in candidates)
    if value == "bitfit":
        count, has_biases = bitfit_count(candidates)
        if not has_biases and total not in _announced:
            _announced.add(total)
            logger.warning(
                "k='bitfit': this model has no bias parameters among its candidates, so k is %s entries per step, "
                "the share of entries BitFit trains in the paper's RoBERTa-base (%.2f%% of %s candidate entries). "
                "Pass an int or a fraction as k to choose another count.",
                f"{count:,}",
                100 * BITFIT_SHARE,
                f"{total:,}",
            )
    elif isinstance(value, float):
        count = max(1, int(round(value * total)))
    else:
        count = int(value)
    if name == "k" and count >= total:
        raise ValueError(
            f"k={value!r} resolves to {count} entries, but the model has only {total} candidate entries; "
            f"k must be smaller (use full fine-tuning to update everything), for instance {_suggestion(total)} "
            "or k=0.01."
        )
    return count
