"""The package as users get it: `python -m build` makes an sdist and a wheel (the wheel built from the sdist), and
each installs into a fresh virtual environment where it registers with PEFT, trains two steps with the default
config, saves, and loads in a fresh process that never imports `peft_stoc` itself.

Nothing is downloaded: the fresh environments see the dependencies already installed here (torch, transformers,
peft, ...; hatchling to build the sdist) through a folder of links that leaves out this checkout's own install, so
pip resolves the wheel's declared requirements against them with `--no-index`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN = ("peft_stoc", "_peft_stoc", "_editable_impl_peft_stoc", "__editable__", "peft-stoc")

TRAIN = """
import json, sys
import peft, torch, transformers
import peft_stoc
from peft import PeftType, get_peft_model
from peft_stoc import StocTuningConfig

venv, out = sys.argv[1], sys.argv[2]
assert peft_stoc.__file__.startswith(venv), peft_stoc.__file__
assert PeftType.STOC == "STOC"
torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=24, max_position_embeddings=32, pad_token_id=0,
)
transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out + "/base")
base = transformers.AutoModelForCausalLM.from_pretrained(out + "/base")
model = get_peft_model(base, StocTuningConfig(task_type="CAUSAL_LM"))  # the defaults: k="bitfit" on a bias-free model
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
assert model.stoc_stats()["changed"] > 0
model.save_pretrained(out + "/adapter")
model.eval()
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, out + "/expected.pt")
"""

LOAD = """
import sys
import torch, transformers
from peft import PeftModel  # the installed .pth hook registers StocTuning: no `import peft_stoc` here

venv, out = sys.argv[1], sys.argv[2]
expected = torch.load(out + "/expected.pt")
base = transformers.AutoModelForCausalLM.from_pretrained(out + "/base")
model = PeftModel.from_pretrained(base, out + "/adapter").eval()
assert sys.modules["peft_stoc"].__file__.startswith(venv)
assert sys.modules["_peft_stoc_autoload"].__file__.startswith(venv)
with torch.no_grad():
    assert torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"])
print("loaded")
"""


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="`pip install -e .[test]` installs `build`")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT])
    return out


@pytest.fixture(scope="module")
def dependencies(tmp_path_factory) -> Path:
    """Links to every installed distribution here except this checkout's own install."""
    folder = tmp_path_factory.mktemp("dependencies")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(OWN) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def test_sdist_and_wheel_hold_the_package_and_its_import_hook(dist):
    import tarfile
    import zipfile

    (wheel,) = dist.glob("peft_stoc-*.whl")
    (sdist,) = dist.glob("peft_stoc-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"peft_stoc/__init__.py", "_peft_stoc_autoload.py", "peft_stoc_autoload.pth"} <= set(names)
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "peft-stoc = peft_stoc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    members = tarfile.open(sdist).getnames()
    top = members[0].split("/")[0]
    for needed in ("pyproject.toml", "README.md", "LICENSE", "peft_stoc/__init__.py", "_peft_stoc_autoload.py"):
        assert f"{top}/{needed}" in members, needed
    assert not any("/.venv/" in m or "/outputs/" in m for m in members)


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_package_installs_into_a_fresh_venv_trains_saves_and_loads(dist, dependencies, tmp_path, kind):
    artifact = next(dist.glob("peft_stoc-*.whl" if kind == "wheel" else "peft_stoc-*.tar.gz"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "_dependencies.pth").write_text(f"{dependencies}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # pip resolves the declared requirements (torch, peft, ...) against what the fresh environment sees; no index.
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-build-isolation"]
    _run([*install, artifact], env=env)
    work = tmp_path / "work"  # outside the checkout, so that only the installed package can be imported
    work.mkdir()
    _run([python, "-c", textwrap.dedent(TRAIN), venv, work], cwd=work, env=env)
    assert _run([python, "-c", textwrap.dedent(LOAD), venv, work], cwd=work, env=env).stdout.strip() == "loaded"
    inspected = _run([venv / "bin" / "peft-stoc", "inspect", work / "adapter"], cwd=work, env=env)
    assert "changed" in inspected.stdout
