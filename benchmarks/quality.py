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

This module runs the study; the grid rule and the comparison of seeds are in `benchmarks/cells.py`, the variants and
stages in `benchmarks/quality_plan.py`, the report in `benchmarks/quality_report.py`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# OpenMP threads that spin while they wait make a shared CPU crawl (10x slower per step measured here with other
# jobs running); passive waiting costs nothing on an idle machine. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import causal_quality  # noqa: E402
from benchmarks.cells import chosen_rate, next_rates  # noqa: E402
from benchmarks.quality_plan import STAGES, VARIANTS, Stage, cell_runs, centre, matching, plan_rows  # noqa: E402
from benchmarks.quality_report import table, write_report  # noqa: E402
from examples.glue import RunConfig, read_results, run_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
        mask_interval=v.mask_interval,
    )


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
