"""Seeded random sequences of adapter operations: after every operation the base seen through `disable_adapter()`
is the untouched base, bit for bit, and every adapter saved along the way loads."""

import random
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_stoc import StocTuningConfig, adapter_file

from .helpers import batch, tiny_model

SEQUENCES = 200
OPERATIONS = 6
INPUTS = {k: v for k, v in batch(seed=99).items() if k != "labels"}


def _logits(model):
    with torch.no_grad():
        return model(**INPUTS).logits


class Scenario:
    def __init__(self, seed: int, folder):
        self.rng = random.Random(seed)
        self.folder = folder
        self.model = get_peft_model(
            tiny_model(),
            StocTuningConfig(k=30, task_type="SEQ_CLS", seed=seed, memory=self.rng.choice(["dense", "lean"])),
        )
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.saved: list = []
        self.count = 0

    @property
    def tuner(self):
        return self.model.base_model

    def names(self):
        return list(self.tuner.stoc_layer.stoc_adapters)

    def backward(self) -> bool:
        """A backward, when something is trainable (the active adapter may be frozen, merged or disabled)."""
        loss = self.model(**batch(seed=self.rng.randrange(100))).loss
        if loss.requires_grad:
            loss.backward()
        return loss.requires_grad

    def train(self):
        if self.backward():
            self.optimizer.step()
            self.optimizer.zero_grad()

    def step_while_disabled(self):
        if not self.backward():
            return
        with self.model.disable_adapter():
            try:
                self.optimizer.step()
            except RuntimeError as error:
                assert "not being trained" in str(error)
        self.optimizer.zero_grad()

    def switch(self):
        self.model.set_adapter(self.rng.choice(self.names()))

    def merge(self):
        self.model.merge_adapter(self.rng.sample(self.names(), self.rng.randint(1, len(self.names()))))

    def unmerge(self):
        self.model.unmerge_adapter()

    def toggle(self):
        if self.tuner.stoc_layer.disable_adapters:
            self.tuner.enable_adapter_layers()
        else:
            self.tuner.disable_adapter_layers()

    def add(self):
        self.count += 1
        self.model.add_adapter(f"new{self.count}", StocTuningConfig(k=20, task_type="SEQ_CLS"))

    def delete(self):
        others = [n for n in self.names() if n not in self.model.active_adapters]
        if others:
            self.model.delete_adapter(self.rng.choice(others))

    def weighted(self):
        self.count += 1
        chosen = self.rng.sample(self.names(), self.rng.randint(1, len(self.names())))
        weights = [self.rng.choice([0.5, 1.0, -1.0]) for _ in chosen]
        self.model.add_weighted_adapter(chosen, weights, f"sum{self.count}")

    def save(self):
        self.count += 1
        name = self.rng.choice(self.names())
        target = self.folder / f"saved{self.count}"
        self.model.save_pretrained(target, selected_adapters=[name])
        self.saved.append(target if name == "default" else target / name)

    def load(self):
        if self.saved:
            self.count += 1
            self.model.load_adapter(self.rng.choice(self.saved), adapter_name=f"loaded{self.count}")

    def failed_load(self):
        self.count += 1
        bad = self.folder / f"bad{self.count}"
        bad.mkdir()
        source = self.saved[-1] if self.saved else None
        if source is None:
            return
        (bad / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
        data = (source / adapter_file.WEIGHTS_NAME).read_bytes()
        (bad / adapter_file.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])  # truncated
        with pytest.raises(adapter_file.AdapterFileError):
            self.model.load_adapter(bad, adapter_name=f"bad{self.count}")

    OPERATIONS = (
        "train",
        "train",
        "step_while_disabled",
        "switch",
        "merge",
        "unmerge",
        "toggle",
        "add",
        "delete",
        "weighted",
        "save",
        "load",
        "failed_load",
    )


@pytest.mark.parametrize("chunk", range(4))
def test_random_operation_sequences_keep_the_base_exact(tmp_path, chunk):
    base_logits = _logits(tiny_model().eval())
    per_chunk = SEQUENCES // 4
    for seed in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        scenario = Scenario(seed, folder)
        history = []
        for _ in range(OPERATIONS):
            operation = scenario.rng.choice(Scenario.OPERATIONS)
            history.append(operation)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    getattr(scenario, operation)()
                except ValueError as error:
                    # PEFT's own refusals (e.g. deleting a merged adapter) must leave everything consistent.
                    history.append(f"refused: {error}")
            scenario.model.eval()
            with scenario.model.disable_adapter():
                assert torch.equal(_logits(scenario.model), base_logits), (seed, history)
            scenario.model.train()
        for path in scenario.saved:
            loaded = PeftModel.from_pretrained(tiny_model(), path)
            assert loaded.base_model.stoc_layer.stoc_adapters["default"] is not None, (seed, history, path)
