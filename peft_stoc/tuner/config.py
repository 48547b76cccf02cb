"""`StocTuningConfig`: the one line a user changes to switch from LoRA to Stochastic Tuning."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..integration.peft_type import STOC_PEFT_TYPE

SELECTIONS = ("stochastic", "top", "random")
ACTIVATION_STATS = ("mean", "abs_mean", "rms")
UPDATE_RULES = ("masked_grad", "strict", "lazy")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
MEMORY_MODES = ("auto", "lean", "dense")


# What an error about `k` suggests: the default, and the fraction it comes to on a model without biases.
K_SUGGESTION = "for instance k='bitfit' (the default: the paper's count) or k=0.0008 (0.08% of the candidate entries)"


def _check_count_or_fraction(name: str, value) -> None:
    """`value` must be a positive int or a float fraction in (0, 1)."""
    hint = f"; {K_SUGGESTION}" if name == "k" else ""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an int or a float in (0, 1), got the bool {value!r}{hint}.")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"`{name}` must be a positive number of entries, got {value}{hint}.")
    elif isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"A float `{name}` is a fraction of the candidate entries and must lie in (0, 1), got {value}. "
                f"Pass an int for an absolute count{hint}."
            )
    else:
        raise ValueError(f"`{name}` must be an int or a float in (0, 1), got {type(value).__name__} {value!r}{hint}.")


# Called by every config made (`registry.activate`, set when the package registers itself): what StocTuning models
# need in torch and transformers is installed once a StocTuning config exists, not at import.
on_made: Callable[[], None] | None = None


@dataclass
class StocTuningConfig(PeftConfig):
    """Configuration of a [`StocTuningModel`].

    At every optimizer step, Stochastic Tuning draws `k` entries of the whole model with probability proportional
    to |activation * weight * gradient|^2 and updates only those. The base model trains in place; the adapter that
    is saved holds only the entries that changed.

    The paper's setting is `k="bitfit"`, `selection="stochastic"`, `activation_stat="mean"`, `mask_interval=1`,
    `update_rule="masked_grad"`, with the task head in `modules_to_save` (the default for `SEQ_CLS`).

    Args:
        k (`int`, `float` or `"bitfit"`): entries drawn per optimizer step; a float is a fraction of the candidate
            entries, `"bitfit"` the number of bias entries among them (on a model without biases, 0.08% of the
            candidate entries: BitFit's share in the paper's RoBERTa-base, logged once).
        selection (`str`): `"stochastic"` (the paper), `"top"` or `"random"`.
        seed (`int`): seed of the draws; the same seed and data give the same masks.
        target_modules, exclude_modules (`list[str]` or `str`): modules whose parameters are (not) candidates;
            None targets every module.
        modules_to_save (`list[str]`): modules trained fully and saved whole (a new task head).
        activation_stat (`str`): how a connection's input is summarised over a step's tokens.
        mask_interval (`int`): draw a new mask every N optimizer steps.
        update_rule (`str`): `"masked_grad"` (the paper), `"strict"` or `"lazy"`.
        max_changed (`int` or `float`): budget of distinct changed entries.
        save_dtype (`str`): dtype of the delta values in the adapter file.
        memory (`str`): `"auto"` (default), `"lean"` or `"dense"`.
        base_fingerprint, saved_counts (`dict`): written on save, checked on load.

    Example:

        ```py
        >>> from peft import get_peft_model
        >>> from transformers import AutoModelForSequenceClassification
        >>> from peft_stoc import StocTuningConfig

        >>> base = AutoModelForSequenceClassification.from_pretrained("roberta-base", num_labels=2)
        >>> model = get_peft_model(base, StocTuningConfig(k="bitfit", task_type="SEQ_CLS"))
        >>> model.print_trainable_parameters()
        ```
    """

    k: int | float | str = field(
        default="bitfit",
        metadata={
            "help": (
                "Entries drawn per optimizer step: an int count, a float in (0, 1) as a fraction of all candidate "
                "entries, or 'bitfit' for the number of bias entries among the candidates (the paper's setting; on a "
                "model without biases, 0.08% of the candidate entries, BitFit's share in RoBERTa-base)."
            )
        },
    )
    selection: Literal["stochastic", "top", "random"] = field(
        default="stochastic",
        metadata={
            "help": (
                "'stochastic': draw without replacement with probability proportional to importance squared (paper). "
                "'top': the k most important entries. 'random': k entries uniformly at random."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the draws. Same seed, same data -> same masks."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Modules whose own parameters are candidates. None means every module of the base model. A list "
                "matches a module whose name equals an entry or ends with '.' + entry; a str is a regex that must "
                "match the whole module name."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules whose parameters are never candidates; same matching rules as `target_modules`."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules trained fully and saved whole, e.g. a new classification head. PEFT adds the task head "
                "for SEQ_CLS and TOKEN_CLS. Their parameters are not candidates."
            )
        },
    )
    activation_stat: Literal["mean", "abs_mean", "rms"] = field(
        default="mean",
        metadata={
            "help": (
                "How the value flowing through a connection is summarised over the tokens of a step: 'mean' (paper), "
                "'abs_mean' or 'rms'."
            )
        },
    )
    mask_interval: int = field(
        default=1,
        metadata={"help": "Draw a new mask every N optimizer steps and reuse it in between (1 = the paper)."},
    )
    update_rule: Literal["masked_grad", "strict", "lazy"] = field(
        default="masked_grad",
        metadata={
            "help": (
                "'masked_grad' (paper): gradients outside the draw are zeroed and the optimizer runs as is, so "
                "momentum keeps moving entries drawn earlier; weight decay only touches drawn entries. 'strict': "
                "only the entries drawn at this step change. 'lazy': only the drawn entries change and only their "
                "optimizer state advances (moments, and a per-entry step count for Adam's bias correction), as "
                "torch.optim.SparseAdam does; needs the memory-lean mode (not memory='dense')."
            )
        },
    )
    max_changed: int | float | None = field(
        default=None,
        metadata={
            "help": (
                "Budget of distinct changed entries (int, or float fraction of candidates). Once reached, later draws "
                "come only from entries that already changed. None means no budget."
            )
        },
    )
    save_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the delta values written to the adapter file."}
    )
    memory: Literal["auto", "lean", "dense"] = field(
        default="auto",
        metadata={
            "help": (
                "'lean': candidate gradients are consumed during the backward and StocTuning applies the optimizer's "
                "update to the entries that need it (state ∝ changed entries, float32 masters for bf16/fp16 "
                "weights): peak memory close to LoRA's. Reproduces torch.optim SGD, Adam and AdamW; raises for "
                "other optimizers. 'dense': dense gradients and the optimizer's own dense state, like full "
                "fine-tuning. 'auto' (default): lean, falling back to dense with one warning for other optimizers."
            )
        },
    )

    base_fingerprint: dict | None = field(
        default=None,
        metadata={
            "help": (
                "Written when the adapter is saved: names, shapes and dtypes of the base model's parameters and a "
                "checksum of sampled values. Loading refuses a base whose fingerprint differs."
            )
        },
    )
    saved_counts: dict | None = field(
        default=None,
        metadata={
            "help": (
                "Written when the adapter is saved: entries changed, tensors changed, candidate entries, k and "
                "optimizer steps taken (training resumed from the adapter continues its draws from there)."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = STOC_PEFT_TYPE
        if on_made is not None:
            on_made()
        if isinstance(self.k, str):
            if self.k != "bitfit":
                raise ValueError(f"`k` as a string must be 'bitfit', got {self.k!r}; {K_SUGGESTION}.")
        else:
            _check_count_or_fraction("k", self.k)
        if self.max_changed is not None:
            _check_count_or_fraction("max_changed", self.max_changed)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("activation_stat", self.activation_stat, ACTIVATION_STATS)
        _check_choice("update_rule", self.update_rule, UPDATE_RULES)
        _check_choice("save_dtype", self.save_dtype, SAVE_DTYPES)
        _check_choice("memory", self.memory, MEMORY_MODES)
        for name in ("base_fingerprint", "saved_counts"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(
                    f"`{name}` is written by save_pretrained and must be a dict or None, got "
                    f"{type(getattr(self, name)).__name__}: adapter_config.json was edited or damaged."
                )
        if self.update_rule == "lazy" and self.memory == "dense":
            raise ValueError("update_rule='lazy' is applied by the memory-lean mode; use memory='auto' or 'lean'.")
        if isinstance(self.mask_interval, bool) or not isinstance(self.mask_interval, int) or self.mask_interval < 1:
            raise ValueError(f"`mask_interval` must be an int >= 1, got {self.mask_interval!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (list, str)):
                raise ValueError(f"`{name}` must be None, a list of module names or a regex string, got {value!r}.")
            _check_module_patterns(name, getattr(self, name))
        if isinstance(self.modules_to_save, str):  # list("classifier") would be its letters
            raise ValueError(
                f"`modules_to_save` must be a list of module names, got the string {self.modules_to_save!r}; "
                f"write modules_to_save=[{self.modules_to_save!r}]."
            )
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            self.modules_to_save = list(self.modules_to_save)


def _check_module_patterns(name: str, value) -> None:
    """A str must compile as a regex and a list must hold names; a bad pattern would fail only at matching time."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"`{name}` is not a valid regular expression ({error}): {value!r}.") from None
    elif isinstance(value, list) and not all(isinstance(entry, str) for entry in value):
        raise ValueError(f"`{name}` must list module names as strings, got {value!r}.")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown `{name}` {value!r}; choose one of {', '.join(repr(c) for c in choices)}.")


def _as_regex(targets: list[str] | str) -> str:
    """A regex over whole module names that matches what `targets` matches."""
    if isinstance(targets, str):
        return targets
    return "|".join(rf"(?:.*\.)?{re.escape(name)}" for name in targets)


def union_of_targets(configs: list[StocTuningConfig]) -> list[str] | str | None:
    """`target_modules` matching every module that any of `configs` targets (None: all modules)."""
    targets = [c.target_modules for c in configs]
    if any(t is None for t in targets):
        return None
    if all(isinstance(t, list) for t in targets):
        return sorted({name for t in targets for name in t})
    return "|".join(f"(?:{_as_regex(t)})" for t in targets)


def union_of_excludes(configs: list[StocTuningConfig]) -> list[str] | str | None:
    """`exclude_modules` that excludes only what every one of `configs` excludes."""
    excludes = [c.exclude_modules for c in configs]
    if any(e is None for e in excludes) or len({str(e) for e in excludes}) > 1:
        return None  # excluded by some adapter but possibly changed by another
    return excludes[0]
