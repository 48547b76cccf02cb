"""Driver of PEFT's generic test batteries (`test_custom_models.py`, `test_decoder_models.py`,
`test_encoder_decoder_models.py`, `testing_common.py` and `testing_utils.py` of PEFT 0.21.2, kept as released) for
StocTuning. See README.md in this folder.

What it does, before pytest collects PEFT's modules:
* replaces the case lists the batteries are parametrised by (`TEST_CASES`, `ALL_PEFT_CONFIG_CLASSES`,
  `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`, `MIXED_ADAPTER_TEST_CASES` of the custom-model battery; the model ids and
  `ALL_CONFIGS` of the decoder and encoder-decoder batteries) with StocTuning cases, in place;
* gives `init_weights=False` a StocTuning meaning (see `_random_initial_delta`);
* keeps the Hub offline and resolves the Hub ids of the decoder and encoder-decoder batteries to tiny models built
  locally (`tiny_models.py`);
and at collection: deselects every test of the modules that runs no StocTuning case, and skips the tests named in
`skips.txt` with the reason given there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

# PEFT's testing_common imports diffusers for its Stable Diffusion tests only (an isinstance check); none of them
# runs here, so a stand-in class spares a large dependency.
if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
    _diffusers = types.ModuleType("diffusers")
    _diffusers.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = _diffusers

import peft_stoc  # noqa: E402,F401  registers the method with PEFT
from peft_stoc import SparseDelta, StocTuningConfig, StocTuningModel  # noqa: E402

from . import test_custom_models as battery  # noqa: E402
from . import test_decoder_models as decoder_battery  # noqa: E402
from . import test_encoder_decoder_models as encoder_decoder_battery  # noqa: E402
from . import testing_common  # noqa: E402
from .tiny_models import build_tiny_hub  # noqa: E402

HERE = Path(__file__).parent
SKIP_FILE = HERE / "skips.txt"

# (name, model id, config class, config kwargs), as PEFT's TEST_CASES. The models are PEFT's: "MLP" (two Linear
# layers), "MLP_LayerNorm" (LayerNorms before each Linear), "EmbConv1D" (Embedding, transformers Conv1D, Linear) and
# "Conv2d" (Conv2d, Linear).
STOC_CASES = [
    ("StocTuning MLP k int", "MLP", StocTuningConfig, {"k": 20}),
    ("StocTuning MLP k fraction", "MLP", StocTuningConfig, {"k": 0.1}),
    ("StocTuning MLP k bitfit", "MLP", StocTuningConfig, {"k": "bitfit"}),
    ("StocTuning MLP top strict", "MLP", StocTuningConfig, {"k": 20, "selection": "top", "update_rule": "strict"}),
    ("StocTuning MLP target lin0", "MLP", StocTuningConfig, {"k": 10, "target_modules": ["lin0"]}),
    (
        "StocTuning MLP modules_to_save",
        "MLP",
        StocTuningConfig,
        {"k": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    ("StocTuning MLP_LayerNorm k fraction", "MLP_LayerNorm", StocTuningConfig, {"k": 0.1}),
    (
        "StocTuning MLP_LayerNorm norms top strict",
        "MLP_LayerNorm",
        StocTuningConfig,
        {"k": 8, "target_modules": ["layernorm0", "layernorm1"], "selection": "top", "update_rule": "strict"},
    ),
    ("StocTuning EmbConv1D k int", "EmbConv1D", StocTuningConfig, {"k": 20}),
    (
        "StocTuning EmbConv1D modules_to_save",
        "EmbConv1D",
        StocTuningConfig,
        {"k": 0.05, "target_modules": ["emb", "conv1d"], "modules_to_save": ["lin0"]},
    ),
    ("StocTuning Conv2d k fraction", "Conv2d", StocTuningConfig, {"k": 0.05}),
    (
        "StocTuning Conv2d bitfit top strict",
        "Conv2d",
        StocTuningConfig,
        {"k": "bitfit", "selection": "top", "update_rule": "strict"},
    ),
]

# (name, tuner method, config class, kwargs of adapter 1, kwargs of adapter 2) on PEFT's MLP.
STOC_MULTI_CASES = [
    (
        "StocTuning Same",
        "stoc",
        StocTuningConfig,
        {"k": 20, "target_modules": ["lin0"]},
        {"k": 20, "target_modules": ["lin0"]},
    ),
    (
        "StocTuning Different",
        "stoc",
        StocTuningConfig,
        {"k": 20, "target_modules": ["lin0"]},
        {"k": 5, "target_modules": ["lin1"]},
    ),
]

STOC_MIXED_CASES = [
    (
        "StocTuning mixed adapter",
        StocTuningConfig(target_modules=["lin0"], k=20),
        StocTuningConfig(target_modules=["lin0"], k=0.1),
    ),
]


def _case_id(name: str) -> str:
    """'StocTuning MLP k int' -> 'mlp-k-int'."""
    return re.sub(r"[^a-z0-9_]+", "-", name.removeprefix("StocTuning ").lower()).strip("-")


battery.TEST_CASES[:] = [pytest.param(*case, id=_case_id(case[0])) for case in STOC_CASES]
battery.ALL_PEFT_CONFIG_CLASSES[:] = [StocTuningConfig]
battery.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = [pytest.param(*c, id=_case_id(c[0])) for c in STOC_MULTI_CASES]
battery.MIXED_ADAPTER_TEST_CASES[:] = [pytest.param(*c, id=_case_id(c[0])) for c in STOC_MIXED_CASES]


# -- the decoder and encoder-decoder batteries ---------------------------------------------------------------------
# Each test of these batteries runs every (model id, (config class, kwargs)) pair of its two lists. The models kept
# are a few of PEFT's own ids (built locally, see tiny_models.py): OPT, GPT-2 (transformers Conv1D layers) and Llama
# (no biases, RMSNorm) for the decoders; T5 and BART for the encoder-decoders. Short ids name them in test ids.
DECODER_MODELS = {
    "opt": "peft-internal-testing/tiny-random-OPTForCausalLM",
    "gpt2": "peft-internal-testing/tiny-random-GPT2LMHeadModel",
    "llama": "trl-internal-testing/tiny-random-LlamaForCausalLM",
}
ENCODER_DECODER_MODELS = {
    "t5": "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated",
    "bart": "peft-internal-testing/tiny-random-BartForConditionalGeneration",
}

# (name, config kwargs) of the StocTuning cases, with the task type of the battery added. `target_modules=None`
# makes every parameter of the model a candidate: embeddings (tied to the LM head in OPT, GPT-2, T5 and BART), norms,
# attention and feed-forward weights and biases.
# The third case leaves the embeddings out (query and value projections only: their names in every model kept) and
# keeps dense gradients (`memory="dense"`), as a user of an optimizer outside SGD/Adam/AdamW would.
STOC_DECODER_CASES = [
    ("StocTuning k int", {"k": 20}),
    ("StocTuning fraction top strict", {"k": 0.01, "selection": "top", "update_rule": "strict"}),
    ("StocTuning qv dense", {"k": 0.05, "target_modules": ["q_proj", "v_proj", "c_attn"], "memory": "dense"}),
]
STOC_ENCODER_DECODER_CASES = [
    ("StocTuning k int", {"k": 20}),
    ("StocTuning fraction top strict", {"k": 0.01, "selection": "top", "update_rule": "strict"}),
    ("StocTuning qv dense", {"k": 0.05, "target_modules": ["q", "v", "q_proj", "v_proj"], "memory": "dense"}),
]

decoder_battery.PEFT_DECODER_MODELS_TO_TEST[:] = [pytest.param(i, id=short) for short, i in DECODER_MODELS.items()]
decoder_battery.ALL_CONFIGS[:] = [
    pytest.param(StocTuningConfig, {"task_type": "CAUSAL_LM", **kwargs}, id=_case_id(name))
    for name, kwargs in STOC_DECODER_CASES
]
encoder_decoder_battery.PEFT_ENCODER_DECODER_MODELS_TO_TEST[:] = [
    pytest.param(i, id=short) for short, i in ENCODER_DECODER_MODELS.items()
]
encoder_decoder_battery.ALL_CONFIGS[:] = [
    pytest.param(StocTuningConfig, {"task_type": "SEQ_2_SEQ_LM", **kwargs}, id=_case_id(name))
    for name, kwargs in STOC_ENCODER_DECODER_CASES
]

# Two of PEFT's skip helpers would leave StocTuning out for reasons that concern other methods:
# `_skip_if_conv1d_not_supported` skips every method but LoRA, IA3, LoHa and LoKr on GPT-2's transformers Conv1D
# layers in the merge tests (StocTuning supports them), and the decoder battery's `check_beft_config` skips every
# method on Llama in the merge tests ("no bias term", meant for BEFT: its `isinstance` test on a class is never true).
# For StocTuning cases both let the test run; other methods keep PEFT's behaviour.
_original_skip_if_conv1d_not_supported = testing_common._skip_if_conv1d_not_supported
_original_check_beft_config = decoder_battery.check_beft_config


def _skip_if_conv1d_not_supported(model_id, config_cls, config_kwargs):
    if not (isinstance(config_cls, type) and issubclass(config_cls, StocTuningConfig)):
        _original_skip_if_conv1d_not_supported(model_id, config_cls, config_kwargs)


def _check_beft_config(config_cls, model_id, config_kwargs):
    if not (isinstance(config_cls, type) and issubclass(config_cls, StocTuningConfig)):
        _original_check_beft_config(config_cls, model_id, config_kwargs)


testing_common._skip_if_conv1d_not_supported = _skip_if_conv1d_not_supported
decoder_battery.check_beft_config = _check_beft_config

HUB_BATTERIES = {Path(decoder_battery.__file__).name, Path(encoder_decoder_battery.__file__).name}
BATTERY_FILES = {Path(battery.__file__).name, *HUB_BATTERIES}


# -- Hub model ids -------------------------------------------------------------------------------------------------
# PEFT's `hub_online_once(model_id)` lets the first load of each id go online (then offline). The Hub is never
# reached here: the context manager is replaced by one that keeps it offline, and the ids resolve to the local Hub
# cache of `_local_hub`.
@contextlib.contextmanager
def _hub_offline(model_id: str):
    yield


for _module in (testing_common, decoder_battery, encoder_decoder_battery):
    _module.hub_online_once = _hub_offline


@pytest.fixture(scope="session")
def _local_hub(tmp_path_factory):
    """A Hub cache holding the tiny models of the decoder and encoder-decoder batteries, in use for the session."""
    from huggingface_hub import constants

    cache = build_tiny_hub(tmp_path_factory.mktemp("hub"), [*DECODER_MODELS.values(), *ENCODER_DECODER_MODELS.values()])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield cache


@pytest.fixture(autouse=True)
def _hub_models_local(request):
    """Tests of the decoder and encoder-decoder batteries load their Hub ids from the local cache."""
    if request.node.path.name in HUB_BATTERIES:
        request.getfixturevalue("_local_hub")


# -- init_weights=False -------------------------------------------------------------------------------------------
# PEFT's tests ask for an adapter that is not the identity at creation (`set_init_weights_false`, and the
# `init_*_weights=False` of every case in the multi-adapter and mixed-batch lists), so that saving, loading and
# merging move real values. A StocTuning adapter starts as an empty delta; its counterpart of a random initialisation
# is a random sparse delta: every trainable candidate entry with probability 1/2, values N(0, 0.1^2), drawn from
# torch's global generator (so the test's seeds govern it, as they govern LoRA's random init). It is set through the
# tuner's `set_adapter_delta`, as loading sets a delta; a load replaces it.
_RANDOM_INIT = {"on": False}
_ALWAYS_RANDOM_INIT_CLASSES = ("TestMultipleActiveAdapters", "TestMixedAdapterBatches")
_original_set_init_weights_false = battery.set_init_weights_false


def _set_init_weights_false(config_cls, kwargs):
    if isinstance(config_cls, type) and issubclass(config_cls, StocTuningConfig):
        _RANDOM_INIT["on"] = True
        return dict(kwargs)
    return _original_set_init_weights_false(config_cls, kwargs)


for _module in (battery, decoder_battery, encoder_decoder_battery):
    _module.set_init_weights_false = _set_init_weights_false


def _random_initial_delta(tuner: StocTuningModel, adapter_name: str) -> None:
    tensors = {}
    for candidate in tuner._trainable_candidates(adapter_name):
        param = candidate.param
        index = torch.nonzero(torch.rand(param.numel()) < 0.5).flatten()
        values = 0.1 * torch.randn(index.numel())
        tensors[candidate.name] = (index.to(param.device), values.to(param.device))
    tuner.set_adapter_delta(adapter_name, SparseDelta(tensors))


_original_inject_adapter = StocTuningModel.inject_adapter


def _inject_adapter(self, model, adapter_name, *args, **kwargs):
    _original_inject_adapter(self, model, adapter_name, *args, **kwargs)
    if _RANDOM_INIT["on"]:
        _random_initial_delta(self, adapter_name)


@pytest.fixture(autouse=True)
def _stoc_random_init(request, monkeypatch):
    """Per test: random initial deltas off (on for the multi-adapter and mixed-batch classes) until the test asks."""
    cls = getattr(request.node, "cls", None)
    _RANDOM_INIT["on"] = cls is not None and cls.__name__ in _ALWAYS_RANDOM_INIT_CLASSES
    monkeypatch.setattr(StocTuningModel, "inject_adapter", _inject_adapter)
    yield
    _RANDOM_INIT["on"] = False


# -- selection and skips -------------------------------------------------------------------------------------------
def _runs_stoc(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for value in callspec.params.values():
        if value is StocTuningConfig or isinstance(value, StocTuningConfig):
            return True
    return False


def read_skips(path: Path = SKIP_FILE) -> list[tuple[str, str, str, re.Pattern]]:
    """(pattern, category, reason, regex) per entry of the skip file. `*` is the only wildcard."""
    entries, category = [], "uncategorised"
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            category = line[1:-1].strip()
            continue
        pattern, sep, reason = (part.strip() for part in line.partition(" | "))
        if not sep or not reason:
            raise pytest.UsageError(f"{path}:{number}: expected 'test id pattern | reason', got {raw!r}")
        regex = re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
        entries.append((pattern, category, reason, regex))
    return entries


def _short_id(item) -> str:
    return item.nodeid.split("::", 1)[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    ours = [item for item in items if item.path.parent == HERE]
    if not ours:
        return
    deselected = [item for item in ours if not _runs_stoc(item)]
    if deselected:
        dropped = {id(item) for item in deselected}
        items[:] = [item for item in items if id(item) not in dropped]
        config.hook.pytest_deselected(items=deselected)
    entries = read_skips()
    used = set()
    counts: dict[str, int] = {}
    for item in items:
        if item.path.parent != HERE:
            continue
        name = _short_id(item)
        for pattern, category, reason, regex in entries:
            if regex.fullmatch(name):
                item.add_marker(pytest.mark.skip(reason=f"not applicable to StocTuning [{category}]: {reason}"))
                used.add(pattern)
                counts[category] = counts.get(category, 0) + 1
                break
    config.stash[_COUNTS] = counts
    whole_battery = (
        {item.path.name for item in ours} >= BATTERY_FILES
        and not any("::" in str(arg) for arg in config.args)
        and not config.option.keyword
    )
    unused = [pattern for pattern, *_ in entries if pattern not in used]
    if whole_battery and unused:
        raise pytest.UsageError(f"{SKIP_FILE.name}: entries that match no collected test: {unused}")


_COUNTS = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(_COUNTS, None)
    if counts:
        terminalreporter.write_line(
            "PEFT battery, skipped as not applicable to StocTuning: "
            + ", ".join(f"{category}: {n}" for category, n in sorted(counts.items()))
        )
