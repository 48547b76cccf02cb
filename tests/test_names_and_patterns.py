"""Adapter names and module patterns are checked up front, with a message naming the problem."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import peft_stoc
from peft_stoc.adapter_files import adapter_file

from .helpers import tiny_model, train_stoc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("named")
    train_stoc(k=30).save_pretrained(folder)
    return folder


def _tables(model):
    tuner = model.base_model
    return (
        list(model.peft_config),
        list(tuner.stoc_state.stoc_adapters),
        list(tuner._adapters),
    )


@pytest.mark.parametrize("name", ["x.y", "../x", "", "/tmp/elsewhere", "a/b", "a\\b", None])
def test_load_adapter_with_a_bad_name_is_refused_before_anything_is_touched(saved, name):
    """`load_adapter(..., adapter_name="x.y")` raised a bare KeyError and left entries in the tuner's tables."""
    model = PeftModel.from_pretrained(tiny_model(), saved)
    tables = _tables(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Adapter name"):
        model.load_adapter(saved, adapter_name=name)
    assert _tables(model) == tables
    assert all(torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("where", ["absolute", "nested", "backslash"])
def test_an_adapter_name_that_would_leave_the_save_folder_is_refused_when_added(saved, tmp_path, where):
    """An adapter named like an absolute path was saved outside the save folder; such a name is now refused where
    it enters, so nothing can be saved under it."""
    name = {"absolute": str(tmp_path / "outside"), "nested": "sub/outside", "backslash": "a\\b"}[where]
    model = PeftModel.from_pretrained(tiny_model(), saved)
    tables = _tables(model)
    with pytest.raises(ValueError, match="Adapter name .* contains"):
        model.add_adapter(name, peft_stoc.StocTuningConfig(task_type="SEQ_CLS", k=30))
    assert _tables(model) == tables
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "out" / "sub").exists()


def test_good_names_still_save_into_subfolders(saved, tmp_path):
    model = PeftModel.from_pretrained(tiny_model(), saved)
    model.load_adapter(saved, adapter_name="second-one")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second-one" / adapter_file.WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value", ["(query", "[a-", "*x"])
def test_bad_regex_in_module_patterns_names_the_field(field, value):
    """A bad regex raised a bare re.error, only once candidates were searched."""
    with pytest.raises(ValueError, match=f"`{field}` is not a valid regular expression"):
        peft_stoc.StocTuningConfig(**{field: value})


def test_module_lists_must_hold_names():
    with pytest.raises(ValueError, match="`target_modules` must list module names as strings"):
        peft_stoc.StocTuningConfig(target_modules=["query", 3])
