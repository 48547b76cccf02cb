"""The selection and training-step ratios on a CUDA device, in one short command (a few minutes on one GPU).

    python benchmarks/gpu.py [--no-write]            # on a machine with a CUDA GPU
    python benchmarks/gpu.py --device cpu --smoke    # checks the script itself on the CPU, small and fast

Runs `selection.measure` (RoBERTa-base shape, k = 0.08%: fast draw, top, dense draw, numpy's choice on the host,
full fine-tuning step) and `step.measure_time` / `step.measure_memories` (MiniLM-L6 and RoBERTa-base shape: full
fine-tuning, StocTuning, LoRA r=8; peak allocated CUDA memory per method in a fresh process), and writes the tables
to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys

import common
import selection
import step
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny repeat counts and MiniLM only: checks the script")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False). Run it on a machine with "
                 "a GPU, or check the script on the CPU with `python benchmarks/gpu.py --device cpu --smoke`.")
    common.quiet()
    torch.backends.cuda.matmul.allow_tf32 = False  # the same arithmetic as the CPU runs
    if args.smoke:
        selection_args = dict(model_name="minilm", k=0.0008, repeats=1, numpy_repeats=1, step_repeats=1)
        models, steps, memory_steps = ["minilm"], 1, 1
    else:
        selection_args = dict(model_name="roberta-base", k=0.0008, repeats=5, numpy_repeats=1, step_repeats=5)
        models, steps, memory_steps = ["minilm", "roberta-base"], 10, 4
    sections = [selection.report(selection.measure(device=args.device, **selection_args),
                                 f"Selection on {args.device} (target 1)")]
    for model in models:
        timing = step.measure_time(model, steps, args.device)
        memories = step.measure_memories(model, memory_steps, args.device, repeats=1 if args.smoke else 2)
        sections.append(step.report(timing, memories, args.device))
    text = "\n\n".join(sections)
    print(text)
    if not args.no_write:
        common.write_section(f"gpu-{args.device}" + ("-smoke" if args.smoke else ""), text)


if __name__ == "__main__":
    main()
