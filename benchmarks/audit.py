"""What the exact audit costs: a StocTuning training step with the audit next to the same step with the audit's
checks turned off, MiniLM-L6 (all-MiniLM-L6-v2 weights), batch 16 × 128, AdamW, the default mode, interleaved in one
process, medians.

    python benchmarks/audit.py [--steps 10] [--threads 1] [--no-write]

The audit checks every candidate entry three times per step (at the forward, before and after the optimizer step):
a checksum of each tensor's bit patterns, with the entries training changed accounted for separately.
"""

from __future__ import annotations

import copy
import time

import common
import torch
from peft import get_peft_model

import peft_stoc
from peft_stoc.training.audit import checksum


def measure(steps: int) -> dict:
    torch.manual_seed(0)
    base, description = common.minilm()
    config = peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS")
    models = {name: get_peft_model(copy.deepcopy(base), config) for name in ("audited", "unaudited")}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, eps=1e-6) for name, m in models.items()}
    batches = [common.zipf_batch(base.config.vocab_size, seed=s) for s in range(4)]
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(2 + steps):
        batch = batches[round_ % len(batches)]
        for name in list(models) if round_ % 2 == 0 else list(models)[::-1]:
            start = time.perf_counter()
            models[name](**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
        if round_ == 0:  # the engines exist after the first step: switch the second one's checks off
            audit = models["unaudited"].base_model.stoc_engine().audit
            audit.verify = lambda *args, **kwargs: None
    params = list(models["audited"].base_model.base_params().values())
    one_pass = common.median([_timed(lambda: [checksum(p.detach().view(-1)) for p in params]) for _ in range(5)])
    return {
        "description": description,
        "medians": {name: common.median(v) for name, v in times.items()},
        "pass": one_pass,
        "entries": sum(p.numel() for p in params),
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(result: dict, threads: int, steps: int) -> str:
    step = result["medians"]
    return "\n".join(
        [
            f"### The exact audit: {result['description']}, batch 16 × 128, AdamW, {threads} thread(s)",
            "",
            f"Command: `python benchmarks/audit.py --steps {steps} --threads {threads}`; medians of {steps} "
            "interleaved rounds in one process.",
            "",
            "| what | time | ratio |",
            "|---|---|---|",
            f"| training step, audit on | {step['audited']:.3f} s | {step['audited'] / step['unaudited']:.3f} × off |",
            f"| training step, audit off | {step['unaudited']:.3f} s | 1 |",
            f"| one checksum pass over the {result['entries']:,} candidate entries | {result['pass'] * 1e3:.1f} ms "
            f"| {result['pass'] / step['unaudited']:.3f} × a step |",
        ]
    )


def main() -> None:
    common.run_section(__doc__, "audit", measure, report)


if __name__ == "__main__":
    main()
