"""PEFT's adapter API as users call it: model cards that run as written, bases in another dtype, statistics per
adapter, weighted combinations, merging one adapter after another, the merge command on a base without tokenizer."""

import re
import warnings

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from peft_stoc import StocTuningConfig
from peft_stoc.cli import main as cli_main

from .helpers import batch, predict, tiny_model, train_stoc
from .test_integration_paths import _outputs, _task_models


@pytest.mark.parametrize("name, task, build, inputs", _task_models(), ids=[t[0] for t in _task_models()])
def test_model_card_usage_runs_as_written(tmp_path, name, task, build, inputs):
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "base")
    auto = transformers.AutoModel if task is None else None
    base = (auto or transformers.AutoConfig).from_pretrained(tmp_path / "base")  # only to check it loads
    del base
    loaded_base = _load_saved_base(tmp_path / "base", task)
    extra = {} if task is not None else {"modules_to_save": ["classifier"]}
    model = get_peft_model(loaded_base, StocTuningConfig(k=20, task_type=task, **extra))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**inputs).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102  (the card's own instructions, run as a user would)
    assert torch.allclose(_outputs(namespace["model"].eval(), inputs), _outputs(model, inputs), atol=1e-6, rtol=0)
    assert torch.allclose(_outputs(namespace["merged"].eval(), inputs), _outputs(model, inputs), atol=1e-6, rtol=0)


def _load_saved_base(folder, task):
    from peft_stoc.integration.tasks import auto_class_name

    architectures = transformers.AutoConfig.from_pretrained(folder).architectures
    return getattr(transformers, auto_class_name(task, architectures)).from_pretrained(folder)


@pytest.mark.parametrize("trained, loaded", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_adapter_loads_on_the_same_base_in_another_dtype(tmp_path, trained, loaded):
    model = train_stoc(k=40, steps=2, lr=5e-2, base=tiny_model().to(trained))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model().to(loaded), tmp_path)
    delta = model.base_model.adapter_delta("default")
    assert reloaded.base_model.adapter_delta("default").num_changed == delta.num_changed
    want = predict(model).float()
    effect = (predict(tiny_model().to(loaded).eval()).float() - want).abs().max()
    error = (predict(reloaded).float() - want).abs().max()
    # The adapter moves the logits by ~0.09; loaded in the other dtype they land within rounding (~1e-3) of the
    # trained model's, so a load that dropped or mis-scaled the deltas fails.
    assert effect > 0.03 and error < 2e-3, (effect, error)


def test_stats_are_those_of_the_adapter_asked_for():
    model = train_stoc(k=40, steps=3)
    model.add_adapter("other", StocTuningConfig(k=20, task_type="SEQ_CLS"))
    before = model.stoc_stats("default")
    model.set_adapter("other")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch()).loss.backward()
    optimizer.step()
    assert model.stoc_stats("other")["step"] == 1 and model.stoc_stats("other")["changed"] == 20
    assert model.stoc_stats("default")["step"] == 3
    assert model.stoc_stats("default")["changed"] == before["changed"]
    with pytest.raises(ValueError, match="does not exist"):
        model.stoc_stats("missing")


def test_weighted_adapter_combines_linearly_and_refuses_other_types():
    model = train_stoc(k=40, steps=2)
    model.add_weighted_adapter(["default"], [2.0], "twice", combination_type="linear")
    delta, double = model.base_model.adapter_delta("default"), model.base_model.adapter_delta("twice")
    for name, (index, values) in delta.tensors.items():
        assert torch.equal(double.tensors[name][0], index)
        assert torch.equal(double.tensors[name][1], values * 2)
    for kind in ("svd", "cat", "ties"):
        with pytest.raises(ValueError, match="combination_type='linear'"):
            model.add_weighted_adapter(["default"], [1.0], f"x{kind}", combination_type=kind)
    with pytest.raises(ValueError, match="finite"):
        model.add_weighted_adapter(["default"], [float("nan")], "nan")


def test_merging_one_adapter_after_another_merges_both_and_warns_as_peft_does(tmp_path):
    first = train_stoc(k=40, steps=2, seed=1)
    second = train_stoc(k=40, steps=2, seed=2, model_seed=0)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter(["a"])
        model.merge_adapter(["b"])
        model.merge_adapter(["b"])
    messages = [str(w.message) for w in caught]
    assert any("You are now additionally merging b" in m for m in messages)
    assert any("All adapters are already merged, nothing to do." in m for m in messages)
    assert model.base_model.stoc_state.merged_adapters == ["a", "b"]
    both = PeftModel.from_pretrained(tiny_model(), tmp_path / "a", adapter_name="a")
    both.load_adapter(tmp_path / "b", adapter_name="b")
    both.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    both.set_adapter("ab")
    assert torch.allclose(predict(model), predict(both), atol=1e-6)


def test_merge_command_writes_no_tokenizer_for_a_base_without_one(tmp_path):
    model = train_stoc(k=40, steps=2)
    tiny_model().save_pretrained(tmp_path / "base")  # the same weights, no tokenizer files
    model.save_pretrained(tmp_path / "adapter")
    assert cli_main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert not any("token" in p.name or "vocab" in p.name for p in (tmp_path / "merged").iterdir())


def test_print_trainable_parameters_states_k_per_step_and_the_candidates(capsys):
    model = get_peft_model(tiny_model("bert"), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    candidates = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and "modules_to_save" not in name and "classifier" not in name
    )
    head = sum(p.numel() for name, p in model.named_parameters() if "modules_to_save.default" in name)
    everything = sum(p.numel() for p in model.parameters())

    model.print_trainable_parameters()

    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: {40 + head:,d} per step (k = 40 entries drawn from {candidates:,d} candidates, "
        f"{head:,d} in modules_to_save) || all params: {everything:,d} || trainable%: "
        f"{100 * (40 + head) / everything:.4f}"
    )
    assert model.base_model.stoc_parameter_counts() == {"k": 40, "candidates": candidates, "head": head}
