"""What one step trains, counted alike by every reporting function of a StocTuning model."""

from __future__ import annotations

import re

from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import tiny_model


def test_trainable_pair_matches_the_printed_counts(capsys):
    model = get_peft_model(tiny_model("bert"), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    counts = model.base_model.stoc_parameter_counts()
    trainable, total = model.base_model.stoc_nb_trainable_parameters()
    assert counts["head"] > 0 and trainable == counts["k"] + counts["head"]
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?!\.)", printed.split("trainable%")[0])]
    assert numbers[0] == trainable and total in numbers and counts["candidates"] in numbers
    assert f"{100 * trainable / total:.4f}" in printed


def test_peft_reporting_functions_agree():
    model = get_peft_model(tiny_model("llama", "CAUSAL_LM"), StocTuningConfig(k=40, task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == model.base_model.stoc_nb_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 40 and total == sum(p.numel() for p in model.parameters())
