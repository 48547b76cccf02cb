"""Seeded random sequences of adapter operations, hostile ones among them (loads with bad names or configs, manual
edits of the base, saves into the working directory killed at a random file-system step): after every operation the
base seen through `disable_adapter()` is the untouched base, bit for bit, and every adapter saved along the way
loads."""

import json
import os
import random
import shutil
import signal
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_stoc import StocTuningConfig
from peft_stoc.adapter_files import adapter_file

from .helpers import batch, tiny_model
from .test_save_crash import _kill_at_call

SEQUENCES = 300
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
        return list(self.tuner.stoc_state.stoc_adapters)

    def backward(self) -> bool:
        """A backward, when something is trainable (the active adapter may be frozen, merged or disabled)."""
        loss = self.model(**batch(seed=self.rng.randrange(100))).loss
        if loss.requires_grad:
            loss.backward()
        return loss.requires_grad

    def train(self):
        if self.backward():
            try:
                self.optimizer.step()
            except RuntimeError as error:  # the active adapter is disabled, merged with others or not trainable
                assert "not being trained right now" in str(error)
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
        if self.tuner.stoc_state.disable_adapters:
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

    def failed_named_load(self):
        """A load under a name that cannot be an adapter's: refused, and nothing attached."""
        if not self.saved:
            return
        before = self.names()
        name = self.rng.choice(["a/b", "..", "", "training", "forward", "a\\b", "x\0y", "/abs"])
        with pytest.raises(ValueError):
            self.model.load_adapter(self.rng.choice(self.saved), adapter_name=name)
        assert self.names() == before

    def failed_config_load(self):
        """A saved adapter whose config PEFT or StocTuning refuses while attaching: refused, and nothing attached."""
        if not self.saved:
            return
        self.count += 1
        source, bad = self.rng.choice(self.saved), self.folder / f"badconfig{self.count}"
        shutil.copytree(source, bad)
        config = json.loads((bad / "adapter_config.json").read_text())
        field, value = self.rng.choice(
            [("k", 10**9), ("max_changed", 1), ("target_modules", ["nothing_matches"]), ("modules_to_save", "x")]
        )
        config[field] = value
        (bad / "adapter_config.json").write_text(json.dumps(config))
        before = self.names()
        with pytest.raises((ValueError, adapter_file.AdapterFileError)):
            self.model.load_adapter(bad, adapter_name=f"badconfig{self.count}")
        assert self.names() == before

    def manual_edit(self):
        """One base entry changed by hand outside any step: the next training step refuses before it changes
        anything; the entry is then put back."""
        name, weight = self.rng.choice(sorted(self.tuner.base_params().items()))
        recorded = self.tuner.stoc_state.patch.index.get(name)
        flat = weight.data.view(-1)
        entry = self.rng.randrange(flat.numel())
        if recorded is not None and entry in set(recorded.tolist()):
            return  # a changed entry: its value depends on what the weights show now
        value = flat[entry].clone()
        flat[entry] += 1
        try:
            if self.tuner.stoc_engine() is not None:
                with pytest.raises(RuntimeError, match="changed outside"):
                    self.model(**batch(seed=self.rng.randrange(100)))
        finally:
            flat[entry] = value
        self.optimizer.zero_grad()

    def killed_save_here(self):
        """A save into the working directory over a saved adapter, killed at a random file-system step: the folder
        holds the old adapter or the new one."""
        if not sys.platform.startswith("linux") or "default" not in self.names():
            return
        self.count += 1
        folder = self.folder / f"here{self.count}"
        self.model.save_pretrained(folder, selected_adapters=["default"])
        old = PeftModel.from_pretrained(tiny_model(), folder).base_model.adapter_delta("default")
        self.train()
        new = self.tuner.adapter_delta("default")
        kill_at = self.rng.randint(1, 30)
        pid = os.fork()
        if pid == 0:  # the child saves into its working directory and is killed on its way
            try:
                torch.set_num_threads(1)
                os.chdir(folder)
                _kill_at_call(kill_at)
                self.model.save_pretrained(".", selected_adapters=["default"])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL or os.WEXITSTATUS(status) == 0
        loaded = PeftModel.from_pretrained(tiny_model(), folder).base_model.adapter_delta("default")
        assert _same_delta(loaded, old) or _same_delta(loaded, new), kill_at
        self.saved.append(folder)

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
        "failed_named_load",
        "failed_config_load",
        "manual_edit",
        "killed_save_here",
    )


def _same_delta(first, second) -> bool:
    return first.tensors.keys() == second.tensors.keys() and all(
        all(torch.equal(x, y) for x, y in zip(first.tensors[n], second.tensors[n])) for n in first.tensors
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
            assert loaded.base_model.stoc_state.stoc_adapters["default"] is not None, (seed, history, path)
