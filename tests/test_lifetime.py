"""A StocTuning model that is dropped is freed: its weights, optimizer state and any process group its wrapper holds
do not outlive it. Hooks on parameters are held by autograd's C++ side, out of the garbage collector's sight, so a
hook that held its engine strongly would keep the whole model alive until the process exits."""

from __future__ import annotations

import gc
import weakref

import pytest
from peft import PeftModel, get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model, train_stoc


def _weights(model) -> list[weakref.ref]:
    return [weakref.ref(p) for p in model.parameters()]


def _alive(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


@pytest.mark.parametrize(
    "config",
    [{}, {"memory": "dense"}, {"mask_interval": 2}, {"update_rule": "strict"}, {"max_changed": 60}],
    ids=["lean", "dense", "reused-mask", "strict", "max-changed"],
)
def test_a_trained_model_is_freed_once_dropped(config):
    refs = _weights(train_stoc(**config))
    assert refs and _alive(refs) == 0


def test_a_model_never_trained_is_freed_once_dropped():
    refs = _weights(get_peft_model(tiny_model("bert"), StocTuningConfig(k=40, task_type="SEQ_CLS")))
    assert _alive(refs) == 0


def test_a_loaded_model_with_two_adapters_is_freed_once_dropped(tmp_path):
    train_stoc().save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(tiny_model("bert"), tmp_path / "a", adapter_name="a", is_trainable=True)
    model.load_adapter(tmp_path / "a", adapter_name="b", is_trainable=True)
    model.set_adapter("b")
    model.train()
    model(**batch()).loss.backward()
    with model.disable_adapter():
        model(**batch())
    refs = _weights(model)
    del model
    assert _alive(refs) == 0


def test_a_model_trained_by_trainer_is_freed_with_the_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i] for k, v in batch().items()} for i in range(4)]
    model = get_peft_model(tiny_model("bert"), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    refs = _weights(model)
    del model, trainer
    assert _alive(refs) == 0


@pytest.mark.parametrize("explicit", [False, True], ids=["hooks", "step-object"])
@pytest.mark.parametrize("memory", ["lean", "dense"])
def test_an_optimizer_dropped_while_its_model_lives_is_freed(memory, explicit):
    """A sweep makes a new optimizer for the same model: the old one and its state go."""
    import torch

    from peft_stoc import StocTuningStep

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch()).loss.backward()
    StocTuningStep(model, optimizer).step() if explicit else optimizer.step()
    optimizer.zero_grad()
    ref = weakref.ref(optimizer)
    del optimizer
    assert _alive([ref]) == 0
    assert model.stoc_stats()["step"] == 1
