"""The peft-stoc command line: inspect, merge, compose."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

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
        numel = a.base_model._base_params()[name].numel()
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


def test_compose_adds_weighted_deltas(saved, tmp_path):
    root, a, b = saved
    out = tmp_path / "ab"
    assert main(["compose", str(root / "a"), str(root / "b"), str(out), "--weights", "1", "0.5"]) == 0
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(root / "base"), out)
    base = dict(tiny_model().named_parameters())
    da, db = a.base_model.adapter_delta("default"), b.base_model.adapter_delta("default")
    for name, param in model.base_model._base_params().items():
        expected = base[name].detach().clone().view(-1)
        for delta, weight in ((da, 1.0), (db, 0.5)):
            if name in delta.tensors:
                index, values = delta.tensors[name]
                expected[index] += weight * values
        assert torch.allclose(param.detach().view(-1), expected, atol=1e-6), name


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
