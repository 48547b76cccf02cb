"""Architectures and task types: one confined step each."""

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import base_snapshot, batch, changed_entries, drawn_entries, loss_of, tiny_model

CASES = [
    ("bert", "SEQ_CLS", {}),
    ("bert", "SEQ_CLS", {"num_labels": 1}),  # regression
    ("roberta", "SEQ_CLS", {}),
    ("roberta", "TOKEN_CLS", {"num_labels": 3}),
    ("gpt2", "CAUSAL_LM", {}),
    ("gpt2", "SEQ_CLS", {}),
    ("llama", "CAUSAL_LM", {}),
    ("llama", "SEQ_CLS", {}),
    ("bert", "FEATURE_EXTRACTION", {}),
    ("llama", "FEATURE_EXTRACTION", {}),
]


@pytest.mark.parametrize("arch, task, extra", CASES, ids=[f"{a}-{t}-{e}" for a, t, e in CASES])
def test_one_adamw_step_is_confined(arch, task, extra):
    base = tiny_model(arch, task, **extra)
    model = get_peft_model(base, StocTuningConfig(k=50, task_type=task))
    tuner = model.base_model
    heads = [n for n in tuner.base_params() if n.split(".")[0] in ("classifier", "score")]
    assert not heads, "the task head is trained fully, never drawn from"
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = base_snapshot(model)
    inputs = batch(task, num_labels=extra.get("num_labels", 2))
    loss_of(model, inputs).backward()
    optimizer.step()
    changed, drawn = changed_entries(model, before), drawn_entries(model)
    assert sum(i.numel() for i in drawn.values()) == 50
    assert sum(i.numel() for i in changed.values()) == 50
    for key, index in changed.items():
        assert torch.equal(index, drawn[key])
    assert model.get_model_status().enabled is True
    with torch.no_grad():
        model.eval()
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert all(torch.isfinite(t).all() for t in out.values() if isinstance(t, torch.Tensor))


def test_tied_llama_embedding_is_one_candidate():
    model = get_peft_model(tiny_model("llama", "CAUSAL_LM"), StocTuningConfig(k=10, task_type="CAUSAL_LM"))
    names = list(model.base_model.base_params())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    base = model.base_model.model
    assert base.lm_head.weight is base.model.embed_tokens.weight
