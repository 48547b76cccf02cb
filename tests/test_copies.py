"""`copy.deepcopy` of a StocTuning model (a reference model, a snapshot, an EMA): the copy computes what the original
computes, trains on its own from the same adapters and step counts, and neither reaches into the other. The same
for `torch.save(model)` loaded in a fresh process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel

from .helpers import batch, predict, state_of, tiny_model, train_stoc

ROOT = Path(__file__).resolve().parent.parent


def _steps(model, steps: range) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in steps:
        torch.manual_seed(2000 + step)
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_copy_trains_on_its_own_and_leaves_the_original_as_it_was():
    original = train_stoc(steps=3)
    expected, weights, stats = predict(original), state_of(original), original.stoc_stats()
    copied = copy.deepcopy(original)
    assert torch.equal(predict(copied), expected)
    _steps(copied, range(3, 5))
    assert copied.stoc_stats()["step"] == 5 and copied.stoc_stats()["changed"] > stats["changed"]
    assert original.stoc_stats() == stats and torch.equal(predict(original), expected)
    assert all(torch.equal(weights[name], value) for name, value in state_of(original).items())


def test_training_the_original_leaves_a_copy_as_it_was():
    original = train_stoc(steps=3)
    copied = copy.deepcopy(original)
    expected, weights = predict(copied), state_of(copied)
    _steps(original, range(3, 5))
    assert original.stoc_stats()["step"] == 5 and copied.stoc_stats()["step"] == 3
    assert not copied.training and torch.equal(predict(copied), expected)
    assert all(torch.equal(weights[name], value) for name, value in state_of(copied).items())


def test_a_copy_continues_exactly_as_the_saved_adapter_does(tmp_path):
    """Both resume from step 3 with a fresh optimizer: the same draws, the same weights."""
    original = train_stoc(steps=3, seed=5)
    original.save_pretrained(tmp_path)
    copied = copy.deepcopy(original)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    _steps(copied, range(3, 6))
    _steps(loaded, range(3, 6))
    assert copied.stoc_stats() == loaded.stoc_stats()
    a, b = copied.base_model.adapter_delta("default").tensors, loaded.base_model.adapter_delta("default").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert torch.equal(predict(copied.eval()), predict(loaded.eval()))


LOAD_PICKLED = """
import json, sys, torch
from tests.helpers import batch, predict

model = torch.load(sys.argv[1], weights_only=False)  # no `import peft_stoc`: the pickle names its classes
expected = torch.load(sys.argv[2])
same = torch.equal(predict(model), expected)
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
model(**batch(seed=7)).loss.backward()
optimizer.step()
changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
print(json.dumps([type(model).__name__, same, model.stoc_stats()["step"], changed]))
"""


def test_torch_save_of_the_whole_model_loads_in_a_fresh_process_and_trains(tmp_path):
    model = train_stoc(steps=3)
    torch.save(model, tmp_path / "model.pt")
    torch.save(predict(model), tmp_path / "expected.pt")
    stats, weights = model.stoc_stats(), state_of(model)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", LOAD_PICKLED, str(tmp_path / "model.pt"), str(tmp_path / "expected.pt")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    name, same, step, changed = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == type(model).__name__ and same and step == 4
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert 0 < changed <= 40 + head  # k entries of the base, and the head: a StocTuning step
    # Pickling left the model as it was, and it trains on.
    assert model.stoc_stats() == stats and all(torch.equal(weights[k], v) for k, v in state_of(model).items())
    _steps(model, range(3, 4))
    assert model.stoc_stats()["step"] == 4
