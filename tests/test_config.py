"""StocTuningConfig: its fields, validation and candidate choice, and its registration with PEFT."""

import importlib
import subprocess
import sys

import pytest
from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_stoc
from peft_stoc import StocTuningConfig, StocTuningModel

from .helpers import tiny_model


def test_import_adds_peft_type_and_registers_method():
    assert PeftType.STOC == "STOC"
    assert PeftType("STOC") is PeftType.STOC
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.STOC] is StocTuningConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.STOC] is StocTuningModel
    assert StocTuningConfig().peft_type is PeftType.STOC


def test_register_twice_and_reload_do_not_raise():
    peft_stoc.register()
    peft_stoc.register()
    importlib.reload(peft_stoc.integration.registry)
    reloaded = importlib.reload(peft_stoc)
    assert PeftType.STOC in PEFT_TYPE_TO_TUNER_MAPPING
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.STOC] is reloaded.StocTuningConfig
    assert list(PeftType).count(PeftType.STOC) == 1


def test_fresh_process_imports_twice():
    code = "import peft_stoc, importlib; importlib.reload(peft_stoc); import peft_stoc; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_config_round_trips_through_json(tmp_path):
    config = StocTuningConfig(
        k=0.001,
        selection="top",
        seed=7,
        activation_stat="rms",
        mask_interval=3,
        update_rule="strict",
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, StocTuningConfig)
    for field in ("k", "selection", "seed", "activation_stat", "mask_interval", "update_rule", "target_modules"):
        assert getattr(loaded, field) == getattr(config, field)


def test_fields_have_help():
    from dataclasses import fields

    own = {f.name for f in fields(StocTuningConfig)} - {f.name for f in fields(PeftConfig)}
    for f in fields(StocTuningConfig):
        if f.name in own:
            assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "positive"),
        ({"k": -3}, "positive"),
        ({"k": 1.0}, r"\(0, 1\)"),
        ({"k": 0.0}, r"\(0, 1\)"),
        ({"k": 1.5}, r"\(0, 1\)"),
        ({"k": "all"}, "bitfit"),
        ({"k": True}, "bool"),
        ({"selection": "greedy"}, "selection"),
        ({"activation_stat": "max"}, "activation_stat"),
        ({"update_rule": "sparse"}, "update_rule"),
        ({"mask_interval": 0}, "mask_interval"),
        ({"max_changed": 0}, "max_changed"),
        ({"save_dtype": "int8"}, "save_dtype"),
    ],
)
def test_invalid_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StocTuningConfig(**kwargs)


def test_k_not_smaller_than_candidates_is_refused():
    model = tiny_model("bert")
    total = sum(p.numel() for n, p in model.named_parameters() if "classifier" not in n)
    with pytest.raises(ValueError, match="only .* candidate entries"):
        get_peft_model(model, StocTuningConfig(k=total, task_type="SEQ_CLS"))


def test_target_modules_matching_nothing_is_refused():
    with pytest.raises(ValueError, match="No candidate parameters"):
        get_peft_model(tiny_model("bert"), StocTuningConfig(k=10, target_modules=["nope"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="No candidate parameters"):
        get_peft_model(tiny_model("bert"), StocTuningConfig(k=10, target_modules=r"zzz.*", task_type="SEQ_CLS"))


def test_bitfit_k_counts_bias_entries_of_candidates():
    model = get_peft_model(tiny_model("bert"), StocTuningConfig(k="bitfit", task_type="SEQ_CLS"))
    tuner = model.base_model
    expected = sum(p.numel() for n, p in tuner.base_params().items() if n.endswith(".bias"))
    assert tuner._adapters["default"].k == expected
    assert not any("classifier" in n for n in tuner.base_params())


def test_target_and_exclude_modules_choose_candidates():
    model = get_peft_model(
        tiny_model("bert"),
        StocTuningConfig(
            k=10,
            target_modules=["query", "value", "LayerNorm"],
            exclude_modules=["0.attention.self.value"],
            task_type="SEQ_CLS",
        ),
    )
    names = set(model.base_model.base_params())
    assert "bert.encoder.layer.1.attention.self.value.weight" in names
    assert "bert.encoder.layer.0.attention.self.value.weight" not in names
    assert "bert.encoder.layer.0.attention.self.query.bias" in names
    assert "bert.embeddings.LayerNorm.weight" in names
    assert not any(".key." in n or "intermediate" in n for n in names)


def test_float_k_is_a_fraction_of_candidates():
    model = get_peft_model(tiny_model("bert"), StocTuningConfig(k=0.01, task_type="SEQ_CLS"))
    tuner = model.base_model
    total = sum(p.numel() for p in tuner.base_params().values())
    assert tuner._adapters["default"].k == round(0.01 * total)


def test_modules_to_save_as_a_string_is_refused_with_the_list_to_write():
    with pytest.raises(ValueError, match=r"write modules_to_save=\['classifier'\]"):
        StocTuningConfig(modules_to_save="classifier")
