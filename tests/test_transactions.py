"""Attaching an adapter is a transaction: checks first, and any failure leaves the caller's model as it was.

Every entry point (get_peft_model, PeftModel.from_pretrained, inject_adapter_in_model, add_adapter, load_adapter,
add_weighted_adapter) checks names with one function, and whatever a failed call attached is detached.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file

import peft_stoc
from peft_stoc.adapter_files import adapter_file

from .helpers import batch, tiny_model, train_stoc

BAD_NAMES = ["a/b", "\\", "a\0b", "/abs/olute", "..", "", "training", "forward", "x.y", None]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transactions")
    train_stoc(k=40, steps=2).save_pretrained(folder)
    return folder


def _state(module):
    """Everything about a model that attaching an adapter could change."""
    return {
        "modules": [(n, type(m).__name__, id(m)) for n, m in module.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
        "tensor_hooks": sum(
            len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) + len(p._backward_hooks or {})
            for p in module.parameters()
        ),
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "attributes": sorted(vars(module)),
    }


def _assert_same(before, after):
    for key in ("modules", "hooks", "tensor_hooks", "requires_grad", "attributes"):
        assert before[key] == after[key], key
    assert before["state_dict"].keys() == after["state_dict"].keys()
    assert all(torch.equal(v, after["state_dict"][k]) for k, v in before["state_dict"].items())


def _trains_as_a_plain_model(base, before):
    """A plain loss.backward() and optimizer step move nearly every parameter."""
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    base(**batch()).loss.backward()
    optimizer.step()
    moved = sum(int((p != before["state_dict"][n]).sum()) for n, p in base.named_parameters())
    assert moved > 0.5 * sum(p.numel() for p in base.parameters())


def _edited(saved, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return folder


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_from_pretrained_with_a_bad_adapter_name_leaves_the_base_as_it_was(saved, name):
    """With "a/b" every parameter ended frozen, the head wrapped, a `stoc_tuning` child and a forward hook left
    behind; with "..", "", "training" or "forward" the child, an extra state_dict key and the hook."""
    base = tiny_model()
    before = _state(base)
    with pytest.raises(ValueError, match="Adapter name"):
        PeftModel.from_pretrained(base, saved, adapter_name=name)
    _assert_same(before, _state(base))
    _trains_as_a_plain_model(base, before)


CONFIGS_PEFT_REFUSES = {
    "k not below the candidates": ({"k": 10**9}, "candidate entries"),
    "max_changed below k": ({"max_changed": 5}, "max_changed"),
    "target_modules matching nothing": ({"target_modules": ["nothing_here"]}, "No candidate parameters"),
    "modules_to_save holding a number": ({"modules_to_save": ["classifier", 5]}, "modules_to_save"),
    "modules_to_save a string": ({"modules_to_save": "classifier"}, None),
    "a step count beyond int64": ({"saved_counts": {"step": 2**63, "changed": 10}}, "saved_counts"),
    "a negative count": ({"saved_counts": {"changed": -1}}, "saved_counts"),
    "counts of another kind": ({"saved_counts": {"changed": "many"}}, "saved_counts"),
}


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("case", list(CONFIGS_PEFT_REFUSES))
def test_from_pretrained_with_a_config_refused_while_attaching_leaves_the_base_as_it_was(
    saved, tmp_path, case, trainable
):
    changes, message = CONFIGS_PEFT_REFUSES[case]
    folder = _edited(saved, tmp_path, **changes)
    base = tiny_model()
    before = _state(base)
    with pytest.raises((ValueError, TypeError), match=message):
        PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    _assert_same(before, _state(base))
    _trains_as_a_plain_model(base, before)


@pytest.mark.parametrize("name", ["a/b", "..", "training", ""])
def test_every_entry_point_refuses_a_bad_name_before_attaching_anything(saved, name):
    config = peft_stoc.StocTuningConfig(task_type="SEQ_CLS", k=30)
    for attach in (
        lambda base: get_peft_model(base, config, adapter_name=name),
        lambda base: inject_adapter_in_model(config, base, adapter_name=name),
    ):
        base = tiny_model()
        before = _state(base)
        with pytest.raises(ValueError, match="Adapter name"):
            attach(base)
        _assert_same(before, _state(base))
    model = PeftModel.from_pretrained(tiny_model(), saved, is_trainable=True)
    model.add_adapter("other", peft_stoc.StocTuningConfig(task_type="SEQ_CLS", k=30))
    before = _state(model)
    tables = (list(model.peft_config), list(model.base_model.stoc_state.stoc_adapters))
    for attach in (
        lambda: model.add_adapter(name, peft_stoc.StocTuningConfig(task_type="SEQ_CLS", k=30)),
        lambda: model.load_adapter(saved, adapter_name=name),
        lambda: model.add_weighted_adapter(["default", "other"], [1.0, 0.5], name),
    ):
        with pytest.raises(ValueError, match="Adapter name"):
            attach()
        _assert_same(before, _state(model))
        assert (list(model.peft_config), list(model.base_model.stoc_state.stoc_adapters)) == tables


@pytest.mark.parametrize(
    "config", [{"k": 10**8}, {"target_modules": ["nothing_here"]}, {"k": 40, "max_changed": 5}], ids=str
)
def test_a_second_adapter_peft_refuses_while_attaching_leaves_the_model_as_it_was(saved, config):
    model = PeftModel.from_pretrained(tiny_model(), saved, is_trainable=True).eval()
    before = _state(model)
    logits = model(**batch()).logits
    with pytest.raises(ValueError):
        model.add_adapter("second", peft_stoc.StocTuningConfig(task_type="SEQ_CLS", **config))
    _assert_same(before, _state(model))
    assert list(model.peft_config) == ["default"]
    assert torch.equal(model(**batch()).logits, logits)


def _with_header_step(folder, step: int) -> None:
    """The step count in the file's header set to `step`."""
    path = folder / adapter_file.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    counts = json.loads(metadata[adapter_file.META_COUNTS])
    metadata[adapter_file.META_COUNTS] = json.dumps(dict(counts, step=step))
    save_file(tensors, str(path), metadata=metadata)


def test_a_step_count_beyond_int64_in_the_file_header_is_refused_before_anything_changes(saved, tmp_path):
    """A file whose counts state dicts cannot store (int64) loaded and trained, then could not be saved."""
    folder = tmp_path / "header"
    shutil.copytree(saved, folder)
    _with_header_step(folder, 2**63)
    base = tiny_model()
    before = _state(base)
    with pytest.raises(adapter_file.AdapterFileError, match="peft_stoc_counts"):
        PeftModel.from_pretrained(base, folder, is_trainable=True)
    _assert_same(before, _state(base))


def test_a_large_but_valid_step_count_loads_trains_and_saves(saved, tmp_path):
    step = 2**62
    counts = json.loads((saved / "adapter_config.json").read_text())["saved_counts"]
    folder = _edited(saved, tmp_path, saved_counts=dict(counts, step=step))
    _with_header_step(folder, step)  # (a load takes the count from the file it reads)
    model = PeftModel.from_pretrained(tiny_model(), folder, is_trainable=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch()).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["saved_counts"]["step"] == step + 1


def test_modules_to_save_does_not_grow_over_save_load_round_trips(saved, tmp_path):
    """PEFT appends ["classifier", "score"] to modules_to_save each time a SEQ_CLS config is attached; the list grew
    at every save -> load, and add_weighted_adapter then refused a reloaded and a fresh adapter."""
    folder = saved
    for round_trip in range(3):
        model = PeftModel.from_pretrained(tiny_model(), folder, is_trainable=True)
        assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
        folder = tmp_path / f"round{round_trip}"
        model.save_pretrained(folder)
        assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    model.add_adapter("fresh", peft_stoc.StocTuningConfig(task_type="SEQ_CLS", k=30))
    assert model.peft_config["fresh"].modules_to_save == ["classifier", "score"]
    model.add_weighted_adapter(["default", "fresh"], [1.0, 1.0], "both")
    model.load_adapter(saved, adapter_name="reloaded")
    model.add_weighted_adapter(["reloaded", "fresh"], [1.0, 1.0], "both_again")
    assert model.peft_config["reloaded"].modules_to_save == ["classifier", "score"]


def test_a_failed_load_forgets_the_step_count_and_the_check_it_noted(tmp_path):
    from peft_stoc import StocTuningConfig as Config

    from .helpers import train_stoc

    train_stoc(k=40, steps=5).save_pretrained(tmp_path / "five")
    model = get_peft_model(tiny_model(), Config(k=40, task_type="SEQ_CLS"))
    with pytest.raises(RuntimeError):
        model.load_adapter(tmp_path / "five", adapter_name="x", torch_device="cuda:3")  # fails after validation
    tuner = model.base_model
    assert tuner.load_notes("x") == (None, None)
    model.add_adapter("x", Config(k=40, task_type="SEQ_CLS"))
    assert tuner.is_fresh("x")
