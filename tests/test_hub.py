"""push_to_hub with a model card, then loading back from the Hub (a local emulator on 127.0.0.1)."""

import yaml
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from .helpers import predict, tiny_model, train_stoc
from .hub_emulator import running_hub


def test_push_to_hub_round_trip_with_model_card(tmp_path):
    with running_hub() as hub:
        tiny_model().save_pretrained(tmp_path / "base")
        HfApi().create_repo("org/tiny-bert")
        HfApi().upload_folder(repo_id="org/tiny-bert", folder_path=str(tmp_path / "base"))
        base = AutoModelForSequenceClassification.from_pretrained("org/tiny-bert")
        model = train_stoc(base=base, k=40, steps=3)
        expected = predict(model)

        model.push_to_hub("someone/stoc-adapter", tags=["sentiment"])

        pushed = set(hub.files("someone/stoc-adapter"))
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= pushed
        readme = hub.read("someone/stoc-adapter", "README.md").decode()
        front = yaml.safe_load(readme.split("---")[1])
        assert front["library_name"] == "peft"
        assert front["base_model"] == "org/tiny-bert"
        assert {"peft", "peft-stoc", "stochastic-tuning", "sparse-delta", "sentiment"} <= set(front["tags"])
        changed = model.base_model.adapter_delta("default").num_changed
        assert "import peft_stoc" in readme
        assert 'PeftModel.from_pretrained(base, "someone/stoc-adapter")' in readme
        assert f"{changed:,} of" in readme and "stochastic" in readme and "(`k=40`)" in readme
        assert "%" in readme and " KB |" in readme  # density and adapter size
        assert ModelCard.load("someone/stoc-adapter").data.library_name == "peft"

        fresh = AutoModelForSequenceClassification.from_pretrained("org/tiny-bert")
        loaded = PeftModel.from_pretrained(fresh, "someone/stoc-adapter")
        assert (predict(loaded) - expected).abs().max() <= 1e-6
