"""The peft-stoc command line: inspect, merge, compose."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from peft_stoc.adapter_files import adapter_file
from peft_stoc.cli import main

from .helpers import predict, tiny_model, train_stoc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model().save_pretrained(root / "base")
    base = AutoModelForSequenceClassification.from_pretrained(root / "base")
    a = train_stoc(base=base, k=40, seed=1, target_modules=["query"])
    a.save_pretrained(root / "a")
    b = train_stoc(k=40, seed=2, target_modules=["value"])
    b.save_pretrained(root / "b")
    return root, a, b


def test_help_for_each_command(capsys):
    for args in (["inspect"], ["merge"], ["compose"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--help"])
        assert exit_info.value.code == 0 and f"usage: peft-stoc {args[0]}" in capsys.readouterr().out
    script = shutil.which("peft-stoc", path=os.path.dirname(sys.executable))
    assert script, "the peft-stoc console script is installed next to the interpreter"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "{inspect,merge,compose}" in result.stdout


def test_inspect_reports_counts_density_fingerprint_size(saved, capsys):
    root, a, _ = saved
    assert main(["inspect", str(root / "a"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    delta = a.base_model.adapter_delta("default")
    assert report["changed"] == delta.num_changed
    assert report["k_entries"] == 40 and report["selection"] == "stochastic"
    assert set(report["tensors"]) == set(delta.tensors)
    for name, row in report["tensors"].items():
        numel = a.base_model.base_params()[name].numel()
        assert row["numel"] == numel and row["density"] == pytest.approx(row["changed"] / numel)
    assert report["file_bytes"] == (root / "a" / "adapter_model.safetensors").stat().st_size
    assert report["fingerprint"]["structure"] and report["fingerprint"]["checksum"]
    assert main(["inspect", str(root / "a")]) == 0
    text = capsys.readouterr().out
    assert f"{delta.num_changed:,} of" in text and "fingerprint" in text and "per tensor:" in text


def test_merge_writes_a_standalone_model(saved, tmp_path):
    root, a, _ = saved
    assert main(["merge", str(root / "base"), str(root / "a"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (predict(merged) - predict(a)).abs().max() <= 1e-6


@pytest.mark.parametrize("order", ["weights before output, as the README shows", "output before weights"])
def test_compose_adds_weighted_deltas(saved, tmp_path, order):
    """`compose a b --weights 1 0.5 out` once failed: --weights took the output folder for a weight."""
    root, a, b = saved
    out = tmp_path / "ab"
    weights = ["--weights", "1", "0.5"]
    if order.startswith("weights before"):
        argv = ["compose", str(root / "a"), str(root / "b"), *weights, str(out)]
    else:
        argv = ["compose", str(root / "a"), str(root / "b"), str(out), *weights]
    assert main(argv) == 0
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(root / "base"), out)
    base = dict(tiny_model().named_parameters())
    da, db = a.base_model.adapter_delta("default"), b.base_model.adapter_delta("default")
    for name, param in model.base_model.base_params().items():
        expected = base[name].detach().clone().view(-1)
        for delta, weight in ((da, 1.0), (db, 0.5)):
            if name in delta.tensors:
                index, values = delta.tensors[name]
                expected[index] += weight * values
        assert torch.allclose(param.detach().view(-1), expected, atol=1e-6), name


def test_compose_refuses_an_output_that_is_one_of_its_inputs(saved, tmp_path, capsys):
    """`compose a b a` overwrote an input, then crashed with SameFileError."""
    root, _, _ = saved
    a = tmp_path / "a"
    shutil.copytree(root / "a", a)
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    for output in (a, tmp_path / "." / "a", tmp_path / "link"):
        if output.name == "link":
            output.symlink_to(a)
        assert main(["compose", str(a), str(root / "b"), str(output)]) == 2
        assert "is the input adapter #1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before


@pytest.mark.parametrize("weights", [["nan", "1"], ["1", "inf"], ["-inf", "1"]])
def test_compose_refuses_non_finite_weights(saved, tmp_path, capsys, weights):
    """`--weights nan 1` exited 0 and wrote an adapter that the loader refuses."""
    root, _, _ = saved
    out = tmp_path / "out"
    assert main(["compose", str(root / "a"), str(root / "b"), "--weights", *weights, str(out)]) == 2
    assert "finite" in capsys.readouterr().err
    assert not out.exists()


def test_compose_refuses_a_sum_that_overflows(saved, tmp_path, capsys):
    root, _, _ = saved
    f16 = _edit_config(root / "a", tmp_path / "f16", save_dtype="float16")
    cases = (
        ([str(root / "a"), str(root / "b")], ["1e300", "1"], "overflows float32"),
        ([str(f16), str(root / "b")], ["1e7", "1"], "as torch.float16"),
    )
    for inputs, weights, message in cases:
        assert main(["compose", *inputs, "--weights", *weights, str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_compose_over_an_existing_adapter_replaces_it_whole(saved, tmp_path):
    root, _, _ = saved
    out = tmp_path / "out"
    shutil.copytree(root / "a", out)
    (out / "notes.txt").write_text("mine")
    assert main(["compose", str(root / "a"), str(root / "b"), str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert adapter_file.read(str(out / adapter_file.WEIGHTS_NAME)).counts["changed"] > 0


def test_inspect_without_counts_reports_what_is_there(saved, tmp_path, capsys):
    root, _, _ = saved
    folder = _edit_header(root / "a", tmp_path / "x", lambda t, m: m.pop(adapter_file.META_COUNTS))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "entries per step" in out and "of ? candidate entries (?)" in out


def _edit_config(source, target, **changes):
    shutil.copytree(source, target)
    path = target / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return target


def _write_config(source, target, text):
    shutil.copytree(source, target)
    (target / "adapter_config.json").write_text(text)
    return target


def _edit_header(source, target, change):
    shutil.copytree(source, target)
    path = target / adapter_file.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return target


def _set_meta(key, value):
    return lambda tensors, metadata: metadata.__setitem__(key, value)


def _head_of(size):
    """An adapter trained with a head of `size` outputs (its header records the head it holds)."""

    def change(tensors, metadata):
        tensors["base_model.model.classifier.weight"] = torch.zeros(size, 32)
        tensors["base_model.model.classifier.bias"] = torch.zeros(size)
        metadata[adapter_file.META_HEADS] = adapter_file.heads_entry(tensors)

    return change


FP = adapter_file.META_FINGERPRINT
# name -> (arguments given the fixture's root and a scratch folder, what the one error line must say)
BAD_INPUTS = {
    "inspect: no such folder": (lambda r, t: ["inspect", str(t / "nowhere")], "does not exist"),
    "inspect: a file": (lambda r, t: ["inspect", str(r / "a" / "README.md")], "is a file, not a folder"),
    "inspect: no config": (lambda r, t: ["inspect", str(t)], "adapter_config.json is missing"),
    "inspect: config not JSON": (
        lambda r, t: ["inspect", str(_write_config(r / "a", t / "x", "{oops"))],
        "is not valid JSON",
    ),
    "inspect: config a JSON list": (
        lambda r, t: ["inspect", str(_write_config(r / "a", t / "x", "[1, 2]"))],
        "must hold a JSON object, not a JSON list",
    ),
    "inspect: config of another method": (
        lambda r, t: ["inspect", str(_edit_config(r / "a", t / "x", peft_type="LORA"))],
        "LORA adapter, not a StocTuning",
    ),
    "inspect: no weights": (
        lambda r, t: [
            "inspect",
            str(
                _write_config(r / "a", t / "x", '{"peft_type": "STOC"}').joinpath("adapter_model.safetensors").unlink()
                or t / "x"
            ),
        ],
        "No adapter file",
    ),
    "inspect: truncated weights": (lambda r, t: ["inspect", str(_truncated(r / "a", t / "x"))], "truncated or corrupt"),
    "inspect: hostile header": (lambda r, t: ["inspect", str(_huge_header(r / "a", t / "x"))], "Refusing to read it"),
    "inspect: not our format": (
        lambda r, t: ["inspect", str(_edit_header(r / "a", t / "x", lambda _, m: m.clear()))],
        "not a peft-stoc adapter file",
    ),
    "inspect: fingerprint not JSON": (
        lambda r, t: ["inspect", str(_edit_header(r / "a", t / "x", _set_meta(FP, "{")))],
        "'peft_stoc_fingerprint' is not valid JSON",
    ),
    "inspect: fingerprint a list": (
        lambda r, t: ["inspect", str(_edit_header(r / "a", t / "x", _set_meta(FP, "[]")))],
        "must be a JSON object, got a JSON list",
    ),
    "inspect: fingerprint of nulls": (
        lambda r, t: [
            "inspect",
            str(_edit_header(r / "a", t / "x", _set_meta(FP, '{"structure": null, "checksum": "x"}'))),
        ],
        "needs a string 'structure'",
    ),
    "inspect: counts a list": (
        lambda r, t: ["inspect", str(_edit_header(r / "a", t / "x", _set_meta(adapter_file.META_COUNTS, "[3]")))],
        "'peft_stoc_counts' must be a JSON object",
    ),
    "inspect: no arguments": (lambda r, t: ["inspect"], "the following arguments are required: adapter"),
    "no command": (lambda r, t: [], "the following arguments are required: command"),
    "unknown command": (lambda r, t: ["squash"], "invalid choice: 'squash'"),
    "compose: output is an input": (
        lambda r, t: ["compose", str(r / "a"), str(r / "b"), str(r / "b")],
        "is the input adapter #2",
    ),
    "compose: NaN weight": (
        lambda r, t: ["compose", str(r / "a"), str(r / "b"), "--weights", "nan", "1", str(t / "o")],
        "Weights must be finite numbers",
    ),
    "compose: weight not a number": (
        lambda r, t: ["compose", str(r / "a"), str(r / "b"), "--weights", "x", "y", str(t / "o")],
        "--weights needs numbers, got 'x'",
    ),
    "compose: too few weights": (
        lambda r, t: ["compose", str(r / "a"), str(r / "b"), str(t / "o"), "--weights", "1"],
        "2 adapters but 1 weights",
    ),
    "compose: no output": (
        lambda r, t: ["compose", str(r / "a"), str(r / "b"), "--weights", "1", "1"],
        "needs the output folder",
    ),
    "compose: one adapter": (lambda r, t: ["compose", str(r / "a"), str(t / "o")], "at least two adapters"),
    "compose: output is a file": (
        lambda r, t: ["compose", str(r / "a"), str(r / "b"), str(r / "a" / "README.md")],
        "is a file, not a folder",
    ),
    "compose: no fingerprint": (
        lambda r, t: [
            "compose",
            str(_edit_header(r / "a", t / "x", lambda _, m: m.pop(FP))),
            str(r / "b"),
            str(t / "o"),
        ],
        "no base-model fingerprint",
    ),
    "compose: bad regex in a config": (
        lambda r, t: [
            "compose",
            str(_edit_config(r / "a", t / "x", target_modules="(query")),
            str(r / "b"),
            str(t / "o"),
        ],
        "`target_modules` is not a valid regular expression",
    ),
    "compose: an input missing": (
        lambda r, t: ["compose", str(r / "a"), str(t / "nowhere"), str(t / "o")],
        "does not exist",
    ),
    "merge: head of another size": (
        lambda r, t: ["merge", str(r / "base"), str(r / "a"), str(t / "m"), "--num-labels", "7"],
        "--num-labels 7 does not match",
    ),
    "merge: zero labels": (
        lambda r, t: ["merge", str(r / "base"), str(r / "a"), str(t / "m"), "--num-labels", "0"],
        "--num-labels must be at least 1",
    ),
    "merge: labels not a number": (
        lambda r, t: ["merge", str(r / "base"), str(r / "a"), str(t / "m"), "--num-labels", "x"],
        "invalid int value: 'x'",
    ),
    "merge: no base": (
        lambda r, t: ["merge", str(t / "nowhere"), str(r / "a"), str(t / "m")],
        "Cannot load the base model",
    ),
    "merge: output is the adapter": (
        lambda r, t: ["merge", str(r / "base"), str(r / "a"), str(r / "a")],
        "is the adapter folder",
    ),
    "merge: output is the base": (
        lambda r, t: ["merge", str(r / "base"), str(r / "a"), str(r / "base")],
        "is the base model",
    ),
    "merge: adapter for a bigger head": (
        lambda r, t: [
            "merge",
            str(r / "base"),
            str(_edit_header(r / "a", t / "x", _head_of(3))),
            str(t / "m"),
            "--num-labels",
            "2",
        ],
        "does not match",
    ),
    "merge: corrupt adapter": (
        lambda r, t: ["merge", str(r / "base"), str(_truncated(r / "a", t / "x")), str(t / "m")],
        "truncated or corrupt",
    ),
}


def _truncated(source, target):
    shutil.copytree(source, target)
    path = target / adapter_file.WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:100])
    return target


def _huge_header(source, target):
    shutil.copytree(source, target)
    (target / adapter_file.WEIGHTS_NAME).write_bytes((40 * 2**20).to_bytes(8, "little") + b"{" * 4096)
    return target


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_exits_2_with_one_line(saved, tmp_path, capsys, case):
    root, _, _ = saved
    arguments, message = BAD_INPUTS[case]
    argv = arguments(root, tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # usage errors, from argparse
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("peft-stoc") and "Traceback" not in err, err
    assert message in err, err


def test_useful_errors(saved, tmp_path, capsys):
    root, _, _ = saved
    assert main(["inspect", str(tmp_path)]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert main(["compose", str(root / "a"), str(root / "b"), str(tmp_path / "x"), "--weights", "1"]) == 2
    assert "2 adapters but 1 weights" in capsys.readouterr().err
    other = train_stoc(k=40, model_seed=3)
    other.save_pretrained(tmp_path / "other")
    assert main(["compose", str(root / "a"), str(tmp_path / "other"), str(tmp_path / "y")]) == 2
    assert "different base models" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "nowhere"), str(root / "a"), str(tmp_path / "z")]) == 2
    assert "Cannot load the base model" in capsys.readouterr().err


def test_merge_uses_the_adapters_head_size_over_the_bases(saved, tmp_path):
    """The adapter's task head replaces the base's, so a base whose own head has another size still merges."""
    root, _, _ = saved
    three = _edit_header(root / "a", tmp_path / "three", _head_of(3))
    assert main(["merge", str(root / "base"), str(three), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.classifier.weight.shape == (3, 32)
