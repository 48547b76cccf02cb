"""No path changes the base silently: steps while an adapter is not trained, failed loads, stray trainable
parameters, unconfinable optimizers; and save -> load / switching reproduce trained weights bit for bit."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_stoc import StocTuningConfig
from peft_stoc.adapter_files import adapter_file

from .helpers import batch, predict, tiny_model, train_stoc


def _plain_base_state():
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


def _assert_base_exact(model, reference):
    """The base seen through `unload()` equals `reference` bit for bit."""
    plain = model.unload()
    state = plain.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("memory", ["dense", "lean"])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_step_inside_disable_adapter_is_refused_before_any_change(memory, name):
    reference = _plain_base_state()
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory))
    model.train()
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1)
    model(**batch()).loss.backward()
    with model.disable_adapter():
        with pytest.raises(RuntimeError, match="not being trained"):
            optimizer.step()
    optimizer.step()  # back in the adapter's hands: an ordinary confined step
    assert model.stoc_stats()["step"] == 1
    _assert_base_exact(model, reference)


def _snapshot(module):
    return {
        "modules": {n: type(m).__name__ for n, m in module.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
        "grad_hooks": sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in module.parameters()),
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "attributes": sorted(vars(module)),
    }


def _assert_same(before, after):
    for key in ("modules", "hooks", "grad_hooks", "requires_grad", "attributes"):
        assert before[key] == after[key], key
    assert before["params"].keys() == after["params"].keys()
    assert all(torch.equal(v, after["params"][k]) for k, v in before["params"].items())


@pytest.mark.parametrize("trainable", [True, False])
def test_failed_from_pretrained_leaves_the_callers_base_as_it_was(tmp_path, trainable):
    model = train_stoc(k=40, steps=2)
    model.save_pretrained(tmp_path)
    path = tmp_path / adapter_file.WEIGHTS_NAME
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(adapter_file.INDEX_SUFFIX) and tensors[k].numel() > 1)
    tensors[key] = torch.cat([tensors[key][:1], tensors[key][:-1]])  # a duplicate index
    save_file(tensors, str(path), metadata=metadata)
    base = tiny_model()
    before = _snapshot(base)
    with pytest.raises(adapter_file.AdapterFileError, match="strictly increasing"):
        PeftModel.from_pretrained(base, tmp_path, is_trainable=trainable)
    _assert_same(before, _snapshot(base))
    # The base trains as a plain model again: every parameter moves.
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    base(**batch()).loss.backward()
    optimizer.step()
    moved = sum(int((p != before["params"][n]).sum()) for n, p in base.named_parameters())
    assert moved > 0.5 * sum(p.numel() for p in base.parameters())


def test_failed_load_of_a_second_adapter_removes_only_that_adapter(tmp_path):
    model = train_stoc(k=40, steps=2)
    model.save_pretrained(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "bad" / adapter_file.WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    logits = model(**batch()).logits
    with pytest.raises(adapter_file.AdapterFileError):
        model.load_adapter(tmp_path / "bad", adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert list(model.base_model.stoc_state.stoc_adapters) == ["default"]
    assert torch.equal(model(**batch()).logits, logits)


def test_non_candidate_made_trainable_after_wrapping_is_refused():
    reference = _plain_base_state()
    model = get_peft_model(tiny_model(), StocTuningConfig(k=20, task_type="SEQ_CLS", target_modules=["query"]))
    model.train()
    model.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(**batch()).loss.backward()
    with pytest.raises(RuntimeError, match="word_embeddings.weight' .* would be trained densely"):
        optimizer.step()
    _assert_base_exact(model, reference)


def test_parameters_frozen_before_wrapping_stay_frozen():
    base = tiny_model()
    base.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    frozen = base.bert.embeddings.word_embeddings.weight.detach().clone()
    model = get_peft_model(base, StocTuningConfig(k=40, task_type="SEQ_CLS", selection="top"))
    model.train()
    assert not model.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in range(3):
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.base_model.model.bert.embeddings.word_embeddings.weight, frozen)
    assert model.stoc_stats()["changed"] >= 40
    assert model.unload().bert.embeddings.word_embeddings.weight.requires_grad is False


@pytest.mark.parametrize("name", ["ASGD", "LBFGS"])
def test_optimizers_that_move_every_entry_are_refused_before_stepping(name):
    model = get_peft_model(tiny_model(), StocTuningConfig(k=20, task_type="SEQ_CLS"))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1)
    model(**batch()).loss.backward()
    with pytest.raises(ValueError, match=f"cannot confine {name}"):
        optimizer.step(lambda: model(**batch()).loss) if name == "LBFGS" else optimizer.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_save_load_and_switching_reproduce_trained_weights_bit_for_bit(tmp_path, memory):
    # A large learning rate makes many entries move by more than their own size, where a float32 delta added to
    # the original lands one rounding step off: those keep an exact float64 delta.
    model = train_stoc(k=60, steps=6, lr=0.05, memory=memory)
    trained = {n: p.detach().clone() for n, p in model.base_model.base_params().items()}
    head = {k: v.clone() for k, v in model.state_dict().items() if "modules_to_save" in k}
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "a")
    for name, param in loaded.base_model.base_params().items():
        assert torch.equal(param.detach(), trained[name]), name
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in head.items())
    # Switching away and back, many times, lands on the same bits.
    loaded.load_adapter(tmp_path / "a", adapter_name="twin")
    for _ in range(5):
        loaded.set_adapter("twin")
        loaded.set_adapter("default")
    for name, param in loaded.base_model.base_params().items():
        assert torch.equal(param.detach(), trained[name]), name


def test_an_adapter_with_exact_deltas_in_every_tensor_loads(tmp_path):
    # The most entries a file can have: indices, deltas and exact deltas with their positions for every tensor.
    from peft_stoc.tuner.delta import SparseDelta

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    tuner = model.base_model
    tensors = {}
    for name, param in tuner.base_params().items():
        index = torch.tensor([0, param.numel() - 1])
        values = torch.tensor([0.1 + 1e-12, -0.2 - 1e-12], dtype=torch.float64)  # not float32 numbers
        tensors[name] = (index, values)
    tuner.set_adapter_delta("default", SparseDelta(tensors))
    expected = predict(model.eval())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / adapter_file.WEIGHTS_NAME)
    assert sum(k.endswith(adapter_file.EXACT_SUFFIX) for k in saved) == len(tensors)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(predict(loaded), expected)
