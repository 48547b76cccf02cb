"""The default `StocTuningConfig()` on every common architecture: the paper's BitFit count where the model has
biases, BitFit's share of the entries where it has none (logged once), and errors about `k` that suggest a value."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig
from peft_stoc.tuner import candidates
from peft_stoc.tuner.candidates import BITFIT_SHARE

from .test_architectures import build, micro_batch

WITH_BIASES = ["gpt2", "bert", "vit", "qwen2"]  # Qwen2: biases on the query, key and value projections
WITHOUT_BIASES = ["llama", "mistral", "t5"]


@pytest.mark.parametrize("name", WITH_BIASES + WITHOUT_BIASES)
def test_default_config_trains(name, caplog, monkeypatch):
    monkeypatch.setattr(candidates, "_announced", set())  # as in a fresh process
    base = build(name)
    with caplog.at_level(logging.WARNING, logger="peft_stoc"):
        model = get_peft_model(base, StocTuningConfig())
    tuner = model.base_model
    params = tuner.base_params()
    biases = sum(p.numel() for n, p in params.items() if n.endswith(".bias"))
    total = sum(p.numel() for p in params.values())
    k = tuner._adapters["default"].k
    fallback = [r.getMessage() for r in caplog.records if "no bias parameters" in r.getMessage()]
    if name in WITH_BIASES:
        assert biases > 0 and k == biases  # the paper's count
        assert fallback == []
    else:
        assert biases == 0 and k == round(BITFIT_SHARE * total)
        assert len(fallback) == 1 and f"{k:,} entries" in fallback[0]
        # A second model of the same size is not announced again.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="peft_stoc"):
            get_peft_model(build(name), StocTuningConfig())
        assert not [r for r in caplog.records if "no bias parameters" in r.getMessage()]

    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for index in range(2):
        model(**micro_batch(name, index)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in params.items())
    assert model.base_model.stoc_stats()["drawn"] == k
    assert 0 < changed <= 2 * k  # confined to the two steps' draws (masked_grad: drawn entries keep moving)


@pytest.mark.parametrize(
    "k, message",
    [(0, "positive"), (-2, "positive"), (1.5, r"\(0, 1\)"), ("all", "'bitfit'"), (True, "bool"), ([3], "list")],
)
def test_every_error_about_k_suggests_a_value(k, message):
    with pytest.raises(ValueError, match=message) as error:
        StocTuningConfig(k=k)
    assert "for instance k=" in str(error.value)


def test_k_larger_than_the_model_suggests_a_value_that_fits():
    base = build("llama")
    total = sum(p.numel() for p in base.parameters())
    with pytest.raises(ValueError, match=r"for instance k=\d+ \(0\.08% of the") as error:
        get_peft_model(base, StocTuningConfig(k=10 * total))
    suggested = int(str(error.value).split("for instance k=")[1].split(" ")[0])
    get_peft_model(build("llama"), StocTuningConfig(k=suggested))  # the suggestion works
