"""`peft-stoc`: inspect, merge and compose StocTuning adapters from the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from . import adapter_file
from .config import StocTuningConfig, union_of_excludes, union_of_targets
from .delta import SparseDelta
from .hub import human_bytes, write_model_card

TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _read_adapter(directory: str) -> tuple[dict, adapter_file.AdapterFile]:
    config_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise CliError(f"{directory} is not an adapter folder: adapter_config.json is missing.")
    with open(config_path) as handle:
        config = json.load(handle)
    if config.get("peft_type") != "STOC":
        raise CliError(f"{directory} holds a {config.get('peft_type')} adapter, not a StocTuning (STOC) one.")
    return config, adapter_file.read(os.path.join(directory, adapter_file.WEIGHTS_NAME))


def inspect_adapter(directory: str) -> dict:
    """Everything `inspect` reports, as a dict."""
    config, file = _read_adapter(directory)
    delta = file.delta()
    numels = file.numels()
    head = {k: list(v.shape) for k, v in file.tensors.items() if not adapter_file.is_delta_key(k)}
    counts = file.counts
    return {
        "path": os.path.abspath(directory),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "k": config.get("k"),
        "k_entries": counts.get("k"),
        "selection": config.get("selection"),
        "changed": delta.num_changed,
        "candidates": counts.get("candidates"),
        "density": delta.num_changed / counts["candidates"] if counts.get("candidates") else None,
        "file_bytes": os.path.getsize(file.path),
        "tensors": {
            name: {"changed": int(index.numel()), "numel": numels[name], "density": index.numel() / numels[name]}
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
    print(f"k            {report['k']!r} -> {report['k_entries']} entries per step, selection={report['selection']}")
    print(f"changed      {report['changed']:,} of {report['candidates']:,} candidate entries ({density})")
    print(f"file         {human_bytes(report['file_bytes'])} (format {report['format']})")
    fp = report["fingerprint"] or {}
    print(f"fingerprint  structure {str(fp.get('structure'))[:16]}…, values {str(fp.get('checksum'))[:16]}…, "
          f"{fp.get('num_tensors')} tensors, dtypes {fp.get('dtypes')}")
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


def merge(base: str, directory: str, output: str, num_labels: int | None = None) -> str:
    """Load `base`, apply the adapter in `directory`, merge, and save a standalone model to `output`."""
    import transformers
    from peft import PeftModel

    import peft_stoc  # noqa: F401  (registers the method)

    config, file = _read_adapter(directory)
    task = config.get("task_type") or "FEATURE_EXTRACTION"
    auto = getattr(transformers, TASK_AUTO_CLASSES.get(task, "AutoModel"))
    kwargs = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        labels = num_labels or _num_labels(file)
        if labels:
            kwargs["num_labels"] = labels
    try:
        model = auto.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as error:
        raise CliError(f"Cannot load the base model {base!r}: {error}") from error
    merged = PeftModel.from_pretrained(model, directory).merge_and_unload()
    merged.save_pretrained(output)
    try:
        transformers.AutoTokenizer.from_pretrained(base).save_pretrained(output)
    except (OSError, ValueError, TypeError):
        pass  # a base without a tokenizer is still a valid model
    return output


def compose(directories: list[str], weights: list[float], output: str) -> str:
    """Write Σ wᵢ·deltaᵢ as a new adapter; the task head and config come from the first adapter."""
    if len(directories) < 2:
        raise CliError("compose needs at least two adapters.")
    if len(weights) != len(directories):
        raise CliError(f"Got {len(directories)} adapters but {len(weights)} weights.")
    loaded = [_read_adapter(d) for d in directories]
    fingerprints = [(f.fingerprint or {}).get("structure") for _, f in loaded]
    checksums = [(f.fingerprint or {}).get("checksum") for _, f in loaded]
    if len(set(fingerprints)) != 1 or len(set(checksums)) != 1:
        raise CliError("The adapters were made for different base models (their fingerprints differ).")
    combined = SparseDelta.weighted_sum([f.delta() for _, f in loaded], weights)
    shapes: dict[str, list[int]] = {}
    for _, f in loaded:
        shapes.update(f.shapes)
    config, first = loaded[0]
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    dtype = getattr(torch, config.get("save_dtype", "float32"))
    tensors = adapter_file.delta_tensors(combined, numels, dtype)
    tensors.update({k: v for k, v in first.tensors.items() if not adapter_file.is_delta_key(k)})
    counts = dict(first.counts, changed=combined.num_changed, tensors=len(combined.tensors))
    metadata = {
        "format": "pt",
        adapter_file.META_FORMAT: adapter_file.FORMAT_VERSION,
        adapter_file.META_COUNTS: json.dumps(counts),
        adapter_file.META_SHAPES: json.dumps({n: shapes[n] for n in combined.tensors}, separators=(",", ":")),
        adapter_file.META_FINGERPRINT: first.metadata[adapter_file.META_FINGERPRINT],
    }
    os.makedirs(output, exist_ok=True)
    save_file(tensors, os.path.join(output, adapter_file.WEIGHTS_NAME), metadata=metadata)
    configs = [StocTuningConfig.from_peft_type(**c) for c, _ in loaded]
    config = dict(config, inference_mode=True, target_modules=union_of_targets(configs),
                  exclude_modules=union_of_excludes(configs))
    with open(os.path.join(output, "adapter_config.json"), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    readme = os.path.join(directories[0], "README.md")
    if os.path.isfile(readme):
        shutil.copyfile(readme, os.path.join(output, "README.md"))
    from peft import PeftConfig

    write_model_card(output, {"default": PeftConfig.from_pretrained(output)})
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-stoc", description="Work with StocTuning sparse-delta adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("inspect", help="Counts, per-tensor density, fingerprint and size of an adapter.")
    p.add_argument("adapter", help="adapter folder (with adapter_config.json and adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = commands.add_parser("merge", help="Apply an adapter to its base and save a standalone model.")
    p.add_argument("base", help="base model: a folder or a Hub id")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("output", help="folder for the merged model")
    p.add_argument("--num-labels", type=int, help="task head size (default: read from the adapter's head)")
    p = commands.add_parser("compose", help="Weighted sum of adapters of the same base into a new adapter.")
    p.add_argument("adapters", nargs="+", help="adapter folders, then the output folder last")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default: 1 each)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            report = inspect_adapter(args.adapter)
            print(json.dumps(report, indent=2)) if args.json else _print_inspection(report)
        elif args.command == "merge":
            print(f"merged model written to {merge(args.base, args.adapter, args.output, args.num_labels)}")
        else:
            *inputs, output = args.adapters
            weights = args.weights or [1.0] * len(inputs)
            print(f"composed adapter written to {compose(inputs, weights, output)}")
    except (CliError, adapter_file.AdapterFileError) as error:
        print(f"peft-stoc: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
