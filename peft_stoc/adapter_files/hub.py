"""Model card and Hub upload for StocTuning adapters."""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..integration.tasks import auto_class_name
from . import adapter_file
from .safetensors_header import read_header

TAGS = ("peft", "peft-stoc", "stochastic-tuning", "sparse-delta")
SECTION_START = "<!-- peft-stoc:start -->"
SECTION_END = "<!-- peft-stoc:end -->"


def human_bytes(size: float) -> str:
    """`1536` -> `'1.5 KB'`."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def count_text(value) -> str:
    """A count with thousands separators, '?' where a file holds none."""
    return f"{value:,}" if isinstance(value, int) else "?"


def adapter_folder(save_directory: str, name: str) -> str:
    """Where PEFT's `save_pretrained` puts adapter `name`: the folder itself for 'default', a subfolder otherwise."""
    return save_directory if name == "default" else os.path.join(save_directory, name)


def _adapter_rows(save_directory: str, configs: dict) -> list[str]:
    rows = []
    for name, config in configs.items():
        path = os.path.join(adapter_folder(save_directory, name), adapter_file.WEIGHTS_NAME)
        # Files this process just wrote: their header is trusted, and no tensor is needed.
        counts = adapter_file.read_metadata(path, require_format=False, limits=None).counts
        changed, candidates = counts.get("changed"), counts.get("candidates")
        density = f"{changed / candidates:.4%}" if isinstance(changed, int) and candidates else "?"
        rows.append(
            f"| {name} | {count_text(counts.get('k'))} (`k={config.k!r}`) | {config.selection} | "
            f"{count_text(changed)} of {count_text(candidates)} ({density}) | {human_bytes(os.path.getsize(path))} |"
        )
    return rows


def head_size(entries: dict[str, dict]) -> int | None:
    """The output size of an adapter's trained head (a classifier's number of labels), read from its file's tensors:
    the last layer of the modules_to_save weights, the one whose output no other head weight takes as input."""
    weights = {
        key: entry["shape"]
        for key, entry in entries.items()
        if not adapter_file.is_delta_key(key) and key.endswith(".weight") and len(entry.get("shape", [])) == 2
    }
    if not weights:
        return None
    finals = [
        key
        for key, shape in weights.items()
        if not any(other[1] == shape[0] for name, other in weights.items() if name != key)
    ]
    return weights[sorted(finals or weights)[-1]][0]


def _usage(config, repo_or_path: str, architectures: list[str] | None = None, labels: int | None = None) -> str:
    base = config.base_model_name_or_path or "<base model>"
    auto = auto_class_name(config.task_type, architectures)
    # A classifier's head is new to the base: it must be built with the adapter's number of labels to load (2 is what
    # transformers builds for a base whose config names no labels).
    extra = f", num_labels={labels}" if labels not in (None, 2) and "Classification" in auto else ""
    return (
        "```python\n"
        "import peft_stoc  # registers StocTuning with PEFT: needed before loading\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("{base}"{extra})\n'
        f'model = PeftModel.from_pretrained(base, "{repo_or_path}")\n'
        "merged = model.merge_and_unload()  # optional: a plain transformers model with the deltas in it\n"
        "```\n"
    )


def _labels(save_directory: str, name: str) -> int | None:
    path = os.path.join(adapter_folder(save_directory, name), adapter_file.WEIGHTS_NAME)
    entries, _ = read_header(path, limits=None)  # a file this process just wrote
    return head_size(entries)


def write_model_card(
    save_directory: str,
    configs: dict,
    repo_id: str | None = None,
    extra_tags: list[str] | None = None,
    load_from: str | None = None,
    architectures: list[str] | None = None,
) -> None:
    """Add StocTuning's metadata and section to the README.md in `save_directory` (idempotent).

    `configs` maps the saved adapters' names to their configs; the first one is the usage example's, which loads
    from `repo_id`, else `load_from` (where a staged folder will end up), else `save_directory`.
    """
    first = next(iter(configs.values()))
    path = os.path.join(save_directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    _set_card_data(card, first.base_model_name_or_path, extra_tags)
    rows = _adapter_rows(save_directory, configs)
    usage = _usage(
        first, repo_id or load_from or save_directory, architectures, _labels(save_directory, next(iter(configs)))
    )
    section = _section(rows, usage)
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    else:
        text = section + "\n\n" + text
    card.text = text
    card.save(path)


def _set_card_data(card: ModelCard, base: str | None, extra_tags: list[str] | None) -> None:
    """The card's metadata: library, tags (PEFT's, StocTuning's and `extra_tags`) and the base model."""
    card.data["library_name"] = "peft"
    # PEFT tags "base_model:adapter:<name>"; a model built from a config has no name, and an empty tag helps nobody.
    tags = [t for t in card.data.get("tags") or [] if not t.endswith(":")]
    for tag in (*TAGS, *(extra_tags or [])):
        if tag not in tags:
            tags.append(tag)
    card.data["tags"] = tags
    if base:
        card.data["base_model"] = base
    elif not card.data.get("base_model"):
        card.data.pop("base_model", None)


def _section(rows: list[str], usage: str) -> str:
    """StocTuning's section of the card: what the adapter is, a table of the saved adapters and how to load them."""
    return "\n".join(
        [
            SECTION_START,
            "## StocTuning adapter",
            "",
            "A sparse-delta adapter trained with [peft-stoc](https://pypi.org/project/peft-stoc/) (Stochastic Tuning, "
            "Akbar-Tajari & Pilehvar): at every optimizer step, k entries of the whole model were drawn with "
            "probability ∝ |activation · weight · gradient|² and only those were updated. The file stores the changed "
            "entries only "
            "(indices and deltas, safetensors).",
            "",
            "| adapter | k per step | selection | changed entries | adapter size |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "### Usage",
            "",
            "Install [peft-stoc](https://pypi.org/project/peft-stoc/) (`pip install peft-stoc`; from a clone of its "
            "repository, `pip install .`), then:",
            "",
            usage,
            SECTION_END,
        ]
    )


def push_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs,
):
    """Upload the adapter(s) with their model card to `repo_id`; returns the commit info."""
    api = HfApi(token=token if isinstance(token, str) else None)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, **save_kwargs)
        names = save_kwargs.get("selected_adapters") or list(peft_model.peft_config)
        configs = {name: peft_model.peft_config[name] for name in names}
        model_config = getattr(getattr(peft_model, "base_model", None), "model", None)
        architectures = getattr(getattr(model_config, "config", None), "architectures", None)
        write_model_card(folder, configs, repo_id=repo_id, extra_tags=tags, architectures=architectures)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload StocTuning adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
