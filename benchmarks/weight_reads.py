"""What showing the base in place costs: `disable_adapter()` and adapter switches write the changed entries into
the weights (no per-module swaps), and a guard watches the candidates' gradients.

    python benchmarks/weight_reads.py [--steps 10] [--threads 1] [--no-write]

MiniLM-L6 (all-MiniLM-L6-v2 weights), batch 16 × 128, AdamW, StocTuning's default (lean) mode, paper's k. In one
process, interleaved, medians:
- a training step with the weight guard (as shipped) next to the same model with the guard's hooks removed — the
  only part of a training step this mechanism adds;
- a reference pass (DPO): a forward without gradients inside `disable_adapter()` next to the same forward with the
  adapter, after the training steps; and entering plus leaving `disable_adapter()` alone.
"""

from __future__ import annotations

import copy
import time

import common
import torch
from peft import get_peft_model

import peft_stoc


def _stoc(base):
    return get_peft_model(copy.deepcopy(base), peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS"))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(steps: int) -> dict:
    torch.manual_seed(0)
    base, description = common.minilm()
    models = {"guarded": _stoc(base), "unguarded": _stoc(base)}
    models["unguarded"].base_model._weight_guard.remove()
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, eps=1e-6) for name, m in models.items()}
    batches = [common.zipf_batch(base.config.vocab_size, seed=s) for s in range(4)]
    times: dict[str, list[float]] = {name: [] for name in models}

    def step(name, batch):
        models[name](**batch).loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad()

    for round_ in range(2 + steps):
        batch = batches[round_ % len(batches)]
        for name in list(models) if round_ % 2 == 0 else list(models)[::-1]:
            seconds = _timed(lambda name=name, batch=batch: step(name, batch))
            if round_ >= 2:
                times[name].append(seconds)
        if round_ == 2:  # the guard must be what it claims: a backward while the base is shown is refused
            loss = models["guarded"](**batch).loss
            with models["guarded"].disable_adapter():
                try:
                    loss.backward()
                    raise RuntimeError("the weight guard let a backward through while the base was shown")
                except RuntimeError as error:
                    if "disable_adapter" not in str(error):
                        raise
            models["guarded"].zero_grad()

    model = models["guarded"].eval()
    inference = {"forward with the adapter": [], "forward inside disable_adapter()": [], "enter + leave": []}
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        for round_ in range(2 + steps):
            samples = {
                "forward with the adapter": _timed(lambda: model(**batch)),
                "forward inside disable_adapter()": _timed(lambda: _disabled(model, batch)),
                "enter + leave": _timed(lambda: _disabled(model, None)),
            }
            if round_ >= 2:
                for key, value in samples.items():
                    inference[key].append(value)
    changed = model.stoc_stats()["changed"]
    return {
        "description": description,
        "medians": {name: common.median(v) for name, v in times.items()},
        "inference": {key: common.median(v) for key, v in inference.items()},
        "changed": changed,
    }


def _disabled(model, batch) -> None:
    with model.disable_adapter():
        if batch is not None:
            model(**batch)


def report(result: dict, threads: int, steps: int) -> str:
    step, inference = result["medians"], result["inference"]
    ratio = step["guarded"] / step["unguarded"]
    forward = inference["forward inside disable_adapter()"] / inference["forward with the adapter"]
    lines = [
        f"### Showing the base in place: {result['description']}, batch 16 × 128, AdamW, {threads} thread(s)",
        "",
        f"Command: `python benchmarks/weight_reads.py --steps {steps} --threads {threads}`; medians of {steps} "
        "interleaved rounds in one process.",
        "",
        "| what | time | ratio |",
        "|---|---|---|",
        f"| training step, weight guard on | {step['guarded']:.3f} s | {ratio:.3f} × guard off |",
        f"| training step, weight guard off | {step['unguarded']:.3f} s | 1 |",
        f"| forward (no grad) with the adapter | {inference['forward with the adapter'] * 1e3:.1f} ms | 1 |",
        f"| forward (no grad) inside `disable_adapter()` "
        f"| {inference['forward inside disable_adapter()'] * 1e3:.1f} ms | {forward:.3f} × |",
        f"| entering + leaving `disable_adapter()` ({result['changed']:,} changed entries) "
        f"| {inference['enter + leave'] * 1e3:.2f} ms | |",
        "",
        f"Memory while the base is shown: the adapted values of the changed entries, "
        f"{result['changed'] * 4 / 2**20:.2f} MiB here (4 bytes per changed float32 entry; their positions are the "
        "record of originals' own); no copy of any weight tensor.",
        "",
        "The training step is in-place training as before: the switch writes and the base view run only on a "
        "switch, so the guard's gradient hooks are the whole per-step difference.",
    ]
    return "\n".join(lines)


def main() -> None:
    common.run_section(__doc__, "weight-reads", measure, report)


if __name__ == "__main__":
    main()
