"""The selection, training-step and memory ratios on a CUDA device, in one short command (a few minutes on one GPU).

    python benchmarks/gpu.py [--no-write] [--only-llama]  # on a machine with a CUDA GPU
    python benchmarks/gpu.py --device cpu --smoke          # checks the script itself on the CPU, small and fast

Runs `draw_speed.measure` (RoBERTa-base shape, k = 0.08%: fast draw, top, dense draw, numpy's choice on the host,
full fine-tuning step), `step.measure_time` / `step.measure_memories` (MiniLM-L6 and RoBERTa-base shape: full
fine-tuning, StocTuning lean and dense, LoRA r=8; peak allocated CUDA memory per method in a fresh process), and the
memory comparison of a Llama-architecture model of 1.1B parameters (TinyLlama-1.1B's shape, built from a config with
random weights) in bfloat16, batch 4 × 512, AdamW, 3 steps: full fine-tuning (bf16 weights, gradients and AdamW
state; and, for reference, float32 weights under bf16 autocast), LoRA r=8 on q_proj and v_proj, and StocTuning
(k = 0.08%) with memory "lean", "auto" and "dense" — `torch.cuda.max_memory_allocated` of each method in a fresh
process, every StocTuning step checked to draw exactly k entries; and the same model with its linear layers in 4 bits
(bitsandbytes NF4, double quantization, bf16 compute): QLoRA r=8 on q_proj and v_proj against StocTuning lean.
Writes the tables to docs/benchmarks.md.
`--smoke` uses a tiny Llama (2 layers, hidden 64, batch 2 × 32) and tiny repeat counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common
import draw_speed
import step
import torch
import transformers

LLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
LLAMA_SMOKE = dict(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    tie_word_embeddings=False,
)
LLAMA_METHODS = (
    "full fine-tuning (bf16)",
    "full fine-tuning (fp32 weights, bf16 autocast)",
    "LoRA r=8",
    "StocTuning lean",
    "StocTuning auto",
    "StocTuning dense",
    "QLoRA r=8 (NF4 base)",
    "StocTuning lean (NF4 base)",
)
K_FRACTION = 0.0008


def nf4_llama(config, device: str):
    """The Llama model with its linear layers quantized by bitsandbytes to NF4 (double quantization, bf16 compute)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map=device, dtype=torch.bfloat16
        )


def llama_child(method: str, device: str, smoke: bool, steps: int = 3) -> dict:
    """Peak memory (MiB) of `steps` training steps of `method` on the Llama model, in this process."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import peft_stoc

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(LLAMA_SMOKE if smoke else LLAMA))
    autocast = "autocast" in method
    dtype = torch.float32 if autocast else torch.bfloat16
    if "NF4" in method:
        model = prepare_model_for_kbit_training(nf4_llama(config, device), use_gradient_checkpointing=False)
    else:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if method.startswith("QLoRA"):
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )
    elif method == "StocTuning lean (NF4 base)":
        model = get_peft_model(model, peft_stoc.StocTuningConfig(k=K_FRACTION, task_type="CAUSAL_LM", memory="lean"))
    elif method == "LoRA r=8":
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )
    elif method.startswith("StocTuning"):
        model = get_peft_model(
            model, peft_stoc.StocTuningConfig(k=K_FRACTION, task_type="CAUSAL_LM", memory=method.split()[-1])
        )
    model.train()
    batch, length = (2, 32) if smoke else (4, 512)
    batches = [
        common.causal_batch(config.vocab_size, batch=batch, length=length, seed=s, device=device) for s in range(steps)
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        weights = common.rss_mib()
        common.reset_peak_rss()
    parameters = sum(p.numel() for p in model.parameters() if getattr(p, "stoc_overlay", None) is None)
    peaks, times, stats = [], [], []
    for i in range(steps):
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batches[i]).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        else:
            peaks.append(common.peak_rss_mib())
            common.reset_peak_rss()
        times.append(time.perf_counter() - start)
        if method.startswith("StocTuning"):
            figures = model.stoc_stats()
            engine = model.base_model.stoc_engine()
            if figures["drawn"] != engine.k:
                raise RuntimeError(f"{method}: step {i + 1} drew {figures['drawn']} entries, not k = {engine.k}")
            stats.append({name: figures[name] for name in ("drawn", "changed", "grad_bytes", "optimizer_state_bytes")})
            if engine.lean is not None:
                engine.lean.peak_grad_bytes = 0  # peft_stoc 0.1.0 keeps the largest of all steps; want the latest
    return {
        "parameters": parameters,
        "weights_mib": weights,
        "step_peaks_mib": peaks,
        "peak_mib": max(peaks),
        "step_s": times,
        "stats": stats,
    }


def llama_memory(device: str, smoke: bool, repeats: int) -> dict[str, list[dict]]:
    """Every method of LLAMA_METHODS in `repeats` fresh processes each, the order alternating."""
    out: dict[str, list[dict]] = {method: [] for method in LLAMA_METHODS}
    for round_ in range(repeats):
        for method in LLAMA_METHODS if round_ % 2 == 0 else LLAMA_METHODS[::-1]:
            command = [sys.executable, __file__, "--llama-child", method, "--device", device]
            if smoke:
                command.append("--smoke")
            result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            if result.returncode:
                sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
            out[method].append(json.loads(result.stdout.strip().splitlines()[-1]))
    return out


def llama_report(runs: dict[str, list[dict]], device: str, smoke: bool) -> str:
    cuda = device.startswith("cuda")
    kind = "peak allocated CUDA memory (torch.cuda.max_memory_allocated)" if cuda else "peak RSS"
    config = LLAMA_SMOKE if smoke else LLAMA
    sample = runs["full fine-tuning (bf16)"][0]
    peak = {method: common.median([r["peak_mib"] for r in values]) for method, values in runs.items()}
    full, lora, lean = peak["full fine-tuning (bf16)"], peak["LoRA r=8"], peak["StocTuning lean"]
    rows = []
    for method, values in runs.items():
        first = values[0]
        stats = first["stats"]
        rows.append(
            [
                method,
                f"{peak[method]:.0f}",
                f"{peak[method] / full:.3f}",
                f"{peak[method] / lora:.3f}",
                f"{common.median([r['weights_mib'] for r in values]):.0f}",
                " / ".join(
                    f"{common.median([r['step_peaks_mib'][i] for r in values]):.0f}"
                    for i in range(len(first["step_peaks_mib"]))
                ),
                " / ".join(f"{s['grad_bytes'] / 2**20:.1f}" for s in stats) or "–",
                " / ".join(f"{s['optimizer_state_bytes'] / 2**20:.2f}" for s in stats) or "–",
                f"{stats[-1]['optimizer_state_bytes'] / stats[-1]['changed']:.1f}" if stats else "–",
                f"{common.median([t for r in values for t in r['step_s'][1:]]) * 1e3:.0f}",
            ]
        )
    batch = "2 × 32" if smoke else "4 × 512"
    size = (
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, intermediate "
        f"{config['intermediate_size']}, {config['num_attention_heads']} heads ({config['num_key_value_heads']} "
        f"key/value), vocabulary {config['vocab_size']}, untied embeddings"
    )
    qlora, nf4 = peak["QLoRA r=8 (NF4 base)"], peak["StocTuning lean (NF4 base)"]
    targets = [
        ["StocTuning lean ≤ 1.05 × LoRA r=8", f"{lean / lora:.3f}", "yes" if lean / lora <= 1.05 else "**no**"],
        ["StocTuning lean ÷ full fine-tuning (bf16)", f"{lean / full:.3f}", "–"],
        [
            "StocTuning lean ≤ 1.15 × QLoRA r=8 (NF4 base)",
            f"{nf4 / qlora:.3f}",
            "yes" if nf4 / qlora <= 1.15 else "**no**",
        ],
    ]
    return "\n".join(
        [
            f"### Memory of training a Llama model of {sample['parameters'] / 1e6:,.1f}M parameters "
            f"({'smoke sizes' if smoke else 'TinyLlama-1.1B shape'}), bf16, batch {batch}, AdamW",
            "",
            f"`{common.command()}` — {common.today()}; {common.machine(device)}.",
            f"{size}; random weights. {kind}, median of {len(runs['LoRA r=8'])} fresh process(es) per method; "
            '"weights" is what was allocated before the first step. Every StocTuning step drew exactly k entries.',
            "",
            common.table(["target", "measured", "met"], targets),
            "",
            common.table(
                [
                    "method",
                    "peak MiB",
                    "÷ full FT (bf16)",
                    "÷ LoRA",
                    "weights MiB",
                    "peak of step 1 / 2 / 3",
                    "grad MiB per step",
                    "optimizer state MiB per step",
                    "state B / changed entry",
                    "ms per step",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and repeat counts: checks the script")
    parser.add_argument("--only-llama", action="store_true", help="only the Llama memory comparison")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--llama-child", choices=LLAMA_METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False). Run it on a machine with "
            "a GPU, or check the script on the CPU with `python benchmarks/gpu.py --device cpu --smoke`."
        )
    common.quiet()
    torch.backends.cuda.matmul.allow_tf32 = False  # the same arithmetic as the CPU runs
    if args.llama_child:
        print(json.dumps(llama_child(args.llama_child, args.device, args.smoke)))
        return
    if args.smoke:
        selection_args = dict(model_name="minilm", k=0.0008, repeats=1, numpy_repeats=1, step_repeats=1)
        models, steps, memory_steps = ["minilm"], 1, 1
    else:
        selection_args = dict(model_name="roberta-base", k=0.0008, repeats=5, numpy_repeats=1, step_repeats=5)
        models, steps, memory_steps = ["minilm", "roberta-base"], 10, 4
    sections = []
    if not args.only_llama:
        sections.append(
            draw_speed.report(
                draw_speed.measure(device=args.device, **selection_args), f"Selection on {args.device} (draw speed)"
            )
        )
        for model in models:
            timing = step.measure_time(model, steps, args.device)
            memories = step.measure_memories(model, memory_steps, args.device, repeats=1 if args.smoke else 2)
            sections.append(step.report(timing, memories, args.device))
    runs = llama_memory(args.device, args.smoke, repeats=1 if args.smoke else 2)
    sections.append(llama_report(runs, args.device, args.smoke))
    text = "\n\n".join(sections)
    print(text)
    if not args.no_write:
        common.write_section(f"gpu-{args.device}" + ("-smoke" if args.smoke else ""), text)


if __name__ == "__main__":
    main()
