"""Tiny random models built from configs (no network) and small batches for them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
import transformers

import peft_stoc  # noqa: F401  (registers the method)

VOCAB = 96


def tiny_config(arch: str):
    if arch == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    if arch == "roberta":
        return transformers.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=70,
            pad_token_id=1,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=48,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    raise ValueError(arch)


HEADS = {
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "FEATURE_EXTRACTION": transformers.AutoModel,
}


def tiny_model(arch: str = "bert", task: str = "SEQ_CLS", seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    model = HEADS[task].from_config(config)
    return model


def batch(
    task: str = "SEQ_CLS", size: int = 4, length: int = 12, seed: int = 0, pad_from: int | None = 9, num_labels: int = 2
):
    """A batch with padding at the end of each row (from column `pad_from`)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    if pad_from is not None:
        mask[:, pad_from:] = 0
        ids[:, pad_from:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "SEQ_CLS":
        if num_labels == 1:
            out["labels"] = torch.rand(size, generator=generator)
        else:
            out["labels"] = torch.randint(0, num_labels, (size,), generator=generator)
    elif task == "TOKEN_CLS":
        labels = torch.randint(0, num_labels, (size, length), generator=generator)
        labels[mask == 0] = -100
        out["labels"] = labels
    elif task == "CAUSAL_LM":
        labels = ids.clone()
        labels[mask == 0] = -100
        out["labels"] = labels
    return out


def loss_of(model, inputs):
    out = model(**inputs)
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.last_hidden_state.pow(2).mean()


def base_snapshot(peft_model) -> dict[str, torch.Tensor]:
    """Every base parameter outside modules_to_save, by name."""
    tuner = peft_model.base_model
    return {name: p.detach().clone() for name, p in tuner.base_params().items()}


def changed_entries(peft_model, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat indices that differ from `before`, per tensor (only tensors with changes)."""
    out = {}
    for name, p in peft_model.base_model.base_params().items():
        diff = (p.detach() != before[name]).view(-1).nonzero().squeeze(1)
        if diff.numel():
            out[name] = diff
    return out


def drawn_entries(peft_model) -> dict[str, torch.Tensor]:
    engine = peft_model.base_model.stoc_engine()
    return {c.name: idx for c, idx in zip(engine.candidates, engine.last_draw) if idx.numel()}


def train_stoc(arch="bert", task="SEQ_CLS", steps=3, seed=0, model_seed=0, lr=1e-2, base=None, **config):
    """A StocTuning model trained for a few AdamW steps on random batches, returned in eval mode."""
    import peft

    config.setdefault("k", 40)
    base = base if base is not None else tiny_model(arch, task, seed=model_seed)
    model = peft.get_peft_model(base, peft_stoc.StocTuningConfig(task_type=task, seed=seed, **config))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        torch.manual_seed(1000 + step)
        loss_of(model, batch(task, seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


def predict(model, task="SEQ_CLS", seed=99):
    inputs = {k: v for k, v in batch(task, seed=seed).items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
