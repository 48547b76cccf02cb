"""A load validates each thing once: the file's header is read and its tensors validated once, the base fingerprint
compared once, the delta tensors parsed once (the load applies the delta its validation parsed) and each task-head
tensor checked once."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from peft import PeftModel

from peft_stoc.adapter_files import adapter_file, file_checks, fingerprint, validation

from .helpers import tiny_model, train_stoc

# Where each check is looked up when it runs.
CHECKS = {
    "header read": (adapter_file, "read_header"),
    "file validated": (validation, "validate"),
    "fingerprint compared": (fingerprint, "mismatch"),
    "delta parsed": (file_checks, "parse_delta"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("once") / "adapter"
    train_stoc(k=40, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def calls(monkeypatch):
    counted = collections.Counter()

    def counting(label, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            counted[label] += 1
            return function(*args, **kwargs)

        return wrapper

    for label, (module, name) in CHECKS.items():
        monkeypatch.setattr(module, name, counting(label, getattr(module, name)))
    heads = collections.Counter()
    check_head_spec = file_checks.check_head_spec

    def counting_heads(key, *args, **kwargs):
        heads[key] += 1
        return check_head_spec(key, *args, **kwargs)

    monkeypatch.setattr(file_checks, "check_head_spec", counting_heads)
    return counted, heads


def _assert_each_once(calls, heads_in_file):
    counted, heads = calls
    assert dict(counted) == dict.fromkeys(CHECKS, 1)
    assert dict(heads) == dict.fromkeys(heads_in_file, 1)
    counted.clear()
    heads.clear()


def _same(first, second) -> bool:
    return first.tensors.keys() == second.tensors.keys() and all(
        all(torch.equal(x, y) for x, y in zip(first.tensors[n], second.tensors[n])) for n in first.tensors
    )


def test_from_pretrained_and_load_adapter_check_each_thing_once(saved, calls):
    file = adapter_file.read(str(saved / adapter_file.WEIGHTS_NAME))
    heads = [key for key in file.tensors if not adapter_file.is_delta_key(key)]
    assert heads and file.delta().tensors
    calls[0].clear()
    calls[1].clear()

    model = PeftModel.from_pretrained(tiny_model(), saved)
    _assert_each_once(calls, heads)
    model.load_adapter(saved, adapter_name="second")
    _assert_each_once(calls, heads)

    # What the validation parsed is what the load applied, for both adapters.
    tuner = model.base_model
    assert _same(tuner.adapter_delta("default"), file.delta())
    assert _same(tuner.adapter_delta("second"), file.delta())
    step = file.counts["step"]
    assert tuner.load_notes("default") == (step, None) and tuner.load_notes("second") == (step, None)
