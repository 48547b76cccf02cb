"""Targets 2 and 3: a StocTuning training step next to full fine-tuning (and LoRA r=8 for reference): time per
step and peak memory.

    python benchmarks/step.py [--model minilm] [--steps 10] [--memory-steps 6] [--threads N] [--device cpu|cuda]
                              [--skip-memory] [--no-write]

Methods: full fine-tuning, StocTuning with `memory="lean"` (candidate gradients consumed during the backward by the
streaming draw, sparse AdamW state), StocTuning with `memory="dense"` (dense gradients, torch's AdamW with dense
state, as before the lean mode existed) and LoRA r=8. StocTuning runs the paper's setting (k = number of bias
entries, stochastic draw, masked gradients); every StocTuning step is checked to draw exactly k entries.
Time: the models are stepped round by round (forward + backward + AdamW step + zero_grad, batch 16 × 128, the same
batch for each in a round, the order reversed every other round), after two warm-up rounds; medians of `--steps`
rounds.
Memory: each method trains `--memory-steps` steps in a fresh process; peak RSS (CPU) or peak allocated memory
(CUDA) of that process, median of `--memory-repeats` processes per method (interleaved). On Linux the CPU figures
are taken twice: with glibc's default malloc, whose dynamic mmap threshold keeps freed blocks resident in ways that
vary from run to run by ±100 MiB, and with fixed thresholds (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`),
which returns freed memory at once and so shows the memory the run actually holds at its peak.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import common
import torch
from peft import LoraConfig, get_peft_model

import peft_stoc

METHODS = ("full fine-tuning", "StocTuning lean", "StocTuning dense", "LoRA r=8")
LEAN, DENSE, FULL, LORA = "StocTuning lean", "StocTuning dense", "full fine-tuning", "LoRA r=8"


def build(method: str, base: torch.nn.Module) -> torch.nn.Module:
    if method == FULL:
        return base
    if method.startswith("StocTuning"):
        memory = method.split()[-1]
        return get_peft_model(base, peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS", memory=memory))
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS"))


def stepper(model: torch.nn.Module):
    """One training step of `model` per call; a StocTuning step raises unless it drew exactly k entries."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
    engine = model.base_model.stoc_engine() if hasattr(model, "stoc_stats") else None

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if engine is not None and model.stoc_stats()["drawn"] != engine.k:
            raise RuntimeError(f"StocTuning drew {model.stoc_stats()['drawn']} entries, not k = {engine.k}")

    return step


def measure_time(model_name: str = "minilm", steps: int = 10, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    base, description = common.MODELS[model_name]()
    steppers = {method: stepper(build(method, copy.deepcopy(base)).to(device)) for method in METHODS}
    batches = [common.zipf_batch(base.config.vocab_size, seed=s, device=device) for s in range(4)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {method: [] for method in METHODS}
    for round_ in range(2 + steps):
        batch = batches[round_ % len(batches)]
        order = METHODS if round_ % 2 == 0 else METHODS[::-1]  # alternate who goes first
        for method in order:
            sync()
            start = time.perf_counter()
            steppers[method](batch)
            sync()
            if round_ >= 2:
                times[method].append(time.perf_counter() - start)
    return {
        "description": description,
        "times": times,
        "load_before": load,
        "medians": {m: common.median(v) for m, v in times.items()},
    }


def peak_memory(method: str, model_name: str, steps: int, device: str) -> float:
    """Peak memory in MiB of `steps` training steps of `method` in this process."""
    torch.manual_seed(0)
    base, _ = common.MODELS[model_name]()
    step = stepper(build(method, base).to(device))
    batches = [common.zipf_batch(base.config.vocab_size, seed=s, device=device) for s in range(4)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return common.peak_rss_mib()


def measure_memory(
    model_name: str = "minilm",
    steps: int = 6,
    device: str = "cpu",
    repeats: int = 3,
    environment: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Peak memory of each method, each run in a fresh process; `repeats` rounds, the methods alternating."""
    out: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_ in range(repeats):
        for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                method,
                "--model",
                model_name,
                "--memory-steps",
                str(steps),
                "--device",
                device,
                "--threads",
                str(torch.get_num_threads()),
            ]
            result = subprocess.run(
                command, capture_output=True, text=True, check=True, env={**os.environ, **(environment or {})}
            )
            out[method].append(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])
    return out


def measure_memories(model_name: str, steps: int, device: str, repeats: int) -> dict[str, dict[str, list[float]]]:
    """{allocator setting: peak MiB per method}: the default, and on Linux CPUs glibc with fixed thresholds."""
    memories = {"default allocator": measure_memory(model_name, steps, device, repeats)}
    if device == "cpu" and sys.platform.startswith("linux"):
        memories["glibc malloc, fixed thresholds"] = measure_memory(
            model_name, steps, device, repeats, common.FIXED_MALLOC
        )
    return memories


def report(timing: dict, memories: dict[str, dict[str, list[float]]] | None, device: str) -> str:
    m = timing["medians"]
    full = m[FULL]
    lean, dense = m[LEAN] / full, m[DENSE] / full

    def met(value: float, bound: float) -> str:
        return "yes" if value <= bound else "**no**"

    targets = [
        ["StocTuning lean step ≤ 1.00 × full fine-tuning step", f"{lean:.3f}", met(lean, 1.00)],
        ["StocTuning dense step ≤ 1.10 × full fine-tuning step", f"{dense:.3f}", met(dense, 1.10)],
    ]
    rows = [[method, f"{m[method] * 1e3:.0f}", f"{m[method] / full:.3f}"] for method in METHODS]
    lines = [
        f"### Training step (target 2): {timing['description']}, batch 16 × 128, AdamW",
        "",
        f"`{common.command()}` — {common.today()}; {common.machine(device)} at the end, "
        f"{timing['load_before']} before the timed steps.",
        f"{len(timing['times'][LEAN])} interleaved steps per method after 2 warm-up rounds, medians; every "
        "StocTuning step drew exactly k entries (checked).",
        "",
    ]
    memory_rows = []
    kind = "peak allocated CUDA memory" if device.startswith("cuda") else "peak RSS"
    for setting, memory in (memories or {}).items():
        peak = {method: common.median(values) for method, values in memory.items()}
        where = "" if device != "cpu" else f" ({setting})"
        ratio = peak[LEAN] / peak[LORA]
        targets.append([f"StocTuning lean {kind} ≤ 1.05 × LoRA's{where}", f"{ratio:.3f}", met(ratio, 1.05)])
        ratio = peak[DENSE] / peak[FULL]
        targets.append(
            [f"StocTuning dense {kind} ≤ 1.05 × full fine-tuning's{where}", f"{ratio:.3f}", met(ratio, 1.05)]
        )
        for method in METHODS:
            spread = f"{min(memory[method]):.0f}–{max(memory[method]):.0f}"
            memory_rows.append(
                [
                    method,
                    setting,
                    f"{peak[method]:.0f}",
                    spread,
                    f"{peak[method] / peak[FULL]:.3f}",
                    f"{peak[method] / peak[LORA]:.3f}",
                ]
            )
    lines += [
        common.table(["target", "measured", "met"], targets),
        "",
        common.table(["method", "median ms per step", "÷ full fine-tuning"], rows),
    ]
    if memory_rows:
        repeats = len(next(iter(memories.values()))[LEAN])
        lines += [
            "",
            f"{kind}: median of {repeats} fresh processes per method.",
            "",
            common.table(["method", "allocator", "peak MiB", "range", "÷ full fine-tuning", "÷ LoRA"], memory_rows),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(common.MODELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.quiet(args.threads)
    if args.memory_child:
        peak = peak_memory(args.memory_child, args.model, args.memory_steps, args.device)
        print(json.dumps({"peak_mib": peak}))
        return
    timing = measure_time(args.model, args.steps, args.device)
    memories = (
        None if args.skip_memory else measure_memories(args.model, args.memory_steps, args.device, args.memory_repeats)
    )
    text = report(timing, memories, args.device)
    print(text)
    if not args.no_write:
        common.write_section(f"step-{args.model}-{args.device}-threads{torch.get_num_threads()}", text)


if __name__ == "__main__":
    main()
