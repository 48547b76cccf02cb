"""Bad adapter files and wrong bases: a clear error naming the problem, and the base left untouched."""

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

from peft_stoc.adapter_files import adapter_file

from .helpers import predict, tiny_model, train_stoc

QUERY = "base_model.model.bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    # Only the first query projection is a candidate, so every corruption below hits a known tensor.
    model = train_stoc(k=30, steps=3, target_modules=["layer.0.attention.self.query"])
    model.save_pretrained(folder)
    return folder, predict(model)


def _tensors_and_metadata(folder):
    with safe_open(str(folder / adapter_file.WEIGHTS_NAME), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def _corrupt(good, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    tensors, metadata = _tensors_and_metadata(good)
    change(tensors, metadata)
    save_file(tensors, str(bad / adapter_file.WEIGHTS_NAME), metadata=metadata)
    return bad


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param.detach(), before[name]), name


def _set(key, transform):
    def change(tensors, metadata):
        tensors[key] = transform(tensors[key])

    return change


def _drop(key):
    def change(tensors, metadata):
        del tensors[key]

    return change


CORRUPTIONS = {
    "index out of range": (
        _set(QUERY + ".stoc_indices", lambda t: torch.cat([t[:-1], t.new_tensor([32 * 32])])),
        "outside",
    ),
    "negative index": (_set(QUERY + ".stoc_indices", lambda t: torch.cat([t.new_tensor([-1]), t[1:]])), "outside"),
    "duplicate index": (
        _set(QUERY + ".stoc_indices", lambda t: torch.cat([t[:1], t[:1], t[2:]])),
        "strictly increasing",
    ),
    "float indices": (_set(QUERY + ".stoc_indices", lambda t: t.float()), "int32/int64"),
    "integer values": (_set(QUERY + ".stoc_delta", lambda t: (t * 1e4).int()), "float tensor"),
    "lengths differ": (_set(QUERY + ".stoc_delta", lambda t: t[:-1]), "differ in length"),
    "missing values": (_drop(QUERY + ".stoc_delta"), "stoc_delta' is missing"),
    "missing indices": (_drop(QUERY + ".stoc_indices"), "stoc_indices' is missing"),
    "missing head": (_drop("base_model.model.classifier.weight"), "classifier.weight' .* is missing"),
    "head of wrong shape": (_set("base_model.model.classifier.bias", lambda t: torch.zeros(5)), "classifier.bias"),
    "nan value": (_set(QUERY + ".stoc_delta", lambda t: torch.cat([t[:1] * float("nan"), t[1:]])), "NaN"),
    "inf value": (_set(QUERY + ".stoc_delta", lambda t: torch.cat([t[:1] + float("inf"), t[1:]])), "infinite"),
    "inf in head": (_set("base_model.model.classifier.weight", lambda t: t + float("inf")), "classifier.weight"),
    "unknown tensor": (_set(QUERY.replace("query", "nonexistent") + ".stoc_indices", lambda t: t), "not a candidate"),
}


def _add_unknown(tensors, metadata):
    name = QUERY.replace("query", "nonexistent")
    tensors[name + ".stoc_indices"] = torch.tensor([0], dtype=torch.int32)
    tensors[name + ".stoc_delta"] = torch.tensor([1.0])


CORRUPTIONS["unknown tensor"] = (_add_unknown, "not a candidate")


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_file_raises_and_leaves_base_untouched(good_adapter, tmp_path, case):
    good, _ = good_adapter
    change, message = CORRUPTIONS[case]
    bad = _corrupt(good, tmp_path, change)
    base = tiny_model()
    before = _weights(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, bad)
    _assert_unchanged(base, before)


def test_corrupt_second_adapter_leaves_active_one_applied(good_adapter, tmp_path):
    good, expected = good_adapter
    model = PeftModel.from_pretrained(tiny_model(), good, adapter_name="good")
    before = _weights(model)
    bad = _corrupt(good, tmp_path, CORRUPTIONS["duplicate index"][0])
    with pytest.raises(ValueError, match="strictly increasing"):
        model.load_adapter(bad, adapter_name="bad")
    assert "bad" not in model.peft_config
    _assert_unchanged(model, before)
    assert (predict(model) - expected).abs().max() <= 1e-6


def test_truncated_file(good_adapter, tmp_path):
    good, _ = good_adapter
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    data = (good / adapter_file.WEIGHTS_NAME).read_bytes()
    for cut in (len(data) // 2, 8 + 20, 4):
        (bad / adapter_file.WEIGHTS_NAME).write_bytes(data[:cut])
        base = tiny_model()
        before = _weights(base)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            PeftModel.from_pretrained(base, bad)
        _assert_unchanged(base, before)


def test_file_without_our_header_is_refused(good_adapter, tmp_path):
    good, _ = good_adapter
    bad = _corrupt(good, tmp_path, lambda tensors, metadata: metadata.clear())
    with pytest.raises(ValueError, match="not a peft-stoc adapter file"):
        PeftModel.from_pretrained(tiny_model(), bad)


def test_wrong_base_is_refused_unless_forced(good_adapter):
    good, _ = good_adapter
    other = tiny_model(seed=1)  # same architecture, other weights
    before = _weights(other)
    with pytest.raises(ValueError, match="made for another base model: its values differ"):
        PeftModel.from_pretrained(other, good)
    _assert_unchanged(other, before)
    bigger = tiny_model(hidden_size=48, intermediate_size=64)
    with pytest.raises(ValueError, match="names or shapes differ"):
        PeftModel.from_pretrained(bigger, good)
    forced = PeftModel.from_pretrained(tiny_model(seed=1), good, ignore_base_mismatch=True)
    assert forced.base_model.adapter_delta("default").num_changed > 0


def test_base_in_another_dtype_is_accepted(good_adapter):
    good, expected = good_adapter
    model = PeftModel.from_pretrained(tiny_model().to(torch.bfloat16), good)
    assert model.base_model.adapter_delta("default").num_changed > 0
