"""The `.pth` autoload runs at the start of every Python process in the environment: it must import nothing, and
import `peft_stoc` only in processes that import `peft`."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def _python(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_autoload_imports_no_module_at_start_up():
    """`-X importtime` prints each import after the imports it caused, indented one step deeper."""
    lines = [line for line in _python("-X", "importtime", "-c", "pass").stderr.splitlines() if "|" in line]
    tree = [(len(name) - len(name.lstrip()), name.strip()) for name in (line.rsplit("|", 1)[1] for line in lines)]
    position = next(i for i, (_, name) in enumerate(tree) if name == "_peft_stoc_autoload")
    depth = tree[position][0]
    caused = []
    for deeper, name in reversed(tree[:position]):
        if deeper <= depth:
            break
        caused.append(name)
    assert caused == []


def test_a_process_that_never_imports_peft_never_imports_peft_stoc():
    code = "import sys, json; print(json.dumps(['peft' in sys.modules, 'peft_stoc' in sys.modules]))"
    assert _python("-c", code).stdout.strip() == "[false, false]"


def test_importing_peft_registers_stoc_tuning():
    code = "import peft, sys; print(peft.PeftType.STOC, 'peft_stoc' in sys.modules)"
    assert re.search(r"STOC True$", _python("-c", code).stdout.strip())


SIDE_EFFECTS = """
import json, torch, peft, transformers, transformers.trainer
from torch.nn.modules import module
from torch.optim import optimizer


def seen():
    return {
        "module registration hooks": len(module._global_module_registration_hooks),
        "optimizer step hooks": len(optimizer._global_optimizer_pre_hooks)
        + len(optimizer._global_optimizer_post_hooks),
        "trainer callbacks": [c.__name__ for c in transformers.trainer.DEFAULT_CALLBACKS],
    }


start = seen()
config = transformers.LlamaConfig(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=24, max_position_embeddings=32,
)
model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(target_modules=["q_proj"]))
step = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ids = torch.randint(1, 64, (2, 8))
model(input_ids=ids, labels=ids).loss.backward()
step.step()
after_lora = seen()
from peft_stoc import StocTuningConfig

StocTuningConfig(task_type="CAUSAL_LM")
print(json.dumps([start, after_lora, seen(), type(model).__name__]))
"""


def test_a_process_using_only_lora_keeps_torch_transformers_and_peft_as_they_were():
    """peft_stoc is imported with peft, but hooks torch and transformers only once a StocTuning config is made."""
    start, after_lora, after_config, lora_class = json.loads(
        _python("-c", SIDE_EFFECTS).stdout.strip().splitlines()[-1]
    )
    assert start["module registration hooks"] == start["optimizer step hooks"] == 0
    assert "StocTuningCallback" not in start["trainer callbacks"]
    assert after_lora == start and lora_class == "PeftModel"
    assert after_config["module registration hooks"] == 1 and "StocTuningCallback" in after_config["trainer callbacks"]
