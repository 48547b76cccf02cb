"""The `.pth` autoload runs at the start of every Python process in the environment: it must import nothing, and
import `peft_stoc` only in processes that import `peft`."""

from __future__ import annotations

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
