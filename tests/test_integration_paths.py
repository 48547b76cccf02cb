"""The doors users come through besides PeftModel: accelerate checkpoints, plain state dicts,
`inject_adapter_in_model`, transformers' own adapter loading, `low_cpu_mem_usage`, and merging every task type."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file

from peft_stoc import StocTuningConfig
from peft_stoc.cli import main as cli_main

from .helpers import VOCAB, batch, predict, tiny_config, tiny_model, train_stoc

ROOT = Path(__file__).resolve().parent.parent


def _worker(out: Path, selection: str, mode: str, checkpoint: Path | None = None) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        ACCELERATE_USE_CPU="1",
    )
    command = [sys.executable, "-m", "tests.accelerate_worker", str(out), selection, "auto", mode]
    if checkpoint is not None:
        command.append(str(checkpoint))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("selection", ["top", "stochastic"])
def test_accelerate_save_state_then_load_state_in_a_fresh_process_resumes_exactly(tmp_path, selection):
    _worker(tmp_path / "whole", selection, "whole")
    _worker(tmp_path / "first", selection, "first")
    _worker(tmp_path / "resumed", selection, "resume", tmp_path / "first" / "checkpoint")
    whole = load_file(tmp_path / "whole" / "state.safetensors")
    resumed = load_file(tmp_path / "resumed" / "state.safetensors")
    assert whole.keys() == resumed.keys()
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _training_pair(seed=3):
    model = get_peft_model(
        tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        StocTuningConfig(k=40, task_type="SEQ_CLS", seed=seed),
    )
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _steps(model, optimizer, steps):
    for step in steps:
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_state_dict_taken_mid_training_resumes_in_a_fresh_model():
    whole, whole_optimizer = _training_pair()
    _steps(whole, whole_optimizer, range(6))
    first, first_optimizer = _training_pair()
    _steps(first, first_optimizer, range(3))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    optimizer_state = first_optimizer.state_dict()
    assert any(".stoc_tuning.patch." in key for key in state)  # originals travel with the model
    resumed, resumed_optimizer = _training_pair()
    resumed.load_state_dict(state)
    resumed_optimizer.load_state_dict(optimizer_state)
    assert resumed.stoc_stats()["step"] == 3 and resumed.stoc_stats()["changed"] == first.stoc_stats()["changed"]
    _steps(resumed, resumed_optimizer, range(3, 6))
    expected, got = whole.state_dict(), resumed.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def test_state_travels_with_to():
    model = train_stoc(k=40, steps=2)
    layer = model.base_model.stoc_state
    model.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in layer.patch.original.values())
    assert all(i.dtype == torch.int64 for i in layer.patch.index.values())
    model.to(torch.float32)
    reference = train_stoc(k=40, steps=2)
    assert torch.equal(predict(model), predict(reference))


def test_inject_adapter_in_model_trains_saves_and_reloads():
    config = StocTuningConfig(k=40, task_type="SEQ_CLS", selection="top")
    model = inject_adapter_in_model(config, tiny_model())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = get_peft_model_state_dict(model)
    assert state and all(".stoc_" in key for key in state)
    fresh = inject_adapter_in_model(StocTuningConfig(k=40, task_type="SEQ_CLS", selection="top"), tiny_model())
    set_peft_model_state_dict(fresh, state)
    assert torch.equal(predict(model.eval()), predict(fresh.eval()))
    assert not torch.equal(predict(fresh), predict(tiny_model().eval()))


def test_transformers_loading_refuses_instead_of_dropping_the_deltas(tmp_path):
    model = train_stoc(k=40, steps=2)
    model.save_pretrained(tmp_path)
    plain = tiny_model()
    plain.load_adapter(str(tmp_path))
    with pytest.raises(RuntimeError, match="PeftModel.from_pretrained"):
        predict(plain)


def test_transformers_auto_model_from_an_adapter_folder_refuses_instead_of_dropping_the_deltas(tmp_path):
    """`AutoModelFor….from_pretrained(adapter_dir)` loads the base named in the adapter config, then the adapter
    through transformers' PEFT integration: the model it returns refuses to run rather than silently run the base."""
    tiny_model().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = train_stoc(base=base, k=40, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    auto = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="PeftModel.from_pretrained"):
        predict(auto.eval())


def test_hotswap_and_mixed_models_refuse_stoc_tuning_clearly(tmp_path):
    """PEFT's `hotswap_adapter` and `PeftMixedModel` support other methods only; they say so and change nothing
    (StocTuning's own hot swap is `set_adapter`, see test_compile.py)."""
    from peft import PeftMixedModel
    from peft.utils.hotswap import hotswap_adapter

    train_stoc(k=40, steps=2, seed=1).save_pretrained(tmp_path / "a")
    train_stoc(k=40, steps=3, seed=2).save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "a").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Hotswapping only supports"):
        hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_model(), StocTuningConfig(k=20, task_type="SEQ_CLS"), mixed=True)
    with pytest.raises(ValueError, match="STOC is not supported for mixed models"):
        PeftMixedModel.from_pretrained(tiny_model(), str(tmp_path / "a"))


@pytest.mark.parametrize("path", ["from_pretrained", "load_adapter"])
def test_low_cpu_mem_usage_loads_correctly(tmp_path, path):
    model = train_stoc(k=40, steps=2)
    model.save_pretrained(tmp_path)
    if path == "from_pretrained":
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, low_cpu_mem_usage=True)
    else:
        loaded = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
        loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
        loaded.set_adapter("other")
    assert torch.equal(predict(loaded.eval()), predict(model))


def _task_models():
    """(name, task_type, build, inputs) for every task type StocTuning adapts."""
    ids = batch(seed=1)
    qa = dict(
        input_ids=ids["input_ids"],
        attention_mask=ids["attention_mask"],
        start_positions=torch.tensor([1, 2, 3, 4]),
        end_positions=torch.tensor([2, 3, 4, 5]),
    )
    t5 = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    labels = batch("CAUSAL_LM", seed=1)
    vit = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,
    )
    return [
        ("roberta", "SEQ_CLS", lambda: tiny_model("roberta"), batch(seed=1)),
        ("bert-token", "TOKEN_CLS", lambda: tiny_model("bert", "TOKEN_CLS"), batch("TOKEN_CLS", seed=1)),
        (
            "bert-qa",
            "QUESTION_ANS",
            lambda: transformers.AutoModelForQuestionAnswering.from_config(tiny_config("bert")),
            qa,
        ),
        ("llama", "CAUSAL_LM", lambda: tiny_model("llama", "CAUSAL_LM"), labels),
        (
            "t5",
            "SEQ_2_SEQ_LM",
            lambda: transformers.T5ForConditionalGeneration(t5),
            dict(input_ids=labels["input_ids"], attention_mask=labels["attention_mask"], labels=labels["input_ids"]),
        ),
        (
            "vit",
            None,
            lambda: transformers.ViTForImageClassification(vit),
            dict(
                pixel_values=torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                labels=torch.tensor([0, 1, 2, 0]),
            ),
        ),
    ]


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else torch.cat([out.start_logits, out.end_logits], dim=-1)


@pytest.mark.parametrize("name, task, build, inputs", _task_models(), ids=[t[0] for t in _task_models()])
def test_every_task_type_trains_merges_and_unloads(name, task, build, inputs):
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in build().state_dict().items()}
    torch.manual_seed(0)
    extra = {} if task is not None else {"modules_to_save": ["classifier"]}
    model = get_peft_model(build(), StocTuningConfig(k=30, task_type=task, **extra))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = _outputs(model, inputs)
    torch.manual_seed(0)
    untrained = _outputs(build().eval(), inputs)
    assert (expected - untrained).abs().max() > 1e-4, "the adapter changes the outputs (else the merge checks nothing)"
    torch.manual_seed(0)
    merged = get_peft_model(build(), StocTuningConfig(k=30, task_type=task, **extra))
    merged.load_state_dict(model.state_dict())
    plain = merged.merge_and_unload()
    assert not any("stoc" in key for key in plain.state_dict())
    assert torch.allclose(_outputs(plain.eval(), inputs), expected, atol=1e-6, rtol=0)
    unloaded = model.unload().state_dict()
    assert unloaded.keys() == base_state.keys()
    assert all(torch.equal(unloaded[k], v) for k, v in base_state.items())


def test_roberta_merges_through_the_command_line(tmp_path):
    model = train_stoc("roberta", k=40, steps=2)
    base = tiny_model("roberta")
    base.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    assert cli_main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(predict(merged), predict(model), atol=1e-6, rtol=0)


def test_a_config_shared_by_two_models_carries_no_save_of_one_into_the_other(tmp_path):
    """One config object for several models (PEFT keeps the object it is given): a save records the fingerprint and
    counts in the file, not in that object, so loading a checkpoint into the other model continues from the
    checkpoint's step, not from the latest save's."""
    config = StocTuningConfig(k=40, task_type="SEQ_CLS", seed=3)
    first = get_peft_model(tiny_model(), config)
    optimizer = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):
        first(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (2, 5):
            first.save_pretrained(tmp_path / f"step-{step + 1}")
    assert config.saved_counts is None and config.base_fingerprint is None
    second = get_peft_model(tiny_model(), config)
    second.load_adapter(tmp_path / "step-3", "default", is_trainable=True)
    assert second.stoc_stats()["step"] == 3
    reference = PeftModel.from_pretrained(tiny_model(), tmp_path / "step-3")  # the file's own config
    assert reference.stoc_stats()["step"] == 3
    assert second.stoc_stats()["changed"] == reference.stoc_stats()["changed"] < first.stoc_stats()["changed"]


def test_trainer_load_best_model_at_end_gives_the_best_checkpoint(tmp_path):
    """Trainer reloads the best checkpoint's adapter into the trained model (`load_adapter` over the live adapter):
    the model ends as that checkpoint is, step count included, not as the last step left it."""
    from .resume_worker import Rows

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS", seed=3))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(n=8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-8")  # the test needs a best step before the last
    reference = PeftModel.from_pretrained(tiny_model(), best).eval()
    assert model.eval().stoc_stats()["step"] == reference.stoc_stats()["step"] < 8
    assert torch.equal(predict(model), predict(reference))
