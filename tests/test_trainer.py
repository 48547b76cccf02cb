"""Zero-config training with transformers Trainer and accelerate."""

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_stoc import StocTuningConfig

from .helpers import base_snapshot, batch, changed_entries, drawn_entries, tiny_model


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        data = batch(size=n, seed=seed, pad_from=None)
        self.rows = [{k: v[i] for k, v in data.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _assert_confined(results, strict=False):
    """Each step changes only drawn entries, or (masked_grad: momentum) entries drawn at an earlier step."""
    earlier: dict[str, torch.Tensor] = {}
    for changed, drawn in results:
        assert sum(i.numel() for i in drawn.values()) > 0
        for key, index in changed.items():
            allowed = drawn.get(key, torch.empty(0, dtype=torch.long))
            if not strict:
                allowed = torch.cat([allowed, earlier.get(key, torch.empty(0, dtype=torch.long))])
            assert torch.isin(index, allowed).all(), key
        for key, index in drawn.items():
            earlier[key] = torch.cat([earlier.get(key, torch.empty(0, dtype=torch.long)), index])


def _args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


class _RecordDraws:
    """Snapshot before each optimizer step and compare after it (runs via optimizer hooks, like ours)."""

    def __init__(self, model):
        self.model = model
        self.results = []

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def _pre(self, optimizer, args, kwargs):
        self._before = base_snapshot(self.model)

    def _post(self, optimizer, args, kwargs):
        self.results.append((changed_entries(self.model, self._before), drawn_entries(self.model)))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def test_trainer_step_changes_only_drawn_entries_and_logs_stats(tmp_path):
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=3, weight_decay=0.01), train_dataset=_Rows())
    with _RecordDraws(model) as record:
        trainer.train()
    assert len(record.results) == 3
    _assert_confined(record.results)
    first_changed, _ = record.results[0]
    assert sum(i.numel() for i in first_changed.values()) == 40  # fresh AdamW: every drawn entry moves
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"stoc/drawn", "stoc/changed", "stoc/density"} <= entry.keys() for entry in logged)
    assert logged[-1]["stoc/drawn"] == 40


def test_trainer_with_accumulation_clipping_and_bf16(tmp_path):
    model = get_peft_model(tiny_model(), StocTuningConfig(k=30, task_type="SEQ_CLS"))
    engine = model.base_model.stoc_engine()
    args = _args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_grad_norm=0.5,
        bf16=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(n=24))
    with _RecordDraws(model) as record:
        trainer.train()
    assert engine.draws == 2 and len(record.results) == 2  # one draw per optimizer step, not per micro-batch
    _assert_confined(record.results)


@pytest.mark.parametrize("rule", ["masked_grad", "strict"])
def test_accelerate_prepared_optimizer_is_intercepted(rule):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = get_peft_model(tiny_model(), StocTuningConfig(k=20, task_type="SEQ_CLS", update_rule=rule))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    engine = model.base_model.stoc_engine()
    with _RecordDraws(model) as record:
        for step in range(4):
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch(seed=step)).loss)
                optimizer.step()
                optimizer.zero_grad()
    assert engine.draws == 2
    _assert_confined(record.results, strict=rule == "strict")
