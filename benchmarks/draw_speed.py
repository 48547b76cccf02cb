"""Target 1: the draw (importance + exact stochastic draw over every candidate entry) next to numpy's
`choice(n, k, replace=False, p=p)` and next to a full fine-tuning step of the same model.

    python benchmarks/draw_speed.py [--model roberta-base] [--k 0.0008] [--repeats 5] [--numpy-repeats 3]
                                   [--step-repeats 3] [--threads N] [--device cpu|cuda] [--no-write]
                                   [--baseline DIR]

The gradients and μ come from one real forward/backward of a 16 × 128 batch (so embedding rows of absent tokens
have no gradient). Timed, interleaved: the fast draw (`strategy="fast"`, the default), the dense draw (a key per
entry, the previous implementation), numpy's choice on the same importance (p precomputed: only `choice` is
timed), `top`, and a full fine-tuning step (forward + backward + AdamW) of the same model. `--baseline DIR` also
times, interleaved, the fast draw of an earlier version of the package copied to DIR/peft_stoc_before (with an empty
`__init__.py`), for a before/after ratio measured in one run.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time

import common
import numpy as np
import torch
from peft import get_peft_model

import peft_stoc
from peft_stoc.sampling.selection import Source, draw, importance


def prepare(model_name: str, k: float, device: str):
    """A StocTuning model after one forward/backward, its sources, and a full fine-tuning step of a copy."""
    torch.manual_seed(0)
    base, description = common.MODELS[model_name]()
    full = copy.deepcopy(base).to(device).train()
    stoc = get_peft_model(base.to(device), peft_stoc.StocTuningConfig(k=k, task_type="SEQ_CLS", memory="dense")).train()
    engine = stoc.base_model.stoc_engine()
    batch = common.zipf_batch(base.config.vocab_size, device=device)
    stoc(**batch).loss.backward()
    sources = [Source(c.param, c.param.grad, engine.tracker.means(c)) for c in engine.candidates]
    optimizer = torch.optim.AdamW(full.parameters(), lr=1e-5, eps=1e-6)

    def full_step():
        full(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return description, engine, sources, full_step


def numpy_probabilities(sources: list[Source]) -> np.ndarray:
    """p = I² / ΣI² over every candidate entry, float64, as the paper's implementation builds it."""
    parts = []
    for source in sources:
        if source.grad is None:
            parts.append(torch.zeros(source.numel, dtype=torch.float64))
        else:
            rows = source.param.shape[0] if source.param.dim() else 1
            parts.append(importance(source, slice(0, rows)).double().cpu())
    weight = torch.cat(parts).square_()
    return (weight / weight.sum()).numpy()


def measure(
    model_name: str = "roberta-base",
    k: float = 0.0008,
    device: str = "cpu",
    repeats: int = 5,
    numpy_repeats: int = 3,
    step_repeats: int = 3,
    baseline: str | None = None,
) -> dict:
    description, engine, sources, full_step = prepare(model_name, k, device)
    count = engine.k
    generator = torch.Generator(device=device).manual_seed(0)
    p = numpy_probabilities(sources)
    rng = np.random.RandomState(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {
        "full fine-tuning step": (full_step, step_repeats),
        "draw (fast, stochastic)": (lambda: draw(sources, count, "stochastic", generator), repeats),
        "draw (fast, top)": (lambda: draw(sources, count, "top", generator), repeats),
        "draw (dense: a key per entry)": (
            lambda: draw(sources, count, "stochastic", generator, strategy="dense"),
            repeats,
        ),
        "numpy.random.choice(p=…, replace=False)": (
            lambda: rng.choice(len(p), count, replace=False, p=p),
            numpy_repeats,
        ),
    }
    if baseline is not None:
        sys.path.insert(0, baseline)
        try:  # the package's layout: sampling/ since the subpackages, flat before
            before = importlib.import_module("peft_stoc_before.sampling.selection")
        except ModuleNotFoundError:
            before = importlib.import_module("peft_stoc_before.selection")
        runs["draw (fast, stochastic), baseline"] = (
            lambda: before.draw(sources, count, "stochastic", generator),
            repeats,
        )
    times = {name: [] for name in runs}
    for round_ in range(1 + max(n for _, n in runs.values())):  # round 0 warms up
        for name, (run, wanted) in runs.items():
            if round_ and len(times[name]) >= wanted:
                continue
            sync()
            start = time.perf_counter()
            run()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {
        "description": description,
        "entries": sum(s.numel for s in sources),
        "nonzero": int((p > 0).sum()),
        "k": count,
        "times": times,
        "medians": {name: common.median(values) for name, values in times.items()},
    }


def report(result: dict, title: str) -> str:
    m = result["medians"]
    fast, step = m["draw (fast, stochastic)"], m["full fine-tuning step"]
    numpy_time = m["numpy.random.choice(p=…, replace=False)"]
    rows = [
        [name, len(result["times"][name]), f"{value:.3f}", f"{value / step:.4f}", f"{value / fast:.1f}"]
        for name, value in m.items()
    ]
    speedup, share = numpy_time / fast, fast / step
    targets = common.table(
        ["target", "measured", "met"],
        [
            ["fast draw ≥ 10× faster than numpy's choice", f"{speedup:.1f}×", "yes" if speedup >= 10 else "**no**"],
            ["fast draw ≤ 10% of a full fine-tuning step", f"{100 * share:.1f}%", "yes" if share <= 0.10 else "**no**"],
        ],
    )
    return "\n".join(
        [
            f"### {title}: {result['description']}",
            "",
            f"`{common.command()}` — {common.today()}; {common.machine()}.",
            f"{result['entries'] / 1e6:.1f}M candidate entries ({result['nonzero'] / 1e6:.1f}M with non-zero "
            f"importance), k = {result['k']}, batch 16 × 128. numpy times `choice` alone, p precomputed.",
            "",
            targets,
            "",
            common.table(["run", "repeats", "median s", "÷ full step", "÷ fast draw"], rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="roberta-base", choices=sorted(common.MODELS))
    parser.add_argument("--k", type=float, default=0.0008, help="fraction of the candidate entries drawn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--numpy-repeats", type=int, default=3)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--baseline", default=None, help="folder holding an earlier copy as peft_stoc_before")
    args = parser.parse_args()
    common.quiet(args.threads)
    result = measure(
        args.model, args.k, args.device, args.repeats, args.numpy_repeats, args.step_repeats, args.baseline
    )
    text = report(result, "Selection (draw speed)")
    print(text)
    if not args.no_write:
        common.write_section(f"selection-{args.model}-{args.device}-threads{torch.get_num_threads()}", text)


if __name__ == "__main__":
    main()
