"""A cell's learning-rate grid and its seeds: the rules both quality studies share.

A *cell* is one method (or variant) trained on one task at one budget. Its learning rate is chosen on seed 0 from a
half-decade ladder: a first grid of a few rates around a centre, grown by one rate past whichever edge holds the
best until the best lies inside; the other seeds then train at that rate, and cells are compared by `gap`.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

LADDER = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


# -- the learning-rate grid ----------------------------------------------------------------------------------------
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


# -- seeds ---------------------------------------------------------------------------------------------------------
def sample_std(values: list[float]) -> float:
    """Standard deviation over seeds with Bessel's correction (0 for a single seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def gap(a: dict, b: dict) -> str:
    """'a − b' with a verdict: clear when the gap exceeds both standard deviations and ≥ 2 seeds back each side."""
    d = a["mean"] - b["mean"]
    enough = min(len(a["seeds"]), len(b["seeds"])) >= 2
    clear = enough and abs(d) > max(a["std"], b["std"])
    verdict = ("ahead" if d > 0 else "behind") if clear else "within the seeds' spread"
    return f"{d:+.1f} ({verdict}{'' if enough else ', one seed'})"


# -- text both reports share ---------------------------------------------------------------------------------------
def grid_text(grid: dict[float, float], chosen: float) -> str:
    """A seed-0 grid as 'lr: score, ...' with the chosen rate in bold."""
    return ", ".join(f"**{lr:g}: {s:.1f}**" if lr == chosen else f"{lr:g}: {s:.1f}" for lr, s in grid.items())


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def thread_counts(records: list[dict]) -> str:
    """How many torch threads the runs used, as the runs recorded it."""
    counts = Counter(r.get("torch_threads") for r in records)
    parts = [f"{n} in {counts[n]} runs" for n in sorted(k for k in counts if k)]
    if counts[None]:
        parts.append(f"not recorded in {counts[None]} older runs")
    return "torch threads per run: " + ", ".join(parts)
