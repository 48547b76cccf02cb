"""Quantized bases: no weight is left out in silence, and quantizers StocTuning cannot work with are refused."""

import warnings

import pytest
import torch
import transformers
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import tiny_model

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install .[quantized])")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", "CAUSAL_LM").save_pretrained(path)
    return path


def _quantized(path, bits: int):
    if bits == 4:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization, device_map="cpu"
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_left_out_are_named_in_one_warning(llama_dir, bits):
    model = _quantized(llama_dir, bits)
    with pytest.warns(UserWarning, match=r"leaves 14 weights .* out of the candidates") as caught:
        peft_model = get_peft_model(model, StocTuningConfig(k=20, task_type="CAUSAL_LM"))
    text = "\n".join(str(w.message) for w in caught if "leaves" in str(w.message))
    assert "model.layers.0.self_attn.q_proj.weight' (Linear" in text and f"bitsandbytes {bits}-bit weights" in text
    names = {c.name for c in peft_model.base_model._adapters["default"].candidates}
    assert names and all("proj" not in name for name in names)  # embeddings and norms only, as the warning says


def test_target_modules_matching_only_quantized_weights_raise(llama_dir):
    model = _quantized(llama_dir, 4)
    with pytest.raises(ValueError, match="match only weights StocTuning cannot draw from.*bitsandbytes 4-bit"):
        get_peft_model(model, StocTuningConfig(k=20, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    assert not hasattr(model, "stoc_tuning")  # nothing stayed attached


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "torchao", "quanto"])
def test_other_quantizers_are_refused_before_anything_is_attached(method):
    model = tiny_model("llama", "CAUSAL_LM")
    model.config.quantization_config = {"quant_method": method}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"quantized with '{method}'"):
        get_peft_model(model, StocTuningConfig(k=20, task_type="CAUSAL_LM"))
    assert not hasattr(model, "stoc_tuning")
    assert all(torch.equal(p, before[name]) and p.requires_grad for name, p in model.named_parameters())
