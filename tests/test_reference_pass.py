"""A reference forward under `disable_adapter()` between a policy's forward and its backward (DPO): the base's
outputs bit for bit, and the policy's graph stays valid."""

import copy
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


def _tokenizer_and_pairs():
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w1", pad_token="w0", eos_token="w2", bos_token="w3"
    )
    rows = range(16)
    data = Dataset.from_dict(
        {
            "prompt": [f"w{5 + i} w{7 + i}" for i in rows],
            "chosen": [f" w{9 + i} w2" for i in rows],
            "rejected": [f" w{30 + i} w2" for i in rows],
        }
    )
    return tokenizer, data


def _dpo(trl, model, steps: int, **options):
    tokenizer, data = _tokenizer_and_pairs()
    args = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        max_steps=steps,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
        learning_rate=1e-2,
        precompute_ref_log_probs=options.pop("precompute_ref_log_probs", False),
        bf16=False,  # TRL's default autocasts on CPU too; the comparisons with an untouched copy are exact in fp32
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, **options)


def _watch_reference_passes(trainer, reference) -> list[float]:
    """Every reference pass TRL makes (a forward without gradients) next to `reference`'s log-probs for the same
    inputs: their largest differences."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(reference)
    differences = []

    def compare(module, args, kwargs, output):
        if torch.is_grad_enabled():
            return  # the policy's pass
        with torch.no_grad():
            expected = reference(*args, **kwargs).log_probs
        differences.append(float((output.log_probs - expected).abs().max()))

    trainer.model.register_forward_hook(compare, with_kwargs=True)
    return differences


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("path", ["peft_config", "ready_model", "precomputed"])
def test_trl_dpo_trains_against_the_untouched_base(path):
    """TRL's DPO with StocTuning: the reference log-probs at every step are those of an untouched copy of the base
    (TRL computes them with its fused LM head, which reads `lm_head.weight` itself), and the policy's loss falls."""
    trl = pytest.importorskip("trl", reason="TRL is not installed in this environment")
    config = StocTuningConfig(k=0.02, task_type="CAUSAL_LM")
    base = tiny_model("llama", "CAUSAL_LM")
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    if path == "peft_config":
        trainer = _dpo(trl, base, steps=4, peft_config=config)
    else:
        model = get_peft_model(base, config)
        trainer = _dpo(trl, model, steps=4, precompute_ref_log_probs=path == "precomputed")
    differences = _watch_reference_passes(trainer, reference)
    trainer.train()
    assert trainer.model.base_model.stoc_stats()["changed"] > 0
    assert len(differences) >= (0 if path == "precomputed" else 4)
    assert max(differences, default=0.0) <= 1e-6
    losses = _losses(trainer)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_trl_dpo_precomputed_reference_is_the_base():
    trl = pytest.importorskip("trl", reason="TRL is not installed in this environment")
    from trl.trainer.utils import add_fused_lm_head

    base = tiny_model("llama", "CAUSAL_LM")
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    add_fused_lm_head(reference)
    model = get_peft_model(base, StocTuningConfig(k=0.02, task_type="CAUSAL_LM"))
    trainer = _dpo(trl, model, steps=2, precompute_ref_log_probs=True)
    rows = trainer.train_dataset
    batch = trainer.data_collator([rows[i] for i in range(4)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        expected = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
        ).log_probs
    completion = batch["completion_mask"][..., 1:]
    expected = expected[:, -completion.size(1) :].sum(dim=1)
    chosen, rejected = expected.chunk(2, dim=0)
    torch.testing.assert_close(batch["ref_chosen_logps"], chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch["ref_rejected_logps"], rejected, rtol=0, atol=1e-5)


def test_trl_dpo_reference_adapter_is_the_sft_adapter(tmp_path):
    """A ready PeftModel whose adapter is an SFT result, handed to DPOTrainer without a reference model: TRL adds a
    "ref" adapter from the policy's config, and the reference is that SFT adapter, not the base."""
    trl = pytest.importorskip("trl", reason="TRL is not installed in this environment")
    sft = get_peft_model(tiny_model("llama", "CAUSAL_LM"), StocTuningConfig(k=0.05, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for step in range(3):
        sft(**batch("CAUSAL_LM", seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    sft.save_pretrained(tmp_path / "sft")
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_model("llama", "CAUSAL_LM"), tmp_path / "sft", is_trainable=True)
    reference = PeftModel.from_pretrained(tiny_model("llama", "CAUSAL_LM"), tmp_path / "sft").merge_and_unload()
    reference = reference.eval().requires_grad_(False)
    base = tiny_model("llama", "CAUSAL_LM")
    x = batch("CAUSAL_LM", seed=9)
    with torch.no_grad():
        assert not torch.equal(reference(**x).logits, base(**x).logits)  # the SFT adapter is not the base
    trainer = _dpo(trl, model, steps=4)
    assert "ref" in trainer.model.peft_config
    differences = _watch_reference_passes(trainer, reference)
    trainer.train()
    assert len(differences) >= 4 and max(differences) <= 1e-6
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
