"""Activation statistics μ: what each kind of parameter sees, padding, accumulation."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model


def _tracked(arch="bert", task="SEQ_CLS", model_kwargs=None, **config):
    model = get_peft_model(tiny_model(arch, task, **(model_kwargs or {})),
                           StocTuningConfig(k=20, task_type=task, **config))
    engine = model.base_model.stoc_engine()
    return model, engine


def _means(engine, name):
    candidate = next(c for c in engine.candidates if c.name == name)
    return engine.tracker.means(candidate)


def _capture_inputs(module):
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    return seen, handle


def test_linear_mean_over_real_tokens_only():
    model, engine = _tracked()
    base = model.base_model.model
    query = base.bert.encoder.layer[0].attention.self.query
    seen, handle = _capture_inputs(query)
    inputs = batch(pad_from=7)
    model.train()
    model(**inputs)
    handle.remove()
    x, mask = seen[0], inputs["attention_mask"].bool()
    expected = x[mask].mean(0)
    (mu, dim), = _means(engine, "bert.encoder.layer.0.attention.self.query.weight")
    assert dim == 1 and mu.shape == (32,)  # per input feature, never the weight's full size
    assert torch.allclose(mu, expected, atol=1e-6)
    (one, _), = _means(engine, "bert.encoder.layer.0.attention.self.query.bias")
    assert one is None  # a bias connection starts from the constant 1


@pytest.mark.parametrize("stat", ["abs_mean", "rms"])
def test_other_statistics(stat):
    model, engine = _tracked(activation_stat=stat)
    dense = model.base_model.model.bert.encoder.layer[1].intermediate.dense
    seen, handle = _capture_inputs(dense)
    inputs = batch(pad_from=5)
    model.train()
    model(**inputs)
    handle.remove()
    x = seen[0][inputs["attention_mask"].bool()]
    expected = x.abs().mean(0) if stat == "abs_mean" else x.square().mean(0).sqrt()
    (mu, _), = _means(engine, "bert.encoder.layer.1.intermediate.dense.weight")
    assert torch.allclose(mu, expected, atol=1e-5)


def test_embedding_rows_get_token_shares():
    model, engine = _tracked()
    inputs = batch(pad_from=6)
    model.train()
    model(**inputs)
    real = inputs["input_ids"][inputs["attention_mask"].bool()]
    expected = torch.bincount(real, minlength=96).float() / real.numel()
    (mu, dim), = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert dim == 0 and torch.allclose(mu, expected)
    # Position ids come as (1, seq) and stand for every row: each real position's share of the tokens.
    (pos, _), = _means(engine, "bert.embeddings.position_embeddings.weight")
    assert torch.allclose(pos[:6], torch.full((6,), 1 / 6)) and pos[6:].sum() == 0


def test_layernorm_gain_gets_mean_normalised_input():
    model, engine = _tracked()
    norm = model.base_model.model.bert.encoder.layer[0].output.LayerNorm
    seen, handle = _capture_inputs(norm)
    inputs = batch(pad_from=8)
    model.train()
    model(**inputs)
    handle.remove()
    x = seen[0][inputs["attention_mask"].bool()]
    expected = F.layer_norm(x, (32,), eps=norm.eps).mean(0)
    (mu, dim), = _means(engine, "bert.encoder.layer.0.output.LayerNorm.weight")
    assert dim == 0 and torch.allclose(mu, expected, atol=1e-5)
    (one, _), = _means(engine, "bert.encoder.layer.0.output.LayerNorm.bias")
    assert one is None


def test_rmsnorm_gain_and_tied_embedding_in_llama():
    model, engine = _tracked("llama", "CAUSAL_LM")
    base = model.base_model.model
    norm = base.model.layers[0].input_layernorm
    seen, handle = _capture_inputs(norm)
    head_in, head_handle = _capture_inputs(base.lm_head)
    inputs = batch("CAUSAL_LM", pad_from=10)
    model.train()
    model(**inputs)
    handle.remove()
    head_handle.remove()
    mask = inputs["attention_mask"].bool()
    x = seen[0][mask]
    expected = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).mean(0)
    (mu, _), = _means(engine, "model.layers.0.input_layernorm.weight")
    assert torch.allclose(mu, expected, atol=1e-5)
    # The tied embedding is both the input embedding (rows) and the output head (input features).
    factors = _means(engine, "model.embed_tokens.weight")
    assert sorted(dim for _, dim in factors) == [0, 1]
    rows = next(v for v, d in factors if d == 0)
    cols = next(v for v, d in factors if d == 1)
    real = inputs["input_ids"][mask]
    assert torch.allclose(rows, torch.bincount(real, minlength=96).float() / real.numel())
    assert torch.allclose(cols, head_in[0][mask].mean(0), atol=1e-5)


def test_conv1d_weight_varies_along_rows():
    model, engine = _tracked("gpt2", "CAUSAL_LM")
    attn = model.base_model.model.transformer.h[0].attn.c_attn
    seen, handle = _capture_inputs(attn)
    inputs = batch("CAUSAL_LM", pad_from=9)
    model.train()
    model(**inputs)
    handle.remove()
    (mu, dim), = _means(engine, "transformer.h.0.attn.c_attn.weight")
    assert dim == 0  # Conv1D stores (in, out)
    assert torch.allclose(mu, seen[0][inputs["attention_mask"].bool()].mean(0), atol=1e-5)


def test_padding_does_not_change_mu():
    short = batch(length=8, pad_from=None)
    padded = {
        "input_ids": torch.cat([short["input_ids"], torch.zeros(4, 5, dtype=torch.long)], 1),
        "attention_mask": torch.cat([short["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1),
        "labels": short["labels"],
    }
    results = []
    for inputs in (short, padded):
        model, engine = _tracked()
        model.eval()  # no dropout: both runs see the same activations on real tokens
        with torch.enable_grad():
            model(**inputs)
        results.append({c.name: engine.tracker.means(c) for c in engine.candidates})
    for name, factors in results[0].items():
        if "position_embeddings" in name:
            continue  # positions past the real tokens exist only in the padded batch, with share 0
        for (a, _), (b, _) in zip(factors, results[1][name]):
            if a is not None:
                assert torch.allclose(a, b, atol=1e-5), name


def test_means_cover_all_micro_batches_and_reset_after_step():
    model, engine = _tracked()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    one, two = batch(seed=1, pad_from=5), batch(seed=2, pad_from=9)
    for inputs in (one, two):
        model(**inputs).loss.backward()
    ids = torch.cat([one["input_ids"][one["attention_mask"].bool()], two["input_ids"][two["attention_mask"].bool()]])
    (mu, _), = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert torch.allclose(mu, torch.bincount(ids, minlength=96).float() / ids.numel())
    optimizer.step()
    (mu, _), = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert mu.sum() == 0  # reset for the next step


def test_no_tracking_without_grad_or_in_eval_loop():
    model, engine = _tracked()
    with torch.no_grad():
        model(**batch())
    (mu, _), = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert mu.sum() == 0


def test_gradient_checkpointing_recompute_is_not_counted_twice():
    results = []
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    for checkpointing in (False, True):
        model, engine = _tracked(model_kwargs=no_dropout)
        if checkpointing:
            inner = model.base_model.model
            if hasattr(inner, "activation_checkpointing_enable"):  # the name since transformers 5
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                assert inner.is_activation_checkpointing
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                assert inner.is_gradient_checkpointing
        model.train()  # checkpointing only acts in training mode; without dropout both runs see the same values
        model(**batch(pad_from=7)).loss.backward()
        results.append(([s.tokens for s in engine.tracker.state()],
                        {c.name: engine.tracker.means(c) for c in engine.candidates}))
    (tokens, means), (tokens_ckpt, means_ckpt) = results
    assert tokens == tokens_ckpt and sum(tokens) > 0  # the recomputed forward adds no tokens
    for name, factors in means.items():
        for (a, _), (b, _) in zip(factors, means_ckpt[name]):
            if a is not None:
                assert torch.allclose(a, b, atol=1e-6), name
