"""Sparse-delta adapters: file layout, loading, merge semantics, several adapters, budget."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from peft_stoc.adapter_files import adapter_file

from .helpers import batch, loss_of, predict, tiny_model, train_stoc

REPO = Path(__file__).resolve().parents[1]


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(model, reference: dict[str, torch.Tensor]):
    current = dict(model.named_parameters())
    assert current.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(current[name].detach(), value), name


def test_file_holds_only_changed_entries_and_the_head(tmp_path):
    model = train_stoc(k=40, steps=4)
    model.save_pretrained(tmp_path)
    path = tmp_path / adapter_file.WEIGHTS_NAME
    file = adapter_file.read(str(path))
    delta = model.base_model.adapter_delta("default")
    changed = delta.num_changed
    assert 40 <= changed <= 160
    head = {k: v for k, v in file.tensors.items() if not adapter_file.is_delta_key(k)}
    assert head and all(k.startswith("base_model.model.classifier.") for k in head)  # never full base weights
    exact = 0  # entries whose float32 delta cannot reproduce the trained weight: kept exactly in float64
    for key, tensor in file.tensors.items():
        if key.endswith(adapter_file.INDEX_SUFFIX):
            assert tensor.dtype == torch.int32 and torch.all(tensor[1:] > tensor[:-1])
        elif key.endswith(adapter_file.VALUES_SUFFIX):
            assert tensor.dtype == torch.float32
        elif key.endswith(adapter_file.EXACT_SUFFIX):
            assert tensor.dtype == torch.float64
            exact += tensor.numel()
    assert exact < changed / 4
    head_bytes = sum(t.numel() * t.element_size() for t in head.values())
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert os.path.getsize(path) == 8 + header + 8 * changed + 12 * exact + head_bytes
    assert model.stoc_stats()["adapter_bytes"] == 8 * changed + head_bytes
    assert header <= 4096 + 256 * len(file.tensors)  # a small header: names, offsets, format, fingerprint
    assert file.metadata[adapter_file.META_FORMAT] == "1"
    assert file.counts["changed"] == changed and file.fingerprint["num_tensors"] > 0


def test_save_dtype_and_no_pickle(tmp_path):
    model = train_stoc(k=30, save_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    file = adapter_file.read(str(tmp_path / adapter_file.WEIGHTS_NAME))
    assert {t.dtype for k, t in file.tensors.items() if k.endswith(adapter_file.VALUES_SUFFIX)} == {torch.bfloat16}
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()


def _fresh_process(code: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


@pytest.mark.parametrize(
    "arch, task, auto",
    [("bert", "SEQ_CLS", "AutoPeftModelForSequenceClassification"), ("llama", "CAUSAL_LM", "AutoPeftModelForCausalLM")],
)
def test_fresh_process_load_reproduces_outputs(tmp_path, arch, task, auto):
    import transformers

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model(arch, task).save_pretrained(base_dir)
    auto_base = "AutoModelForSequenceClassification" if task == "SEQ_CLS" else "AutoModelForCausalLM"
    base = getattr(transformers, auto_base).from_pretrained(base_dir)
    model = train_stoc(arch, task, base=base, k=50, steps=3)
    model.save_pretrained(adapter_dir)
    save_file({"expected": predict(model, task)}, str(tmp_path / "expected.safetensors"))
    code = f"""
import peft_stoc
import transformers
from peft import PeftModel, {auto}
from safetensors.torch import load_file
from tests.helpers import predict
expected = load_file(r"{tmp_path / "expected.safetensors"}")["expected"]
base = transformers.{auto_base}.from_pretrained(r"{base_dir}")
model = PeftModel.from_pretrained(base, r"{adapter_dir}")
print(float((predict(model, "{task}") - expected).abs().max()))
model = {auto}.from_pretrained(r"{adapter_dir}")
print(float((predict(model, "{task}") - expected).abs().max()))
"""
    differences = [float(x) for x in _fresh_process(code)[-2:]]
    assert max(differences) <= 1e-6, differences


def test_fresh_process_without_importing_peft_stoc(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model().save_pretrained(base_dir)
    model = train_stoc(k=30)
    model.save_pretrained(adapter_dir)
    save_file({"expected": predict(model)}, str(tmp_path / "expected.safetensors"))
    code = f"""
import sys
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
from safetensors.torch import load_file
from tests.helpers import predict
base = AutoModelForSequenceClassification.from_pretrained(r"{base_dir}")
model = PeftModel.from_pretrained(base, r"{adapter_dir}")
expected = load_file(r"{tmp_path / "expected.safetensors"}")["expected"]
print(float((predict(model) - expected).abs().max()))
"""
    assert float(_fresh_process(code)[-1]) <= 1e-6


def test_resume_training_with_is_trainable(tmp_path):
    model = train_stoc(k=30, steps=2)
    model.save_pretrained(tmp_path)
    loaded_delta = model.base_model.adapter_delta("default")
    resumed = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    engine = resumed.base_model.stoc_engine()
    assert engine is not None and engine.tracker.armed
    assert resumed.stoc_stats()["changed"] == loaded_delta.num_changed
    resumed.train()
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    loss_of(resumed, batch(seed=5)).backward()
    optimizer.step()
    assert engine.draws == 1 and resumed.stoc_stats()["drawn"] == 30
    assert resumed.stoc_stats()["changed"] >= loaded_delta.num_changed
    frozen = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert frozen.base_model.stoc_engine() is None
    assert not any(p.requires_grad for p in frozen.base_model.base_params().values())


def test_merge_and_unload_returns_plain_model_with_same_outputs():
    model = train_stoc(k=40)
    expected = predict(model)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any(type(m).__name__ in ("ModulesToSaveWrapper", "StocTuningState") for m in merged.modules())
    assert not merged._forward_hooks and not merged._forward_pre_hooks
    merged.eval()
    assert torch.equal(predict(merged), expected)
    merged.train()  # no engine left behind: a plain optimizer step changes the merged model freely
    optimizer = torch.optim.SGD(merged.parameters(), lr=0.1)
    loss_of(merged, batch()).backward()
    optimizer.step()


def test_unload_and_disable_adapter_are_bit_exact():
    reference = _base_weights(tiny_model())
    base_output = predict(tiny_model().eval())
    model = train_stoc(k=40)
    adapted = predict(model)
    adapted_state = {n: p.detach().clone() for n, p in model.base_model.base_params().items()}
    with model.disable_adapter():
        assert torch.equal(predict(model), base_output)
    assert torch.equal(predict(model), adapted)
    for name, param in model.base_model.base_params().items():
        assert torch.equal(param.detach(), adapted_state[name])  # the adapter comes back bit for bit
    _assert_same_weights(model.unload(), reference)


def test_merge_adapter_and_unmerge_adapter():
    model = train_stoc("llama", "CAUSAL_LM", k=40)  # no modules_to_save: the whole status is StocTuning's
    expected = predict(model, "CAUSAL_LM")
    model.merge_adapter()
    assert model.get_model_status().merged_adapters == ["default"]
    assert torch.equal(predict(model, "CAUSAL_LM"), expected)
    model.unmerge_adapter()
    assert model.get_model_status().merged_adapters == []
    assert torch.equal(predict(model, "CAUSAL_LM"), expected)
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()


def _two_adapters(tmp_path, **kwargs_b):
    a = train_stoc(k=40, seed=1, **kwargs_b.pop("a", {}))
    b = train_stoc(k=40, seed=2, steps=4, **kwargs_b)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    return model, {"a": predict(a), "b": predict(b)}, (a, b)


def test_hundred_switches_stay_correct_and_leave_base_exact(tmp_path):
    reference = _base_weights(tiny_model())
    model, expected, _ = _two_adapters(tmp_path)
    for i in range(100):
        name = "ab"[i % 2]
        model.set_adapter(name)
        assert (predict(model) - expected[name]).abs().max() <= 1e-6, (i, name)
    _assert_same_weights(model.unload(), reference)


def test_delete_adapter(tmp_path):
    model, expected, _ = _two_adapters(tmp_path)
    model.set_adapter("b")
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        model.delete_adapter("b")
    assert model.active_adapter == "a" and "b" not in model.peft_config
    assert (predict(model) - expected["a"]).abs().max() <= 1e-6


def test_weighted_sum_of_disjoint_adapters_equals_applying_both(tmp_path):
    model, _, (a, b) = _two_adapters(tmp_path, a={"target_modules": ["query"]}, target_modules=["value"])
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    model.set_adapter("ab")
    combined = {n: p.detach().clone() for n, p in model.base_model.base_params().items()}
    model.merge_adapter(["a", "b"])
    both = model.base_model.base_params()
    for name, value in combined.items():
        assert torch.equal(both[name].detach(), value), name
    delta_a, delta_b = a.base_model.adapter_delta("default"), b.base_model.adapter_delta("default")
    assert model.base_model.adapter_delta("ab").num_changed == delta_a.num_changed + delta_b.num_changed


def test_budget_holds_over_a_long_stochastic_run():
    model = train_stoc(k=20, steps=0, max_changed=70, selection="stochastic")
    before = {n: p.detach().clone() for n, p in model.base_model.base_params().items()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        loss_of(model, batch(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.base_model.base_params().items())
        assert changed <= 70, step
        assert model.stoc_stats()["drawn"] == 20
    assert model.stoc_stats()["changed"] == 70  # the budget is used, then draws stay inside it
