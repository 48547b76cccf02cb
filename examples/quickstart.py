"""Quickstart: StocTuning on a small BERT built from a config, fully offline.

The task is synthetic — does the sentence contain token 7? — so it runs anywhere in under a minute. It shows the
whole life cycle: train with a plain PyTorch loop, look at the per-step figures, save the sparse adapter, load it
back, and merge it into a standalone model.
"""

import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import peft_stoc  # noqa: F401  (registers StocTuning with PEFT)
from peft_stoc import StocTuningConfig


def make_batch(generator: torch.Generator, size: int = 32, length: int = 16):
    ids = torch.randint(10, 200, (size, length), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    ids[labels == 1, torch.randint(0, length, (int(labels.sum()),), generator=generator)] = 7
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def accuracy(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float((logits.argmax(-1) == batch["labels"]).float().mean())


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    base = BertForSequenceClassification(config)
    model = get_peft_model(base, StocTuningConfig(k="bitfit", task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    held_out = make_batch(torch.Generator().manual_seed(123), size=256)
    print(f"accuracy before: {accuracy(model, held_out):.3f}")
    for step in range(1, 151):
        model.train()
        model(**make_batch(generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            stats = model.stoc_stats()
            print(
                f"step {step}: drawn {stats['drawn']}, changed so far {stats['changed']:,} "
                f"({stats['density']:.2%} of candidates), adapter ≈ {stats['adapter_bytes'] / 1024:.1f} KB"
            )
    trained = accuracy(model, held_out)
    print(f"accuracy after:  {trained:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = (Path(folder) / "adapter_model.safetensors").stat().st_size
        full = sum(p.numel() * p.element_size() for p in base.parameters())
        print(f"adapter file: {size / 1024:.1f} KB (the full model: {full / 1024:.0f} KB)")
        torch.manual_seed(0)
        reloaded = PeftModel.from_pretrained(BertForSequenceClassification(config), folder)
        print(f"reloaded accuracy: {accuracy(reloaded, held_out):.3f}")
        merged = reloaded.merge_and_unload()
        print(f"merged ({type(merged).__name__}) accuracy: {accuracy(merged, held_out):.3f}")


if __name__ == "__main__":
    main()
