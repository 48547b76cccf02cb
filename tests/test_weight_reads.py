"""Every read of a weight sees the right model: inside `disable_adapter()` the base (a module's forward, a direct
`.weight` read, TRL's fused log-prob head, the encoder that `generate` calls, `state_dict()`), outside it the
adapter; a graph built before a switch stays valid after the switch back; loading base weights keeps the adapter."""

import copy

import pytest
import torch
import transformers
from peft import get_peft_model, set_base_model_state_dict

from peft_stoc import StocTuningConfig

from .helpers import VOCAB, tiny_config


def _seq2seq_config(arch: str):
    if arch == "t5":
        return transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2, decoder_start_token_id=0
        )
    return transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )


ARCHS = {
    "llama-tied": ("CAUSAL_LM", lambda: tiny_config("llama")),
    "llama-untied": ("CAUSAL_LM", lambda: _untied(tiny_config("llama"))),
    "gpt2": ("CAUSAL_LM", lambda: tiny_config("gpt2")),
    "t5": ("SEQ_2_SEQ_LM", lambda: _seq2seq_config("t5")),
    "bart": ("SEQ_2_SEQ_LM", lambda: _seq2seq_config("bart")),
}


def _untied(config):
    config.tie_word_embeddings = False
    return config


def _model(arch: str):
    task, config = ARCHS[arch]
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if task == "CAUSAL_LM" else transformers.AutoModelForSeq2SeqLM
    return task, auto.from_config(config()).eval()


def _inputs(task: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 10), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = ids.clone() if task == "CAUSAL_LM" else torch.randint(3, VOCAB, (4, 6), generator=generator)
    return inputs


def _trained(arch: str, steps: int = 4):
    """A trained StocTuning model of `arch` and an untouched copy of its base."""
    task, base = _model(arch)
    # Frozen, as the base is while shown: torch picks its matmul kernel by `requires_grad` even under no_grad, and
    # the kernels round differently.
    reference = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, StocTuningConfig(k=0.02, task_type=task))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        model(**_inputs(task, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return task, model, reference


def _base_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.get_base_model().state_dict().items() if not k.startswith("stoc_tuning.")}


def _generate(model, task: str):
    prompt = _inputs(task, 99)
    out = model.generate(
        input_ids=prompt["input_ids"][:, :5],
        attention_mask=prompt["attention_mask"][:, :5],
        max_new_tokens=8,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_read_inside_disable_adapter_is_the_base(arch):
    task, model, reference = _trained(arch)
    base_state = reference.state_dict()
    adapted = _base_state(model)
    assert any(not torch.equal(adapted[k], base_state[k]) for k in base_state)  # training changed the weights
    with model.disable_adapter():
        shown = _base_state(model)
        assert shown.keys() == base_state.keys()
        for name, value in base_state.items():  # every parameter and buffer, read directly
            assert torch.equal(shown[name], value), name
        for name, param in model.get_base_model().named_parameters():
            assert torch.equal(param, base_state[name]), name
        sequences, scores = _generate(model, task)
        if task == "SEQ_2_SEQ_LM":
            encoded = model.get_encoder()(input_ids=_inputs(task, 5)["input_ids"]).last_hidden_state
    expected_sequences, expected_scores = _generate(reference, task)
    assert torch.equal(sequences, expected_sequences) and torch.equal(scores, expected_scores)
    if task == "SEQ_2_SEQ_LM":
        assert torch.equal(encoded, reference.get_encoder()(input_ids=_inputs(task, 5)["input_ids"]).last_hidden_state)
    after = _base_state(model)  # the adapter is back, bit for bit
    assert all(torch.equal(after[k], adapted[k]) for k in adapted)


@pytest.mark.parametrize("arch", ["llama-tied", "llama-untied", "gpt2"])
def test_trl_fused_log_probs_inside_disable_adapter_are_the_base(arch):
    utils = pytest.importorskip("trl.trainer.utils")
    task, model, reference = _trained(arch)
    utils.add_fused_lm_head(model.get_base_model())
    utils.add_fused_lm_head(reference)
    x = _inputs(task, 7)
    with torch.no_grad():
        expected = reference(**x, fused_lm_head=True).log_probs
        adapted = model(**x, fused_lm_head=True).log_probs
        with model.disable_adapter():
            shown = model(**x, fused_lm_head=True).log_probs
    assert not torch.equal(adapted, expected)
    assert torch.equal(shown, expected)


def test_a_graph_survives_a_switch_and_back():
    """forward → set_adapter(other) → forward → set_adapter(back) → backward gives the gradients of forward →
    backward alone (TRL's reference adapter is switched to between the policy's forward and its backward)."""
    task, model, _ = _trained("llama-tied")
    other = copy.deepcopy(model.peft_config["default"])
    model.add_adapter("other", other)
    model.base_model.set_adapter_delta("other", model.base_model.adapter_delta("default").clone())
    x = _inputs(task, 11)
    model.set_adapter("default")
    model.train()
    x_embeds = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    model(inputs_embeds=x_embeds, labels=x["labels"]).loss.backward()
    expected = x_embeds.grad.clone()
    x_embeds.grad = None
    model.zero_grad()
    loss = model(inputs_embeds=x_embeds, labels=x["labels"]).loss
    model.set_adapter("other", inference_mode=True)
    with torch.no_grad():
        model(**x)
    model.set_adapter("default")
    loss.backward()
    assert torch.equal(x_embeds.grad, expected)


def test_a_backward_while_the_base_is_shown_is_refused():
    task, model, _ = _trained("llama-tied")
    model.train()
    loss = model(**_inputs(task, 3)).loss
    before = _base_state(model)
    with model.disable_adapter(), pytest.raises(RuntimeError, match="disable_adapter"):
        loss.backward()
    assert all(torch.equal(v, before[k]) for k, v in _base_state(model).items())


def test_layer_and_model_set_adapter_agree():
    _, model, _ = _trained("gpt2")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.stoc_state.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    model.base_model.stoc_state.set_adapter("other")
    assert model.active_adapters == ["other"] and model.base_model.stoc_state.applied == ("other",)


@pytest.mark.parametrize("how", ["load_state_dict", "set_base_model_state_dict"])
def test_loading_base_weights_keeps_the_adapter_on_the_loaded_base(how):
    """Loading base weights replaces the base under the adapter: the adapter stays applied, on the new base."""
    task, model, reference = _trained("llama-tied")
    delta = model.base_model.adapter_delta("default")
    new_base = {k: v + 0.5 for k, v in reference.state_dict().items() if v.is_floating_point()}
    if how == "load_state_dict":
        model.get_base_model().load_state_dict(new_base, strict=False)
    else:
        set_base_model_state_dict(model, new_base, strict=False)
    assert model.active_adapters == ["default"]
    after = model.base_model.adapter_delta("default")
    assert after.tensors.keys() == delta.tensors.keys()
    for name, (index, values) in delta.tensors.items():
        assert torch.equal(after.tensors[name][0], index)
        torch.testing.assert_close(after.tensors[name][1], values, rtol=0, atol=1e-6)
    with model.disable_adapter():
        shown = _base_state(model)
        assert all(torch.equal(shown[k], new_base[k]) for k in new_base)  # the base is the loaded base
    for name, (index, values) in delta.tensors.items():  # the adapter sits on it
        weight = model.get_base_model().get_parameter(name).detach().view(-1)
        expected = (new_base[name].view(-1)[index].double() + values.double()).float()
        torch.testing.assert_close(weight[index], expected, rtol=0, atol=1e-6)
    # training goes on from there, and the delta keeps what it had
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**_inputs(task, 20)).loss.backward()
    optimizer.step()
    assert model.base_model.adapter_delta("default").num_changed >= delta.num_changed


def test_a_backward_after_switching_to_another_trainable_adapter_is_refused():
    """The guard compares what the weights show with what they showed at the forward: another trainable adapter is
    not the graph's."""
    task, model, _ = _trained("llama-tied")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    model.base_model.set_adapter_delta("other", model.base_model.adapter_delta("default").clone())
    model.train()
    loss = model(**_inputs(task, 3)).loss
    model.set_adapter("other")  # trainable: its own engine would take these gradients
    with pytest.raises(RuntimeError, match="not what the graph was built on"):
        loss.backward()
    assert all(p.grad is None for p in model.base_model.base_params().values())


def test_a_backward_after_the_active_delta_was_replaced_is_refused():
    task, model, _ = _trained("gpt2")
    model.train()
    loss = model(**_inputs(task, 4)).loss
    model.base_model.set_adapter_delta("default", model.base_model.adapter_delta("default").clone())
    with pytest.raises(RuntimeError, match="not what the graph was built on"):
        loss.backward()


def test_autocast_after_a_switch_computes_with_the_new_adapter():
    task, model, _ = _trained("llama-tied")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    x = _inputs(task, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.set_adapter("other")
        fresh = model(**x).logits
        model.set_adapter("default")
        model.train()
        model(**x)  # casts (and caches) the trained weights
        model.eval()
        model.set_adapter("other")
        after = model(**x).logits
    assert torch.equal(after, fresh)


def test_loading_base_weights_by_assignment_is_refused_before_anything_changes():
    task, model, reference = _trained("llama-tied")
    before = _base_state(model)
    with pytest.raises(ValueError, match="assign=True"):
        model.get_base_model().load_state_dict(reference.state_dict(), strict=False, assign=True)
    assert all(torch.equal(v, before[k]) for k, v in _base_state(model).items())
    assert model.base_model.stoc_state.applied == ("default",)
