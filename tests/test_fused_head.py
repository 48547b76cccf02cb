"""μ of the LM head under TRL's fused LM head (`fused_lm_head=True`: the backbone runs, then only the positions whose
next-token label is not -100 are projected through `lm_head.weight` directly, never through `lm_head`'s forward): the
mean of the final hidden states over those positions, over every micro-batch of the step; tied embeddings keep their
row shares as well. A use that cannot be followed gets one warning naming the tensor and its share of the candidates."""

import os
import tempfile
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import VOCAB, batch, tiny_model
from .test_reference_pass import _dpo

trl = pytest.importorskip("trl", reason="TRL is not installed in this environment")


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w1", pad_token="w0", eos_token="w2", bos_token="w3"
    )


def _sft(model, steps: int, accumulation: int):
    from datasets import Dataset

    rows = range(16)
    # Prompts and completions of several lengths: the labels mask the prompt and the padding.
    data = Dataset.from_dict(
        {
            "prompt": [" ".join(f"w{5 + i + j}" for j in range(1 + i % 3)) for i in rows],
            "completion": [" " + " ".join(f"w{20 + i + j}" for j in range(1 + i % 4)) + " w2" for i in rows],
        }
    )
    args = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
        learning_rate=1e-2,
        bf16=False,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())


class _HeadInputs:
    """Independently of StocTuning: the final hidden states and labels of every training forward through the fused
    head, and what enters the input embedding; μ at each optimizer step is read before the step runs."""

    def __init__(self, trainer):
        self.hidden, self.labels, self.masks, self.ids, self.steps = [], [], [], [], []
        root = trainer.model.get_base_model()
        root.model.register_forward_hook(self._backbone)
        root.register_forward_pre_hook(self._call, with_kwargs=True)
        self.trainer = trainer

    def _call(self, module, args, kwargs):
        if torch.is_grad_enabled():
            assert kwargs.get("fused_lm_head") is True  # the path under test
            self.labels.append(kwargs["labels"].clone())
            self.masks.append(kwargs["attention_mask"].clone())
            self.ids.append(kwargs["input_ids"].clone())

    def _backbone(self, module, args, output):
        if torch.is_grad_enabled():
            self.hidden.append(output.last_hidden_state.detach().clone())

    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Over the forwards since the latest call: μ of the head's inputs, the input embedding's row shares, and the
        mean final hidden state over every real token (what a head called as a module would read)."""
        total, count, rows, tokens, everywhere = 0.0, 0, torch.zeros(VOCAB), 0, 0.0
        for hidden, labels, mask, ids in zip(self.hidden, self.labels, self.masks, self.ids):
            used = labels[:, 1:] != -100  # hidden state t predicts label t + 1
            total = total + hidden[:, :-1][used].sum(0)
            count += int(used.sum())
            rows += torch.bincount(ids[mask.bool()], minlength=VOCAB).float()
            tokens += int(mask.sum())
            everywhere = everywhere + hidden[mask.bool()].sum(0)
        self.hidden, self.labels, self.masks, self.ids = [], [], [], []
        return total / count, rows / tokens, everywhere / tokens


def _watch_steps(trainer, head_name: str):
    """At each optimizer step, before it runs: (μ StocTuning holds for `head_name`, reference μ, reference rows)."""
    watched = _HeadInputs(trainer)
    results = []
    engine = trainer.model.base_model.stoc_engine()
    candidate = next(c for c in engine.candidates if c.name == head_name)

    def before_step(optimizer, args, kwargs):
        results.append((engine.tracker.means(candidate), *watched.reference()))

    trainer.create_optimizer()
    trainer.optimizer.register_step_pre_hook(before_step)
    return results


@pytest.mark.parametrize("tied", [False, True])
def test_sft_lm_head_mean_covers_the_positions_the_fused_head_projects(tied):
    base = tiny_model("llama", "CAUSAL_LM", tie_word_embeddings=tied)
    model = get_peft_model(base, StocTuningConfig(k=0.02, task_type="CAUSAL_LM", memory="dense"))
    trainer = _sft(model, steps=2, accumulation=2)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert (model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight) == tied
    results = _watch_steps(trainer, head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "StocTuning" in str(w.message)], [str(w.message) for w in caught]
    assert len(results) == 2
    for means, expected, rows, everywhere in results:
        factors = dict((dim, mu) for mu, dim in means)
        assert sorted(factors) == ([0, 1] if tied else [1])
        torch.testing.assert_close(factors[1], expected, rtol=1e-5, atol=1e-6)
        if tied:  # the same weight is the input embedding too: its row shares are kept beside the head's inputs
            torch.testing.assert_close(factors[0], rows, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(expected, everywhere, atol=1e-3)  # prompts are real tokens the head never sees


@pytest.mark.parametrize("tied", [False, True])
def test_dpo_follows_the_fused_head_without_warning(tied):
    base = tiny_model("llama", "CAUSAL_LM", tie_word_embeddings=tied)
    trainer = _dpo(trl, base, steps=2, peft_config=StocTuningConfig(k=0.02, task_type="CAUSAL_LM"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "StocTuning" in str(w.message)], [str(w.message) for w in caught]
    assert trainer.model.base_model.stoc_stats()["changed"] > 0


def _projects_through_the_weight(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    """A forward that reads the head's weight itself, as fused cross-entropy kernels do, with no `fused_lm_head`
    argument saying which positions it projects."""
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = F.linear(hidden[:, :-1], self.lm_head.weight)
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("tied", [False, True])
def test_a_head_read_in_a_way_no_labels_describe_is_named_with_its_share(tied):
    model = get_peft_model(
        tiny_model("llama", "CAUSAL_LM", tie_word_embeddings=tied),
        StocTuningConfig(k=20, task_type="CAUSAL_LM", memory="dense"),
    )
    model.train()
    root = model.get_base_model()
    root.forward = types.MethodType(_projects_through_the_weight, root)
    engine = model.base_model.stoc_engine()
    share = root.lm_head.weight.numel() / sum(c.numel for c in engine.candidates)
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="could not follow") as caught:
        for step in range(2):
            root(**batch("CAUSAL_LM", seed=step)).backward()
            optimizer.step()
            optimizer.zero_grad()
    messages = [str(w.message) for w in caught if "could not follow" in str(w.message)]
    assert len(messages) == 1
    assert f"{name} ({share:.2%} of the candidate entries, in lm_head (Linear))" in messages[0]
