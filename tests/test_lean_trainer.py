"""Memory-lean training through transformers Trainer: clipping, accumulation and checkpoint resume."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peft_stoc import StocTuningConfig

from .helpers import tiny_model
from .test_trainer import _Rows

ROOT = Path(__file__).resolve().parent.parent


def _trainer_run(tmp_path, memory, **overrides):
    # A wide initialisation gives gradient norms above Trainer's default max_grad_norm=1.0, so clipping acts.
    base = tiny_model(initializer_range=0.5)
    model = get_peft_model(base, StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory, selection="top"))
    defaults = dict(
        output_dir=str(tmp_path / memory),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        weight_decay=0.01,
    )
    defaults.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**defaults), train_dataset=_Rows(n=48))
    trainer.train()
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return model, norms


def _assert_close(a, b, tolerance=1e-6):
    for key, value in a.state_dict().items():
        scale = float(value.abs().max()) or 1.0
        assert float((value - b.state_dict()[key]).abs().max()) <= tolerance * scale, key


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_trainer_lean_equals_dense_with_default_clipping(tmp_path, accumulation):
    # Trainer clips at max_grad_norm=1.0 by default; a large learning rate makes the norms exceed it.
    kwargs = dict(gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // min(accumulation, 2))
    dense, dense_norms = _trainer_run(tmp_path, "dense", **kwargs)
    lean, lean_norms = _trainer_run(tmp_path, "auto", **kwargs)
    assert len(dense_norms) == 6 and max(dense_norms) > 1.0
    assert lean_norms == pytest.approx(dense_norms, rel=1e-6)
    _assert_close(dense, lean)
    assert lean.stoc_stats()["optimizer_state_bytes"] < dense.stoc_stats()["optimizer_state_bytes"] / 10


def _run_worker(out: Path, memory: str, selection: str, checkpoint: Path | None = None) -> None:
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1"
    )
    command = [sys.executable, "-m", "tests.resume_worker", str(out), memory, selection]
    if checkpoint is not None:
        command.append(str(checkpoint))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("selection", ["top", "stochastic"])
def test_trainer_resume_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path, selection):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run_worker(whole, "auto", selection)
    _run_worker(resumed, "auto", selection, checkpoint=whole / "checkpoint-5")
    a, b = load_file(whole / "state.safetensors"), load_file(resumed / "state.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for folder in (whole, resumed):
        with safe_open(folder / "state.safetensors", "pt") as f:
            assert f.metadata()["step"] == "10"
    adapter_a = load_file(whole / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
