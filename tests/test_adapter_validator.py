"""One adapter validator (`validation.validate`) for loading, `inspect`, `merge` and `compose`: what the command line
accepts, loading accepts, and `compose` never writes an adapter that does not load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

from peft_stoc.adapter_files import adapter_file, safetensors_header
from peft_stoc.cli import main

from .helpers import predict, tiny_model, train_stoc

HEAD = "base_model.model.classifier.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("validator")
    tiny_model().save_pretrained(root / "base")
    train_stoc(k=40, seed=1).save_pretrained(root / "good")
    train_stoc(k=40, seed=2, steps=2).save_pretrained(root / "other")
    return root


def _copy(root, name):
    target = root / "variants" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "good", target)
    return target


def _file(change):
    def edit(folder):
        path = folder / adapter_file.WEIGHTS_NAME
        with safe_open(str(path), framework="pt") as handle:
            tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
        change(tensors, metadata)
        save_file(tensors, str(path), metadata=metadata)

    return edit


def _config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))

    return edit


def _counts(**changes):
    def change(tensors, metadata):
        metadata[adapter_file.META_COUNTS] = json.dumps(dict(json.loads(metadata[adapter_file.META_COUNTS]), **changes))

    return _file(change)


def _set(key, value):
    return _file(lambda tensors, metadata: tensors.__setitem__(key, value))


def _drop_head(tensors, metadata):
    for key in [k for k in tensors if k.startswith("base_model.model.classifier.")]:
        del tensors[key]


def _word_embeddings(tensors, metadata):
    tensors["base_model.model.bert.embeddings.word_embeddings.weight"] = torch.randn(96, 32)


def _unknown_changed_tensor(tensors, metadata):
    tensors["base_model.model.bert.nothing.weight.stoc_indices"] = torch.tensor([0], dtype=torch.int32)
    tensors["base_model.model.bert.nothing.weight.stoc_delta"] = torch.tensor([1.0])


# Adapters the library refuses to load; every one of them was accepted by `inspect` or composed into an output that
# did not load (exit status 0).
HOSTILE = {
    "an integer head": _set(HEAD, torch.zeros(2, 32, dtype=torch.int64)),
    "a head of 1e300": _set(HEAD, torch.full((2, 32), 1e300, dtype=torch.float64)),
    "a missing head": _file(_drop_head),
    "a head of another shape": _set("base_model.model.classifier.bias", torch.zeros(5)),
    "modules_to_save a string": _config(modules_to_save="classifier"),
    "a full base weight": _file(_word_embeddings),
    "a changed tensor without a shape": _file(_unknown_changed_tensor),
    "k not below the candidates": _config(k=10**9),
    "max_changed below k": _config(max_changed=5),
    "modules_to_save holding a number": _config(modules_to_save=["classifier", 5]),
    "a step count beyond int64 (header)": _counts(step=2**63),
    "a step count beyond int64 (config)": _config(saved_counts={"changed": 3, "step": 2**63}),
    "k per step not below the candidates (header)": _counts(k=10**9),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_what_loading_refuses_inspect_and_compose_refuse_too(saved, tmp_path, capsys, case):
    bad = _copy(saved, case.replace(" ", "_"))
    HOSTILE[case](bad)
    base = tiny_model()
    with pytest.raises((ValueError, TypeError)):
        PeftModel.from_pretrained(base, bad)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    out = tmp_path / "out"
    assert main(["compose", str(bad), str(saved / "good"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_merge_with_a_number_in_modules_to_save_exits_2_with_one_line(saved, tmp_path, capsys):
    """It printed a traceback (a TypeError from PEFT) and exited 1."""
    bad = _copy(saved, "merge_number")
    _config(modules_to_save=["classifier", 5])(bad)
    assert main(["merge", str(saved / "base"), str(bad), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "modules_to_save" in err, err
    assert not (tmp_path / "merged").exists()


def test_composed_adapters_load_and_hold_only_deltas_and_the_head(saved, tmp_path):
    out = tmp_path / "sum"
    assert main(["compose", str(saved / "good"), str(saved / "other"), str(out)]) == 0
    model = PeftModel.from_pretrained(tiny_model(), out)
    assert torch.isfinite(predict(model)).all()
    with safe_open(str(out / adapter_file.WEIGHTS_NAME), framework="pt") as handle:
        others = [k for k in handle.keys() if not adapter_file.is_delta_key(k)]
    assert sorted(others) == ["base_model.model.classifier.bias", HEAD]


def test_a_header_of_many_tensors_for_a_small_base_is_refused_before_it_is_parsed(saved, capsys, monkeypatch):
    """32,760 zero-size tensors took seconds to inspect: the header is now held to the size of the base its own
    fingerprint describes before it is parsed."""
    bad = _copy(saved, "many")

    def many(tensors, metadata):
        for i in range(16_360):
            tensors[f"base_model.model.x{i}.stoc_indices"] = torch.zeros(0, dtype=torch.int32)
            tensors[f"base_model.model.x{i}.stoc_delta"] = torch.zeros(0)

    _file(many)(bad)
    parsed = []
    monkeypatch.setattr(safetensors_header, "_parse_header", lambda raw, path: parsed.append(path))
    assert main(["inspect", str(bad)]) == 2
    assert "Refusing to read it" in capsys.readouterr().err
    assert parsed == []


def test_deeply_nested_json_in_the_metadata_is_refused_in_one_line(saved, capsys):
    """1.9 M JSON arrays hidden in a metadata string: refused by the header's size for its base, and nested JSON
    in a header entry that fits is named, not a RecursionError traceback."""
    for size in (1_900_000, 5_000):
        bad = _copy(saved, f"nested{size}")
        nested = "[" * size + "]" * size
        _file(lambda tensors, metadata, nested=nested: metadata.__setitem__(adapter_file.META_SHAPES, nested))(bad)
        assert main(["inspect", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
