"""Activation statistics μ: what each kind of parameter sees, padding, accumulation."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel, get_peft_model

from peft_stoc import StocTuningConfig
from peft_stoc.training.tracking import ActivationTracker
from peft_stoc.tuner.candidates import find_candidates

from .helpers import batch, tiny_model


def _tracked(arch="bert", task="SEQ_CLS", model_kwargs=None, **config):
    model = get_peft_model(
        tiny_model(arch, task, **(model_kwargs or {})), StocTuningConfig(k=20, task_type=task, **config)
    )
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
    ((mu, dim),) = _means(engine, "bert.encoder.layer.0.attention.self.query.weight")
    assert dim == 1 and mu.shape == (32,)  # per input feature, never the weight's full size
    assert torch.allclose(mu, expected, atol=1e-6)
    ((one, _),) = _means(engine, "bert.encoder.layer.0.attention.self.query.bias")
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
    ((mu, _),) = _means(engine, "bert.encoder.layer.1.intermediate.dense.weight")
    assert torch.allclose(mu, expected, atol=1e-5)


def test_embedding_rows_get_token_shares():
    model, engine = _tracked()
    inputs = batch(pad_from=6)
    model.train()
    model(**inputs)
    real = inputs["input_ids"][inputs["attention_mask"].bool()]
    expected = torch.bincount(real, minlength=96).float() / real.numel()
    ((mu, dim),) = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert dim == 0 and torch.allclose(mu, expected)
    # Position ids come as (1, seq) and stand for every row: each real position's share of the tokens.
    ((pos, _),) = _means(engine, "bert.embeddings.position_embeddings.weight")
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
    ((mu, dim),) = _means(engine, "bert.encoder.layer.0.output.LayerNorm.weight")
    assert dim == 0 and torch.allclose(mu, expected, atol=1e-5)
    ((one, _),) = _means(engine, "bert.encoder.layer.0.output.LayerNorm.bias")
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
    ((mu, _),) = _means(engine, "model.layers.0.input_layernorm.weight")
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
    ((mu, dim),) = _means(engine, "transformer.h.0.attn.c_attn.weight")
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
    with model.base_model.stoc_accumulating():  # the first micro-batch of two
        model(**one).loss.backward()
    model(**two).loss.backward()
    ids = torch.cat([one["input_ids"][one["attention_mask"].bool()], two["input_ids"][two["attention_mask"].bool()]])
    ((mu, _),) = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert torch.allclose(mu, torch.bincount(ids, minlength=96).float() / ids.numel())
    optimizer.step()
    ((mu, _),) = _means(engine, "bert.embeddings.word_embeddings.weight")
    assert mu.sum() == 0  # reset for the next step


def test_no_tracking_without_grad_or_in_eval_loop():
    model, engine = _tracked()
    with torch.no_grad():
        model(**batch())
    ((mu, _),) = _means(engine, "bert.embeddings.word_embeddings.weight")
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
        results.append(
            ([s.tokens for s in engine.tracker.state()], {c.name: engine.tracker.means(c) for c in engine.candidates})
        )
    (tokens, means), (tokens_ckpt, means_ckpt) = results
    assert tokens == tokens_ckpt and sum(tokens) > 0  # the recomputed forward adds no tokens
    for name, factors in means.items():
        for (a, _), (b, _) in zip(factors, means_ckpt[name]):
            if a is not None:
                assert torch.allclose(a, b, atol=1e-6), name


# -- embeddings whose forward computes the rows it gathers -------------------------------------------------------
def _tiny(config, head, task, **peft):
    torch.manual_seed(0)
    model = get_peft_model(head.from_config(config), StocTuningConfig(k=20, task_type=task, **peft))
    return model, model.base_model.stoc_engine()


def _shares(rows: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(rows.reshape(-1), weights=weights.reshape(-1).float(), minlength=size) / weights.sum()


def _opt():
    config = transformers.OPTConfig(
        vocab_size=96,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=24,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        pad_token_id=1,
    )
    return _tiny(config, transformers.AutoModelForCausalLM, "CAUSAL_LM")


def test_opt_positions_count_the_rows_really_gathered():
    # OPT's learned positions are called with the attention mask and add an offset inside: with left padding the
    # real tokens gather rows 2, 3, ... counted from each row's first real token.
    model, engine = _opt()
    inputs = batch("CAUSAL_LM", pad_from=None)
    inputs["attention_mask"][1, :3] = 0
    inputs["attention_mask"][2, :5] = 0
    model.train()
    model(**inputs)
    mask = inputs["attention_mask"]
    rows = (mask.cumsum(1) - 1 + 2).clamp_min(0)
    ((mu, dim),) = _means(engine, "model.decoder.embed_positions.weight")
    assert dim == 0 and torch.allclose(mu, _shares(rows, mask, mu.numel()))
    assert mu[:2].sum() == 0  # rows 0 and 1 are gathered by no real token


def _bart():
    config = transformers.BartConfig(
        vocab_size=96,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=32,
    )
    return _tiny(config, transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM")


def _seq2seq_batch(encoder_length=8, decoder_length=8):
    inputs = batch("SEQ_CLS", length=encoder_length, pad_from=encoder_length - 3)
    decoder = batch("SEQ_CLS", length=decoder_length, seed=1, pad_from=None)
    decoder_mask = decoder["attention_mask"]
    decoder_mask[0, -2:] = 0
    decoder_mask[3, -4:] = 0
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "decoder_input_ids": decoder["input_ids"],
        "decoder_attention_mask": decoder_mask,
        "labels": decoder["input_ids"].masked_fill(decoder_mask == 0, -100),
    }


def test_bart_positions_called_with_embeddings():
    # BART's encoder passes `inputs_embeds[:, :, -1]` (floats) to its positions, which only read its shape.
    model, engine = _bart()
    inputs = _seq2seq_batch(encoder_length=8, decoder_length=6)
    model.train()
    model(**inputs)
    for name, mask in (("encoder", inputs["attention_mask"]), ("decoder", inputs["decoder_attention_mask"])):
        positions = torch.arange(mask.shape[1]).expand_as(mask) + 2
        ((mu, _),) = _means(engine, f"model.{name}.embed_positions.weight")
        assert torch.allclose(mu, _shares(positions, mask, mu.numel())), name


def test_cross_attention_keeps_encoder_padding_when_lengths_coincide():
    # Encoder and decoder sequences of one length: the decoder's own values take the decoder mask, the encoder
    # states read by cross-attention keep the encoder's.
    model, engine = _bart()
    inputs = _seq2seq_batch(encoder_length=8, decoder_length=8)
    base = model.base_model.model
    layer = base.model.decoder.layers[0]
    watched = {
        "self": layer.self_attn.q_proj,
        "cross_q": layer.encoder_attn.q_proj,
        "cross_k": layer.encoder_attn.k_proj,
        "head": base.lm_head,
        "encoder": base.model.encoder.layers[0].fc1,
    }
    seen = {key: _capture_inputs(module) for key, module in watched.items()}
    model.train()
    model(**inputs)
    encoder_mask, decoder_mask = inputs["attention_mask"].bool(), inputs["decoder_attention_mask"].bool()
    expected_masks = {
        "self": decoder_mask,
        "cross_q": decoder_mask,
        "cross_k": encoder_mask,
        "head": decoder_mask,
        "encoder": encoder_mask,
    }
    for key, module in watched.items():
        seen[key][1].remove()
        expected = seen[key][0][0][expected_masks[key]].mean(0)
        candidate = next(c for c in engine.candidates if c.param is module.weight)  # the head's is the tied table
        use = next(i for i, u in enumerate(candidate.uses) if u.module is module)
        mu, _ = engine.tracker.means(candidate)[use]
        assert torch.allclose(mu, expected, atol=1e-5), key


class _Lookups(torch.nn.Module):
    """A token model with embedding subclasses that slice, index_select, or use the table without a lookup."""

    class Sliced(torch.nn.Embedding):
        def forward(self, input_ids):
            return self.weight[: input_ids.shape[1]]

    class Selected(torch.nn.Embedding):
        def forward(self, input_ids):
            return self.weight.index_select(0, input_ids.reshape(-1)).reshape(*input_ids.shape, -1)

    class Whole(torch.nn.Embedding):
        def forward(self, input_ids):
            return (self.weight.sum(0) * 0 + self.weight.mean(0)).expand(*input_ids.shape, -1)

    def __init__(self):
        super().__init__()
        self.sliced, self.selected, self.whole = self.Sliced(16, 8), self.Selected(96, 8), self.Whole(4, 8)
        self.around = torch.nn.Embedding(5, 8)  # its table is used, its forward never called
        self.out = torch.nn.Linear(8, 1)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.sliced(input_ids) + self.selected(input_ids) + self.whole(input_ids) + self.around.weight.mean(0)
        return self.out(hidden).squeeze(-1)


def _lookups_tracker():
    torch.manual_seed(0)
    model = _Lookups()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module type is traced: only the uses below warn
        tracker = ActivationTracker(model, find_candidates(model, StocTuningConfig()), "mean")
    tracker.attach()
    tracker.armed = True
    return model, tracker


def test_sliced_and_selected_rows_and_untraced_tables():
    model, tracker = _lookups_tracker()
    inputs = batch(pad_from=7)
    mask = inputs["attention_mask"]
    out = model(inputs["input_ids"], attention_mask=mask)
    (out * mask).sum().backward()
    candidates = {c.name: c for c in tracker.candidates}
    with pytest.warns(
        UserWarning,
        match=r"could not follow .* tensors: around.weight \(4.09% of the candidate entries, in around "
        r"\(Embedding\)\), whole.weight \(3.28% of the candidate entries, in whole \(Whole\)\)",
    ) as caught:
        means = {name: tracker.means(c) for name, c in candidates.items()}
        tracker.means(candidates["whole.weight"])
    assert len(caught) == 1 and caught[0].filename == __file__  # one warning naming both, at the caller's line
    ((sliced, _),) = means["sliced.weight"]
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    assert torch.allclose(sliced, _shares(positions, mask, 16))  # one row per position, for every sequence
    # index_select takes flat indices, which do not line up with the (batch, seq) mask: every gathered row counts.
    ((selected, _),) = means["selected.weight"]
    assert torch.allclose(selected, _shares(inputs["input_ids"], torch.ones_like(mask), 96))
    assert means["whole.weight"] == means["around.weight"] == [(None, 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next step finds the same: no second warning
        model(inputs["input_ids"], attention_mask=mask).sum().backward()
        tracker.means(candidates["around.weight"])


# -- sequence-first activations ------------------------------------------------------------------------------------
def _xlnet():
    config = transformers.XLNetConfig(vocab_size=96, d_model=16, n_layer=1, n_head=2, d_inner=24)
    return _tiny(
        config,
        transformers.AutoModelForSequenceClassification,
        "SEQ_CLS",
        modules_to_save=["sequence_summary", "logits_proj"],
    )


def _xlnet_step(model, engine, length, pad_from):
    ff_in = model.base_model.model.transformer.layer[0].ff.layer_1
    seen, handle = _capture_inputs(ff_in)
    inputs = batch(length=length, pad_from=pad_from)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**inputs).loss.backward()
    handle.remove()
    ((mu, _),) = _means(engine, "transformer.layer.0.ff.layer_1.weight")
    engine.tracker.reset()
    model.zero_grad()  # this step is abandoned: the next forward starts a new one
    values = seen[0]  # (seq, batch, features)
    return mu, values, inputs["attention_mask"].t().bool()


def test_sequence_first_activations_take_the_transposed_mask():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, engine = _xlnet()
    mu, values, mask = _xlnet_step(model, engine, length=7, pad_from=5)
    assert values.shape[:2] == (7, 4) and torch.allclose(mu, values[mask].mean(0), atol=1e-5)
    # A square batch looks alike both ways: the layout this module had before decides.
    mu, values, mask = _xlnet_step(model, engine, length=4, pad_from=2)
    assert torch.allclose(mu, values[mask].mean(0), atol=1e-5)


def test_square_first_batch_takes_the_models_layout():
    # The first batch is as long as it is wide: XLNet's layout comes from the model, not from earlier shapes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, engine = _xlnet()
    mu, values, mask = _xlnet_step(model, engine, length=4, pad_from=2)
    assert torch.allclose(mu, values[mask].mean(0), atol=1e-5)
    assert not torch.allclose(mu, values.reshape(-1, values.shape[-1]).mean(0), atol=1e-3)  # padding left out


# -- the warning about untraced module types ---------------------------------------------------------------------
def _vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
    )
    return transformers.AutoModelForImageClassification.from_config(config)


def test_untraced_types_warn_once_per_model_at_the_callers_line(tmp_path):
    with pytest.warns(UserWarning, match="does not trace the inputs of") as caught:
        model = get_peft_model(_vit(), StocTuningConfig(k=20, modules_to_save=["classifier"]))
        model.save_pretrained(tmp_path)
        model.save_pretrained(tmp_path)
    untraced = [w for w in caught if "does not trace" in str(w.message)]
    assert len(untraced) == 1 and untraced[0].filename == __file__
    assert "vit.embeddings.patch_embeddings.projection (Conv2d)" in str(untraced[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(_vit(), tmp_path)  # for inference: μ plays no part
        PeftModel.from_pretrained(_vit(), tmp_path, is_trainable=True)  # a new model to train: warned once
    assert len([w for w in caught if "does not trace" in str(w.message)]) == 1


def test_statistics_keep_no_layer_input_alive():
    """μ's per-forward cache (the q, k and v projections read one tensor: summed once) must not hold the inputs:
    under activation checkpointing a strong reference kept every layer's input alive to the end of the forward."""
    import weakref

    model, engine = _tracked()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = model.base_model.model.bert.encoder.layer
    inputs, alive = [], []
    # The input of layer 0's intermediate projection lives only inside that layer's checkpointed forward.
    handles = [
        layers[0].intermediate.dense.register_forward_hook(lambda m, args, out: inputs.append(weakref.ref(args[0]))),
        layers[1].attention.self.query.register_forward_hook(lambda m, a, out: alive.append(inputs[0]() is not None)),
    ]
    model(**batch()).loss.backward()
    for handle in handles:
        handle.remove()
    assert engine.tracker.state()  # μ was tracked
    assert alive and not alive[0]
