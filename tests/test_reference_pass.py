"""A reference forward under `disable_adapter()` between a policy's forward and its backward (DPO): the base's
outputs bit for bit, and the policy's graph stays valid."""

import os
import tempfile

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import VOCAB, batch, tiny_model


@pytest.mark.parametrize("memory", ["dense", "lean"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dpo_style_steps_with_a_reference_pass_under_disable_adapter(memory, arch):
    inputs = [batch("CAUSAL_LM", seed=step) for step in range(5)]
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if arch == "gpt2" else {}
    base = tiny_model(arch, "CAUSAL_LM", **no_dropout).eval()
    with torch.no_grad():
        expected = [base(**x).logits for x in inputs]
    model = get_peft_model(
        tiny_model(arch, "CAUSAL_LM", **no_dropout), StocTuningConfig(k=40, task_type="CAUSAL_LM", memory=memory)
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, x in enumerate(inputs):
        policy = model(**x).logits
        with torch.no_grad(), model.disable_adapter():
            reference = model(**x).logits
        assert torch.equal(reference, expected[step]), step  # the base, although the weights hold the adapter
        loss = (policy.log_softmax(-1) - reference.log_softmax(-1)).pow(2).mean() + model(**x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.stoc_stats()["step"] == 5 and model.stoc_stats()["changed"] >= 40


def test_trl_dpo_trainer_runs_with_stoc_tuning():
    trl = pytest.importorskip("trl", reason="TRL is not installed in this environment")
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w1", pad_token="w0", eos_token="w2", bos_token="w3"
    )
    rows = range(12)
    data = Dataset.from_dict(
        {
            "prompt": [f"w{5 + i} w{7 + i}" for i in rows],
            "chosen": [f" w{9 + i} w2" for i in rows],
            "rejected": [f" w{30 + i} w2" for i in rows],
        }
    )
    args = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
        learning_rate=1e-2,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = trl.DPOTrainer(
        model=tiny_model("llama", "CAUSAL_LM"),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=StocTuningConfig(k=30, task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert trainer.model.stoc_stats()["step"] == 3
    assert trainer.model.stoc_stats()["changed"] >= 30
