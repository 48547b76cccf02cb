"""`copy.deepcopy` of a StocTuning model (a reference model, a snapshot, an EMA): the copy computes what the original
computes, trains on its own from the same adapters and step counts, and neither reaches into the other."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel

from .helpers import batch, predict, state_of, tiny_model, train_stoc


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
