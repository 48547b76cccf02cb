"""push_to_hub with a model card, then loading back from the Hub (tests/hub_server.py, on 127.0.0.1)."""

import yaml
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from .helpers import predict, tiny_model, train_stoc
from .hub_server import running_hub


def test_push_to_hub_round_trip_with_model_card(tmp_path, monkeypatch):
    base_dir = str(tmp_path / "base")
    tiny_model().save_pretrained(base_dir)
    model = train_stoc(base=AutoModelForSequenceClassification.from_pretrained(base_dir), k=40, steps=3)
    expected = predict(model)

    with running_hub(monkeypatch, tmp_path / "cache") as hub:
        model.push_to_hub("someone/stoc-adapter", tags=["sentiment"])

        pushed = hub.repos["someone/stoc-adapter"]
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(pushed)
        readme = pushed["README.md"].decode()
        front = yaml.safe_load(readme.split("---")[1])
        assert front["library_name"] == "peft"
        assert front["base_model"] == base_dir  # the base model's name_or_path: here the folder it was loaded from
        assert {"peft", "peft-stoc", "stochastic-tuning", "sparse-delta", "sentiment"} <= set(front["tags"])
        changed = model.base_model.adapter_delta("default").num_changed
        assert "import peft_stoc" in readme
        assert f'from_pretrained("{base_dir}")' in readme
        assert 'PeftModel.from_pretrained(base, "someone/stoc-adapter")' in readme
        assert f"{changed:,} of" in readme and "stochastic" in readme and "(`k=40`)" in readme
        assert "%" in readme and " KB |" in readme  # density and adapter size
        assert ModelCard.load("someone/stoc-adapter").data.library_name == "peft"

        fresh = AutoModelForSequenceClassification.from_pretrained(base_dir)
        loaded = PeftModel.from_pretrained(fresh, "someone/stoc-adapter")
        assert (predict(loaded) - expected).abs().max() <= 1e-6
