"""Where the time of a StocTuning step goes, phase by phase, next to a full fine-tuning step of the same model.

    python benchmarks/profile_step.py [--model minilm|roberta-base] [--steps 6] [--threads N] [--no-write]

Each engine phase is timed by wrapping it; the draw is split into its own phases. Forward and backward are timed for
both models, so the cost of the activation hooks shows as the difference of the forwards.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict

import common
import torch
from peft import get_peft_model

import peft_stoc
from peft_stoc import engine as engine_module
from peft_stoc import selection


class Timers:
    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def next_step(self) -> None:
        self.steps.append(dict(self.current))
        self.current.clear()

    def median(self, label: str) -> float:
        return common.median([s.get(label, 0.0) for s in self.steps])


def count(totals: dict, owner, name: str, label: str, amount) -> None:
    """Add `amount(*args)` to totals[label] at every call of owner.name."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        totals[label] += amount(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(common.MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    common.quiet(args.threads)
    torch.manual_seed(0)
    base, description = common.MODELS[args.model]()
    full = copy.deepcopy(base).train()
    stoc = get_peft_model(base, peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS")).train()
    engine = stoc.base_model.stoc_engine()
    batches = [common.zipf_batch(base.config.vocab_size, seed=s) for s in range(4)]
    optimizers = {
        "full": torch.optim.AdamW(full.parameters(), lr=1e-5, eps=1e-6),
        "stoc": torch.optim.AdamW([p for p in stoc.parameters() if p.requires_grad], lr=1e-5, eps=1e-6),
    }

    timers = Timers()
    timers.wrap(engine, "_draw", "draw")
    timers.wrap(selection._Thinning, "_block_stats", "draw: first pass (block statistics)")
    timers.wrap(selection._Thinning, "_first_threshold", "draw: threshold from the statistics")
    timers.wrap(selection._Thinning, "_visit", "draw: second pass (thinning; keys included)")
    timers.wrap(selection._Thinning, "_offer", "draw: keys of the entries that may win")
    timers.wrap(engine.patch, "record", "record original values")
    timers.wrap(engine_module, "mask_gradient", "mask gradients")
    timers.wrap(engine.decay, "apply", "redirect weight decay")
    timers.wrap(engine.audit, "verify", "audit (3 per step)")

    # Entries each phase of the draw touches, to turn times into nanoseconds and bytes per entry.
    touched: dict[str, float] = defaultdict(float)
    count(touched, selection._Thinning, "_block_stats", "first pass", lambda self, segments: segments[-1].start
          + segments[-1].size)
    count(touched, selection._Thinning, "_visit", "second pass",
          lambda self, segments, *rest: segments[-1].start + segments[-1].size)
    count(touched, selection._Thinning, "_offer", "keys", lambda self, segments, local, *rest, **named: local.numel())

    rows = defaultdict(list)
    for step in range(args.steps + 1):
        batch = batches[step % len(batches)]
        for name, model in (("full", full), ("stoc", stoc)):
            optimizer = optimizers[name]
            t0 = time.perf_counter()
            loss = model(**batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            optimizer.zero_grad()
            t4 = time.perf_counter()
            if step:  # the first step allocates optimizer state
                rows[f"{name}: forward"].append(t1 - t0)
                rows[f"{name}: backward"].append(t2 - t1)
                rows[f"{name}: optimizer.step (with hooks)"].append(t3 - t2)
                rows[f"{name}: zero_grad"].append(t4 - t3)
                rows[f"{name}: step"].append(t4 - t0)
        if step:
            timers.next_step()
        else:
            timers.current.clear()
            touched.clear()

    full_step = common.median(rows["full: step"])
    table = []
    for label, values in rows.items():
        table.append([label, f"{common.median(values) * 1e3:.0f}", f"{common.median(values) / full_step:.3f}"])
    hooks = common.median(rows["stoc: forward"]) - common.median(rows["full: forward"])
    table.append(["stoc forward − full forward (μ hooks)", f"{hooks * 1e3:.0f}", f"{hooks / full_step:.3f}"])
    for label in ["draw", "draw: first pass (block statistics)", "draw: threshold from the statistics",
                  "draw: second pass (thinning; keys included)", "draw: keys of the entries that may win",
                  "record original values", "mask gradients", "redirect weight decay", "audit (3 per step)"]:
        value = timers.median(label)
        table.append([f"stoc engine: {label}", f"{value * 1e3:.0f}", f"{value / full_step:.3f}"])
    n = engine.stats.candidates
    first = touched["first pass"] / args.steps
    first_time = timers.median("draw: first pass (block statistics)")
    text = "\n".join([
        f"### Profile of one step: {description}, batch 16 × 128, AdamW",
        "",
        f"`{common.command()}` — {common.today()}; {common.machine()}; {args.steps} steps, medians; "
        f"{n / 1e6:.1f}M candidate entries, k = {engine.k}.",
        "",
        common.table(["phase", "ms", "share of a full fine-tuning step"], table),
        "",
        f"Entries and bytes per draw: the first pass visits {first / 1e6:.1f}M of the {n / 1e6:.1f}M candidates "
        f"(embedding rows of tokens absent from the batch are skipped) and reads θ and g, 8 bytes per entry in "
        f"float32, then works on a 4-byte value per entry in a cache-sized buffer: {first_time / first * 1e9:.2f} ns "
        f"per entry, {8 * first / first_time / 1e9:.1f} GB/s of θ and g. The second pass recomputes "
        f"the {touched['second pass'] / args.steps / 1e6:.1f}M entries of the chunks that have blocks with a "
        f"Poisson point or an entry of λ ≥ 1 (4 bytes of λ per entry, then only those blocks are looked at); "
        f"{touched['keys'] / args.steps / 1e3:.0f}k entries get a key (k = {engine.k}).",
    ])
    print(text)
    if not args.no_write:
        common.write_section(f"profile-{args.model}", text)


if __name__ == "__main__":
    main()
