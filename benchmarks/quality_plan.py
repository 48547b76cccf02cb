"""What the MiniLM quality study trains: its variants, its stages in priority order, and their estimated hours."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from benchmarks import causal_quality
from benchmarks.cells import chosen_rate, next_rates
from examples.glue import read_results

STAND_INS = ("tweets", "rt-sentences")


@dataclass(frozen=True)
class Variant:
    """A method of `examples/glue.py` with its StocTuning options; `centre`: first guess of its learning rate."""

    label: str
    method: str
    centre: float
    k_factor: float = 1.0
    activation_stat: str = "mean"
    update_rule: str = "masked_grad"
    relative_to: str | None = None  # centre its grid on this variant's rate in the same task and budget
    mask_interval: int = 1


VARIANTS = {
    "stoc": Variant("Stoc", "stoc", 3e-3),
    "stoc-lazy": Variant("Stoc, lazy", "stoc", 3e-3, update_rule="lazy"),
    "stoc-strict": Variant("Stoc, strict", "stoc", 3e-3, update_rule="strict"),
    "top": Variant("Top", "top", 3e-3),
    "bitfit": Variant("BitFit", "bitfit", 3e-3),
    "lora": Variant("LoRA (r=8, q/v)", "lora", 3e-3),
    "full": Variant("Full-FT", "full", 1e-4),
    "stoc-k4": Variant("Stoc, k = 4x", "stoc", 1e-3, k_factor=4.0, relative_to="stoc"),
    "stoc-k16": Variant("Stoc, k = 16x", "stoc", 1e-3, k_factor=16.0, relative_to="stoc"),
    "stoc-abs": Variant("Stoc, mu = abs_mean", "stoc", 3e-3, activation_stat="abs_mean", relative_to="stoc"),
    "stoc-rms": Variant("Stoc, mu = rms", "stoc", 3e-3, activation_stat="rms", relative_to="stoc"),
    "stoc-mi4": Variant("Stoc, mask_interval = 4", "stoc", 3e-3, relative_to="stoc", mask_interval=4),
    "stoc-mi16": Variant("Stoc, mask_interval = 16", "stoc", 3e-3, relative_to="stoc", mask_interval=16),
}
CURVE_VARIANTS = ("stoc", "stoc-lazy", "stoc-strict", "top", "bitfit", "lora", "full")
K_MU_VARIANTS = ("stoc-k4", "stoc-k16", "stoc-abs", "stoc-rms")  # against the paper's Stoc at the middle budget
INTERVAL_VARIANTS = ("stoc-mi4", "stoc-mi16")  # a mask reused between draws, against the paper's Stoc (interval 1)


@dataclass(frozen=True)
class Stage:
    """Cells trained together: one task, one budget (index into `--budgets`), some variants, some seeds."""

    name: str
    task: str
    budget: int
    variants: tuple[str, ...]
    seeds: int = 3  # how many of `--seeds` (the first ones)
    core: bool = True  # part of the study's planned compute; the others extend it when time allows


# Priority order: what a cut-short study should have first. The regression stand-in first (the larger gaps between
# methods, and the task of the held-out lazy-rule check), two budgets there before the classification task; Top and
# the strict rule, k and mu after the main comparison; the largest budget costs 10x the smallest per run, so it gets
# four variants and two seeds, and comes late.
MAIN = ("stoc", "stoc-lazy", "bitfit", "lora", "full")
STAGES = (
    Stage("tweets-small", "tweets", 0, MAIN),
    Stage("tweets-middle", "tweets", 1, MAIN),
    Stage("rt-small", "rt-sentences", 0, MAIN),
    Stage("causal-lm", "causal", 0, ("stoc", "lora", "full")),  # benchmarks/causal_quality.py, its defaults
    Stage("tweets-small-more", "tweets", 0, ("top", "stoc-strict")),
    Stage("k-and-mu", "tweets", 1, K_MU_VARIANTS, seeds=2),
    Stage("tweets-large", "tweets", 2, ("stoc", "stoc-lazy", "bitfit", "lora"), seeds=2, core=False),
    Stage("rt-middle", "rt-sentences", 1, MAIN, core=False),
    Stage("more", "tweets", 1, ("top", "stoc-strict"), core=False),
    Stage("rt-more", "rt-sentences", 0, ("top",), core=False),
    Stage("mask-interval", "tweets", 1, INTERVAL_VARIANTS),
    Stage("rt-mask-interval", "rt-sentences", 1, INTERVAL_VARIANTS),
)
# Seconds per optimizer step and per run outside training (load, tokenise, evaluate 1,000 rows, merge), measured
# with one torch thread on the shared 2-core machine before the study; the plan uses measured figures once runs exist.
STEP_SECONDS = {"stoc": 1.47, "top": 1.47, "bitfit": 0.6, "lora": 0.73, "full": 1.17}
RUN_OVERHEAD_SECONDS = 25.0
# SmolLM2-135M, batch 8, one thread, same machine (a 2-step trial per method): seconds per step, and per run outside
# training (load the float32 copy, score 128 dev reviews, save).
CAUSAL_STEP_SECONDS = 40.0
CAUSAL_RUN_OVERHEAD_SECONDS = 200.0


# -- runs and cells ------------------------------------------------------------------------------------------------
def variant_of(record: dict) -> str | None:
    """The variant a recorded run belongs to (None for methods this study does not train)."""
    for name, v in VARIANTS.items():
        if (v.method, v.k_factor, v.activation_stat, v.update_rule, v.mask_interval) == (
            record["method"],
            record.get("k_factor", 1.0),
            record.get("activation_stat", "mean"),
            record.get("update_rule", "masked_grad"),
            record.get("mask_interval", 1),
        ):
            return name
    return None


def matching(records: list[dict], args) -> list[dict]:
    """Runs of this study's settings (the results file also holds runs of earlier, shorter protocols)."""
    return [
        r
        for r in records
        if (r["model"], r["max_length"], r["max_train"], r["max_dev"], r.get("device", "cpu"))
        == (args.model, args.max_length, args.train_rows, args.dev_rows, args.device)
        and variant_of(r) is not None
    ]


def cell_runs(records: list[dict], task: str, variant: str, epochs: float) -> list[dict]:
    return [r for r in records if r["task"] == task and variant_of(r) == variant and r["epochs"] == epochs]


def centre(records: list[dict], args, task: str, variant: str, budget: int) -> float:
    """Where a cell's grid starts: its variant's rate at the next smaller budget, or the reference variant's."""
    v = VARIANTS[variant]
    for other, b in ((variant, budget - 1), (v.relative_to, budget)):
        if other is None or b < 0:
            continue
        lr = chosen_rate(cell_runs(records, task, other, args.budgets[b]), args)
        if lr is not None:
            return lr
    return v.centre


def steps_of(args, epochs: float) -> int:
    """Optimizer steps of a budget (Trainer: batches per epoch x epochs, rounded up)."""
    return math.ceil(math.ceil(args.train_rows / 16) * epochs)


# -- the plan ------------------------------------------------------------------------------------------------------
def planned_runs(stage: Stage, args) -> int:
    """Runs a stage needs with the first grid only (each grid extension adds one)."""
    return len(stage.variants) * (args.grid_size + len(args.seeds[1 : stage.seeds]))


def step_seconds(records: list[dict]) -> dict[str, float]:
    """Measured seconds per step per method (the planning figures where none is measured yet)."""
    out = dict(STEP_SECONDS)
    for method in STEP_SECONDS:
        spans = [r["train_seconds"] / r["steps"] for r in records if r["method"] == method and r["steps"]]
        if spans:
            out[method] = float(np.median(spans))
    return out


def cell_hours(records: list[dict], args, variants, budget: int, seeds: int) -> float:
    """Estimated hours of cells of `variants` at a budget: first grid plus the other seeds, one task."""
    seconds = step_seconds(records)
    runs = args.grid_size + len(args.seeds[1:seeds])
    steps = steps_of(args, args.budgets[budget])
    return sum(runs * (steps * seconds[VARIANTS[v].method] + RUN_OVERHEAD_SECONDS) for v in variants) / 3600


def full_protocol_hours(records: list[dict], args) -> float:
    """Every curve variant at every budget on both tasks, and k/mu on both tasks at the middle budget."""
    curves = sum(cell_hours(records, args, CURVE_VARIANTS, b, len(args.seeds)) for b in range(len(args.budgets)))
    k_mu = cell_hours(records, args, K_MU_VARIANTS, 1, len(args.seeds))
    return len(STAND_INS) * (curves + k_mu)


def causal_plan_row(stage: Stage, args) -> list[str]:
    """The causal-LM stage in the plan: its runs (grid + seeds + the untrained score) and measured hours."""
    c = causal_quality.parse(["--runs", str(args.causal_runs), "--device", args.device])
    runs = read_results(c.runs)
    trained = [r for r in runs if r["method"] != "before"]
    step = float(np.median([r["step_seconds"] for r in trained])) if trained else CAUSAL_STEP_SECONDS
    planned = 1 + len(c.methods) * (c.grid_size + len(c.seeds) - 1)
    hours = planned * (c.steps * step + CAUSAL_RUN_OVERHEAD_SECONDS) / 3600
    return [
        stage.name,
        "SmolLM2 answer format",
        f"{c.steps} steps of {c.batch_size}",
        ", ".join(c.methods),
        str(len(c.seeds)),
        str(planned),
        str(len(runs)),
        f"{hours:.1f}",
    ]


def plan_rows(records: list[dict], args) -> list[list[str]]:
    """Per stage: cells, runs (planned, done), steps per run, estimated hours, from measured step times."""
    rows = []
    for stage in STAGES:  # the whole study, whichever stages this command runs
        if stage.task == "causal":
            rows.append(causal_plan_row(stage, args))
            continue
        epochs = args.budgets[stage.budget]
        steps = steps_of(args, epochs)
        runs = planned_runs(stage, args)
        done = sum(len(cell_runs(records, stage.task, v, epochs)) for v in stage.variants)
        hours = cell_hours(records, args, stage.variants, stage.budget, stage.seeds)
        rows.append(
            [
                stage.name + ("" if stage.core else " (ext.)"),
                stage.task,
                f"{epochs:g} ({steps:.0f} steps)",
                ", ".join(stage.variants),
                str(stage.seeds),
                str(runs),
                str(done),
                f"{hours:.1f}",
            ]
        )
    return rows


def stage_finished(records: list[dict], stage: Stage, args) -> bool:
    """Every cell of the stage has a closed learning-rate grid and a run for each of its seeds."""
    if stage.task == "causal":
        c = causal_quality.parse(["--runs", str(args.causal_runs), "--device", args.device])
        done = causal_quality.summaries(read_results(c.runs))
        return all(m in done and len(done[m]["seeds"]) >= len(c.seeds) for m in c.methods)
    epochs = args.budgets[stage.budget]
    for variant in stage.variants:
        runs = cell_runs(records, stage.task, variant, epochs)
        if next_rates(runs, centre(records, args, stage.task, variant, stage.budget), args):
            return False
        lr = chosen_rate(runs, args)
        if not set(args.seeds[: stage.seeds]) <= {r["seed"] for r in runs if r["learning_rate"] == lr}:
            return False
    return True


def plan_finished(records: list[dict], args) -> bool:
    return all(stage_finished(records, stage, args) for stage in STAGES)


# What the stages leave out of the full protocol, and why (kept with the code that decides it).
CUTS = (
    "Cut: Top and the *strict* rule at the smallest budget on tweets only in the core (the middle budget on "
    "tweets and the smallest on rt-sentences are extensions); k/μ on tweets only, with two seeds; the largest "
    "budget (10 epochs, ~35 min per Stoc run) is an extension, on tweets only, for Stoc, Stoc-lazy, BitFit and "
    "LoRA with two seeds, without Full-FT and Top; rt-sentences has no largest budget and its middle budget is an "
    "extension. The order puts the main comparison (Stoc, Stoc-lazy, BitFit, LoRA, Full-FT) first."
)
