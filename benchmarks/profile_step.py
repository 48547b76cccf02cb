"""Where the time of a StocTuning step goes, phase by phase, next to a full fine-tuning step of the same model.

    python benchmarks/profile_step.py [--model minilm|roberta-base] [--steps 6] [--threads N] [--no-write]

Three models step in turn: full fine-tuning, StocTuning with `memory="dense"` (dense gradients, the draw at the
optimizer step, torch's AdamW) and StocTuning with `memory="lean"` (gradients consumed by the streaming draw in
post-accumulate-grad hooks during the backward, the sparse AdamW update after the optimizer's step). Each engine
phase is timed by wrapping it, and charged to the model that was stepping; the dense draw is split into its own
phases. Forward and backward are timed for every model, so the cost of the activation hooks shows as the difference
of the forwards, and that of the lean mode's gradient hooks as the difference of the backwards.
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
from peft_stoc.sampling import streaming, thinning
from peft_stoc.training import dense as dense_module
from peft_stoc.training import sparse_optim

MODELS = ("full", "dense", "lean")
NAMES = {"full": "full fine-tuning", "dense": "StocTuning dense", "lean": "StocTuning lean"}


class Timers:
    """Wall time of wrapped functions, per label, charged to the model that is stepping (`self.model`)."""

    def __init__(self):
        self.model = ""
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner, name: str, label: str, model: str | None = None) -> None:
        """Time `owner.name`; with `model`, only while that model steps (owner is then one model's object)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[f"{model or self.model}: {label}"] += time.perf_counter() - start

        setattr(owner, name, timed)

    def next_step(self) -> None:
        self.steps.append(dict(self.current))
        self.current.clear()

    def median(self, label: str) -> float:
        return common.median([s.get(label, 0.0) for s in self.steps])


def count(totals: dict, owner, name: str, label: str, amount, when=lambda: True) -> None:
    """Add `amount(*args)` to totals[label] at every call of owner.name (while `when()`)."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        if when():
            totals[label] += amount(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, counted)


DENSE_PHASES = [
    "draw",
    "draw: first pass (block statistics)",
    "draw: threshold from the statistics",
    "draw: second pass (thinning; keys included)",
    "draw: keys of the entries that may win",
    "record original values",
    "mask gradients",
    "redirect weight decay",
    "audit (3 per step)",
]
LEAN_PHASES = [
    "backward hooks (all)",
    "backward hooks: streaming draw (StreamingDraw.add)",
    "backward hooks: chunks of λ and thinning",
    "backward hooks: keys of the entries that may win",
    "optimizer pre-step: dense gradients joining the draw",
    "optimizer pre-step: finish the draw",
    "after the step: sparse update (all)",
    "after the step: sparse AdamW arithmetic",
    "after the step: record original values",
    "audit (3 per step)",
]


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
    models = {
        "full": copy.deepcopy(base).train(),
        "dense": get_peft_model(
            copy.deepcopy(base), peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS", memory="dense")
        ).train(),
        "lean": get_peft_model(
            base, peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS", memory="lean")
        ).train(),
    }
    engines = {name: models[name].base_model.stoc_engine() for name in ("dense", "lean")}
    batches = [common.zipf_batch(base.config.vocab_size, seed=s) for s in range(4)]
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
        for name, model in models.items()
    }

    timers = Timers()
    dense, lean = engines["dense"], engines["lean"]
    timers.wrap(dense.strategy, "_fresh_draw", "draw", "dense")
    timers.wrap(thinning.Thinning, "_block_stats", "draw: first pass (block statistics)")
    timers.wrap(thinning.Thinning, "_first_threshold", "draw: threshold from the statistics")
    timers.wrap(thinning.Thinning, "_thin_first_round", "draw: second pass (thinning; keys included)")
    timers.wrap(thinning.Thinning, "_offer", "draw: keys of the entries that may win")
    timers.wrap(dense.patch, "record", "record original values", "dense")
    timers.wrap(dense_module, "mask_gradient", "mask gradients")
    timers.wrap(dense.strategy.decay, "apply", "redirect weight decay", "dense")
    for name, engine in engines.items():
        timers.wrap(engine.audit, "verify", "audit (3 per step)", name)
    timers.wrap(lean.lean, "consume", "backward hooks (all)", "lean")
    timers.wrap(streaming.StreamingDraw, "add", "backward hooks: streaming draw (StreamingDraw.add)")
    timers.wrap(streaming.StreamingDraw, "_visit", "backward hooks: chunks of λ and thinning")
    timers.wrap(thinning.Thinning, "_offer", "backward hooks: keys of the entries that may win")
    timers.wrap(lean.lean, "consume_dense", "optimizer pre-step: dense gradients joining the draw", "lean")
    timers.wrap(lean.lean, "finish", "optimizer pre-step: finish the draw", "lean")
    timers.wrap(lean.strategy, "update", "after the step: sparse update (all)", "lean")
    timers.wrap(sparse_optim, "sparse_step", "after the step: sparse AdamW arithmetic")
    timers.wrap(lean.patch, "record", "after the step: record original values", "lean")

    # Entries each phase of the dense draw touches, to turn times into nanoseconds and bytes per entry.
    touched: dict[str, float] = defaultdict(float)
    in_dense = lambda: timers.model == "dense"  # noqa: E731
    count(
        touched,
        thinning.Thinning,
        "_block_stats",
        "first pass",
        lambda self, segments: segments[-1].start + segments[-1].size,
        in_dense,
    )
    count(
        touched,
        thinning.Thinning,
        "_thin_first_round",
        "second pass",
        lambda self, segments, *rest: segments[-1].start + segments[-1].size,
        in_dense,
    )
    count(
        touched,
        thinning.Thinning,
        "_offer",
        "keys",
        lambda self, segments, local, *rest, **named: local.numel(),
        in_dense,
    )
    count(
        touched,
        thinning.Thinning,
        "_thin_chunk",
        "streamed",
        lambda self, segments, *rest: segments[-1].start + segments[-1].size,
        lambda: timers.model == "lean",
    )
    count(
        touched,
        thinning.Thinning,
        "_offer",
        "streamed keys",
        lambda self, segments, local, *rest, **named: local.numel(),
        lambda: timers.model == "lean",
    )

    rows = defaultdict(list)
    drawn = {name: [] for name in engines}
    for step in range(args.steps + 1):
        batch = batches[step % len(batches)]
        for name in MODELS if step % 2 == 0 else MODELS[::-1]:
            model, optimizer = models[name], optimizers[name]
            timers.model = name
            t0 = time.perf_counter()
            loss = model(**batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            optimizer.zero_grad()
            t4 = time.perf_counter()
            if name in engines:
                drawn[name].append(models[name].stoc_stats()["drawn"])
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
    for name, engine in engines.items():
        if any(d != engine.k for d in drawn[name]):
            raise RuntimeError(f"{name}: draws of {drawn[name]} entries, k = {engine.k}")

    full_step = common.median(rows["full: step"])

    def row(label: str, value: float) -> list[str]:
        return [label, f"{value * 1e3:.0f}", f"{value / full_step:.3f}"]

    table = []
    for name in MODELS:
        for phase in ("forward", "backward", "optimizer.step (with hooks)", "zero_grad", "step"):
            table.append(row(f"{NAMES[name]}: {phase}", common.median(rows[f"{name}: {phase}"])))
    for name in ("dense", "lean"):
        for phase in ("forward", "backward"):
            difference = common.median(rows[f"{name}: {phase}"]) - common.median(rows[f"full: {phase}"])
            what = "μ hooks" if phase == "forward" else ("gradient hooks" if name == "lean" else "none")
            table.append(row(f"{NAMES[name]} {phase} − full {phase} ({what})", difference))
    for label in DENSE_PHASES:
        table.append(row(f"{NAMES['dense']} engine: {label}", timers.median(f"dense: {label}")))
    for label in LEAN_PHASES:
        table.append(row(f"{NAMES['lean']} engine: {label}", timers.median(f"lean: {label}")))
    n = dense.stats.candidates
    first = touched["first pass"] / args.steps
    first_time = timers.median("dense: draw: first pass (block statistics)")
    streamed = touched["streamed"] / args.steps
    stream_time = timers.median("lean: backward hooks: chunks of λ and thinning")
    text = "\n".join(
        [
            f"### Profile of one step: {description}, batch 16 × 128, AdamW",
            "",
            f"`{common.command()}` — {common.today()}; {common.machine()}; {args.steps} steps, models interleaved, "
            f"medians; {n / 1e6:.1f}M candidate entries, k = {dense.k}; every StocTuning step drew exactly k entries.",
            "",
            common.table(["phase", "ms", "share of a full fine-tuning step"], table),
            "",
            f"Entries and bytes per draw. Dense: the first pass visits {first / 1e6:.1f}M of the {n / 1e6:.1f}M "
            f"candidates (embedding rows of tokens absent from the batch are skipped) and reads θ and g, 8 bytes per "
            f"entry in float32, then works on a 4-byte value per entry in a cache-sized buffer: "
            f"{first_time / max(first, 1) * 1e9:.2f} ns per entry, {8 * first / max(first_time, 1e-9) / 1e9:.1f} GB/s "
            f"of θ and g. The second pass recomputes the {touched['second pass'] / args.steps / 1e6:.1f}M entries of "
            f"the chunks that have blocks with a Poisson point or an entry of λ ≥ 1 (4 bytes of λ per entry, then only "
            f"those blocks are looked at); {touched['keys'] / args.steps / 1e3:.0f}k entries get a key "
            f"(k = {dense.k}). "
            f"Lean: the streaming draw visits each gradient once as it completes (the same rows skipped), "
            f"{streamed / 1e6:.1f}M entries per step ({stream_time / max(streamed, 1) * 1e9:.2f} ns per entry), "
            f"against the running k-th key of its pool; {touched['streamed keys'] / args.steps / 1e3:.0f}k entries get "
            "a key.",
        ]
    )
    print(text)
    if not args.no_write:
        common.write_section(f"profile-{args.model}", text)


if __name__ == "__main__":
    main()
