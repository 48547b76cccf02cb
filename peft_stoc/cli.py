"""`peft-stoc`: inspect, merge and compose StocTuning adapters from the command line.

Every problem with the input ends the command with exit status 2 and one line naming it, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from .adapter_files import adapter_file, atomic_folder, validation
from .adapter_files.hub import count_text, human_bytes, write_model_card
from .integration.tasks import auto_class_name
from .tuner.config import StocTuningConfig, union_of_excludes, union_of_targets
from .tuner.delta import SparseDelta

CONFIG_NAME = "adapter_config.json"


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _read_config(directory: str) -> dict:
    atomic_folder.recover_for_reading(directory)  # what an interrupted save left is finished or undone
    if not os.path.isdir(directory):
        problem = "is a file, not a folder" if os.path.exists(directory) else "does not exist"
        raise CliError(f"{directory} {problem}: give an adapter folder.")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CliError(f"{directory} is not an adapter folder: {CONFIG_NAME} is missing.")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise CliError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise CliError(f"{path} must hold a JSON object, not a JSON {type(config).__name__}.")
    if config.get("peft_type") != "STOC":
        raise CliError(f"{directory} holds a {config.get('peft_type')} adapter, not a StocTuning (STOC) one.")
    return config


def _read_adapter(directory: str) -> tuple[dict, adapter_file.AdapterFile]:
    """The adapter's config and file, validated as loading validates them (`validation.validate`) as far as that
    is possible without the base model: what this accepts, loading onto its base accepts too."""
    config = _read_config(directory)
    stoc = _stoc_config(directory, config)
    return config, validation.validate(os.path.join(directory, adapter_file.WEIGHTS_NAME), stoc)


def _stoc_config(directory: str, config: dict) -> StocTuningConfig:
    heads = config.get("modules_to_save")
    if heads is not None and not isinstance(heads, list):
        raise CliError(
            f"{os.path.join(directory, CONFIG_NAME)}: `modules_to_save` must be a list of module names, got {heads!r}."
        )
    try:
        return StocTuningConfig.from_peft_type(**config)
    except (TypeError, ValueError) as error:
        raise CliError(f"{os.path.join(directory, CONFIG_NAME)}: {error}") from None


def _heads(file: adapter_file.AdapterFile) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in file.tensors.items() if not adapter_file.is_delta_key(k)}


def inspect_adapter(directory: str) -> dict:
    """Everything `inspect` reports, as a dict."""
    config, file = _read_adapter(directory)
    delta = file.delta()
    numels = file.numels()
    head = {k: list(v.shape) for k, v in file.tensors.items() if not adapter_file.is_delta_key(k)}
    counts = file.counts
    candidates = counts.get("candidates")
    return {
        "path": os.path.abspath(directory),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "k": config.get("k"),
        "k_entries": counts.get("k"),
        "selection": config.get("selection"),
        "changed": delta.num_changed,
        "candidates": candidates,
        "density": delta.num_changed / candidates if candidates else None,
        "file_bytes": os.path.getsize(file.path),
        "tensors": {
            name: {
                "changed": int(index.numel()),
                "numel": numels[name],
                "density": index.numel() / numels[name] if numels[name] else 0.0,
            }
            for name, (index, _) in delta.tensors.items()
        },
        "modules_to_save": head,
        "fingerprint": file.fingerprint,
        "format": file.metadata.get(adapter_file.META_FORMAT),
    }


def _print_inspection(report: dict) -> None:
    density = f"{report['density']:.4%}" if report["density"] is not None else "?"
    print(f"adapter      {report['path']}")
    print(f"base model   {report['base_model']}")
    print(f"task         {report['task_type']}")
    print(
        f"k            {report['k']!r} -> {count_text(report['k_entries'])} entries per step, "
        f"selection={report['selection']}"
    )
    print(f"changed      {report['changed']:,} of {count_text(report['candidates'])} candidate entries ({density})")
    print(f"file         {human_bytes(report['file_bytes'])} (format {report['format']})")
    fp = report["fingerprint"] or {}
    print(
        f"fingerprint  structure {str(fp.get('structure'))[:16]}…, values {str(fp.get('checksum'))[:16]}…, "
        f"{fp.get('num_tensors')} tensors, dtypes {fp.get('dtypes')}"
    )
    print("per tensor:")
    width = max([len(n) for n in report["tensors"]] + [6])
    for name, row in sorted(report["tensors"].items()):
        print(f"  {name:<{width}}  {row['changed']:>10,} / {row['numel']:>12,}  {row['density']:.4%}")
    if report["modules_to_save"]:
        print("modules_to_save tensors:")
        for key, shape in sorted(report["modules_to_save"].items()):
            print(f"  {key}  {shape}")


def _num_labels(file: adapter_file.AdapterFile) -> int | None:
    """The output size of the saved task head (its smallest 2-D weight's first dimension)."""
    sizes = [v.shape[0] for k, v in file.tensors.items() if not adapter_file.is_delta_key(k) and v.dim() == 2]
    return min(sizes) if sizes else None


def _same_path(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def _check_output(output: str, inputs: dict[str, str]) -> None:
    """`output` must be a folder (new or not) that is none of `inputs` (role -> path)."""
    for role, path in inputs.items():
        if _same_path(output, path):
            raise CliError(f"The output folder {output} is the {role} ({path}); write to another folder.")
    if os.path.exists(output) and not os.path.isdir(output):
        raise CliError(f"The output {output} is a file, not a folder.")


def merge(base: str, directory: str, output: str, num_labels: int | None = None) -> str:
    """Load `base`, apply the adapter in `directory`, merge, and save a standalone model to `output`."""
    import transformers
    from peft import PeftModel

    import peft_stoc  # noqa: F401  (registers the method)

    config, file = _read_adapter(directory)
    _check_output(output, {"adapter folder": directory, "base model": base})
    task = config.get("task_type")
    architectures = None if task else _architectures(base)
    auto = getattr(transformers, auto_class_name(task, architectures))
    kwargs = {}
    if num_labels is not None and num_labels < 1:
        raise CliError(f"--num-labels must be at least 1, got {num_labels}.")
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        saved = _num_labels(file)
        if num_labels is not None and saved is not None and num_labels != saved:
            raise CliError(
                f"--num-labels {num_labels} does not match the adapter's task head, which has {saved} "
                "outputs; drop --num-labels to use the head's size."
            )
        labels = num_labels or saved
        if labels:
            kwargs["num_labels"] = labels
        if saved is not None:
            kwargs["ignore_mismatched_sizes"] = True  # the base's own head is replaced by the adapter's
    try:
        model = auto.from_pretrained(base, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise CliError(f"Cannot load the base model {base!r}: {error}") from None
    try:
        merged = PeftModel.from_pretrained(model, directory).merge_and_unload()
    except (ValueError, RuntimeError, TypeError, KeyError) as error:
        raise CliError(f"Cannot apply {directory} to {base}: {error}") from None
    merged.save_pretrained(output)
    if _has_tokenizer(base):
        try:
            transformers.AutoTokenizer.from_pretrained(base).save_pretrained(output)
        except (OSError, ValueError, TypeError):
            pass  # a base without a usable tokenizer is still a valid model
    return output


TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _has_tokenizer(base: str) -> bool:
    """A local base folder needs tokenizer files of its own: without them, a tokenizer would be made up."""
    if os.path.isdir(base):
        return any(os.path.isfile(os.path.join(base, name)) for name in TOKENIZER_FILES)
    return True  # a Hub name: its repository says


def _architectures(base: str) -> list[str] | None:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(base).architectures
    except (OSError, ValueError):
        return None


def _base_of(directory: str, file: adapter_file.AdapterFile) -> tuple[str, str]:
    recorded = file.fingerprint
    if recorded is None:
        raise CliError(
            f"{directory} has no base-model fingerprint in its header, so its base is unknown; compose "
            "adapters saved by peft-stoc's save_pretrained."
        )
    return recorded["structure"], recorded["checksum"]


def compose(directories: list[str], weights: list[float] | None, output: str) -> str:
    """Write Σ wᵢ·deltaᵢ as a new adapter; the task head and config come from the first adapter."""
    if len(directories) < 2:
        raise CliError("compose needs at least two adapters, then the output folder.")
    weights = [1.0] * len(directories) if weights is None else weights
    if len(weights) != len(directories):
        raise CliError(f"Got {len(directories)} adapters but {len(weights)} weights.")
    if not all(math.isfinite(w) for w in weights):
        raise CliError(f"Weights must be finite numbers, got {' '.join(map(str, weights))}.")
    _check_output(output, {f"input adapter #{i + 1}": d for i, d in enumerate(directories)})
    loaded = [_read_adapter(d) for d in directories]
    if len({_base_of(d, f) for d, (_, f) in zip(directories, loaded)}) != 1:
        raise CliError("The adapters were made for different base models (their fingerprints differ).")
    configs = [_stoc_config(d, c) for d, (c, _) in zip(directories, loaded)]
    first_heads = _heads(loaded[0][1])
    for directory, (_, file), stoc in zip(directories[1:], loaded[1:], configs[1:]):
        if _heads(file) != first_heads:
            raise CliError(
                f"{directory} holds other modules_to_save tensors than {directories[0]} (names, shapes or dtypes): "
                "composed adapters share one task head."
            )
        if sorted(stoc.modules_to_save or []) != sorted(configs[0].modules_to_save or []):
            raise CliError(f"{directory} has other modules_to_save than {directories[0]}.")
    combined = SparseDelta.weighted_sum([f.delta() for _, f in loaded], weights)
    for name, (_, values) in combined.tensors.items():
        if not bool(torch.isfinite(values.float()).all()):
            raise CliError(f"The weighted sum overflows float32 in '{name}'; use smaller weights.")
    shapes: dict[str, list[int]] = {}
    for _, f in loaded:
        shapes.update(f.shapes)
    config, first = loaded[0]
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    tensors = adapter_file.delta_tensors(combined, numels, getattr(torch, configs[0].save_dtype))
    tensors.update({k: v for k, v in first.tensors.items() if not adapter_file.is_delta_key(k)})
    counts = dict(first.counts, changed=combined.num_changed, tensors=len(combined.tensors))
    metadata = {
        adapter_file.META_FORMAT: adapter_file.FORMAT_VERSION,
        adapter_file.META_COUNTS: json.dumps(counts),
        adapter_file.META_SHAPES: json.dumps({n: shapes[n] for n in combined.tensors}, separators=(",", ":")),
        adapter_file.META_FINGERPRINT: first.metadata[adapter_file.META_FINGERPRINT],
        adapter_file.META_HEADS: adapter_file.heads_entry(tensors),
    }
    config = dict(
        config,
        inference_mode=True,
        target_modules=union_of_targets(configs),
        exclude_modules=union_of_excludes(configs),
    )
    from peft import PeftConfig

    with atomic_folder.staged_folder(output) as stage:
        adapter_file.write(os.path.join(stage, adapter_file.WEIGHTS_NAME), tensors, metadata)
        with open(os.path.join(stage, CONFIG_NAME), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        atomic_folder.copy_regular_file(os.path.join(directories[0], "README.md"), os.path.join(stage, "README.md"))
        written = PeftConfig.from_pretrained(stage)
        validation.validate(os.path.join(stage, adapter_file.WEIGHTS_NAME), written)  # as loading will
        write_model_card(stage, {"default": written}, load_from=output)
    return output


def _split_compose(positional: list[str], weight_words: list[str] | None) -> tuple[list[str], list[float] | None, str]:
    """Inputs, weights and output of `compose`, whether the output folder comes before `--weights` or after.

    argparse hands every word after `--weights` to it: `compose a b --weights 1 0.5 out` arrives as [a, b] and
    [1, 0.5, out]. n adapters, n weights and one output make 2n + 1 words, so the first n after `--weights` are
    the weights; when the count does not add up, the leading numbers are (and `compose` reports the mismatch).
    """
    if weight_words is None:
        words, weights = positional, None
    else:
        n = (len(positional) + len(weight_words) - 1) // 2
        if (len(positional) + len(weight_words)) % 2 == 0 or n > len(weight_words) or not _numbers(weight_words[:n]):
            n = next((i for i, word in enumerate(weight_words) if not _numbers([word])), len(weight_words))
        if n == 0:
            raise CliError(f"--weights needs numbers, got {weight_words[0]!r}.")
        weights = [float(word) for word in weight_words[:n]]
        words = positional + weight_words[n:]
        if len(words) == len(weights):
            raise CliError(
                f"compose needs the output folder after the adapters (got {len(words)} adapters and as many weights)."
            )
    if len(words) < 2:
        raise CliError("compose needs at least two adapters, then the output folder.")
    return words[:-1], weights, words[-1]


def _numbers(words: list[str]) -> bool:
    try:
        [float(word) for word in words]
    except ValueError:
        return False
    return True


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-inf" or "-1e-3" for an option; they are weights (refused or not by `compose` itself).
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peft-stoc", description="Work with StocTuning sparse-delta adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("inspect", help="Counts, per-tensor density, fingerprint and size of an adapter.")
    p.add_argument("adapter", help="adapter folder (with adapter_config.json and adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = commands.add_parser("merge", help="Apply an adapter to its base and save a standalone model.")
    p.add_argument("base", help="base model: a folder or a Hub id")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("output", help="folder for the merged model")
    p.add_argument("--num-labels", type=int, help="task head size (default: read from the adapter's head)")
    p = commands.add_parser(
        "compose",
        help="Weighted sum of adapters of the same base into a new adapter.",
        usage="%(prog)s ADAPTER ADAPTER [ADAPTER ...] [--weights W W [W ...]] OUTPUT",
    )
    p.add_argument("adapters", nargs="*", help="adapter folders, then the output folder last")
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="W",
        help="one weight per adapter (default: 1 each); the output folder may follow the weights",
    )
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            report = inspect_adapter(args.adapter)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _print_inspection(report)
        elif args.command == "merge":
            print(f"merged model written to {merge(args.base, args.adapter, args.output, args.num_labels)}")
        else:
            inputs, weights, output = _split_compose(args.adapters, args.weights)
            print(f"composed adapter written to {compose(inputs, weights, output)}")
    except (CliError, adapter_file.AdapterFileError, OSError) as error:
        print(f"peft-stoc: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
