"""Loss scaling: a step skipped for inf/NaN changes nothing and leaves no trace; fused optimizers under a scaler."""

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import base_snapshot, batch, tiny_model


def _model(memory, **config):
    config.setdefault("selection", "top")
    model = get_peft_model(
        tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory, **config),
    )
    model.train()
    return model


def _poison_once(model):
    """The next backward gives one candidate an inf gradient (an fp16 overflow, as a scaler sees it)."""
    param = model.base_model._adapters["default"].candidates[3].param
    handles = []
    handles.append(param.register_hook(lambda g: (handles[0].remove(), torch.full_like(g, float("inf")))[1]))


def _scaled_step(model, optimizer, scaler, seed):
    scaler.scale(model(**batch(seed=seed)).loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


@pytest.mark.parametrize("memory", ["dense", "lean"])
@pytest.mark.parametrize("fused", [False, True])
def test_overflowing_step_under_a_scaler_changes_nothing(memory, fused):
    model = _model(memory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _poison_once(model)
    _scaled_step(model, optimizer, scaler, seed=0)
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.stoc_stats()["step"] == 0 and model.stoc_stats()["changed"] == 0
    _scaled_step(model, optimizer, scaler, seed=1)
    assert model.stoc_stats()["step"] == 1 and model.stoc_stats()["changed"] == 40


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_the_step_after_a_skipped_one_draws_from_its_own_batch_only(memory):
    # μ of a skipped step must not leak into the next draw: the draw after a skipped step equals the first draw of
    # a run that only ever saw the next batch.
    skipped = _model(memory)
    optimizer = torch.optim.AdamW(skipped.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _poison_once(skipped)
    _scaled_step(skipped, optimizer, scaler, seed=5)
    _scaled_step(skipped, optimizer, scaler, seed=1)
    fresh = _model(memory)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    _scaled_step(fresh, optimizer, torch.amp.GradScaler("cpu", init_scale=512.0), seed=1)
    a, b = skipped.base_model.stoc_engine().last_draw, fresh.base_model.stoc_engine().last_draw
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_fused_optimizer_under_a_scaler_decays_as_the_unfused_one(memory):
    # A fused optimizer unscales inside its kernel: L2 decay added before it must follow the scaled gradients.
    results = []
    for fused in (False, True):
        model = _model(memory)
        before = base_snapshot(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.5, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for seed in range(3):
            _scaled_step(model, optimizer, scaler, seed)
        results.append(sum(float((p - before[n]).abs().sum()) for n, p in base_snapshot(model).items()))
    assert results[1] == pytest.approx(results[0], rel=1e-5)


def _means_at_each_step(model, optimizer) -> list[list]:
    """μ of every candidate when each optimizer step runs (read before the step resets it)."""
    engine = model.base_model.stoc_engine()
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append([engine.tracker.means(c) for c in engine.candidates]))
    return seen


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("memory", ["dense", "auto"])
def test_mu_after_a_skipped_step_covers_the_next_batch_only_whatever_the_zero_grad_mode(memory, set_to_none):
    runs = []
    for poisoned in (True, False):
        model = _model(memory)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        means = _means_at_each_step(model, optimizer)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0 if poisoned else 512.0)
        seeds = [5, 1, 2] if poisoned else [1, 2]
        if poisoned:
            _poison_once(model)
        for seed in seeds:
            scaler.scale(model(**batch(seed=seed)).loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=set_to_none)
        assert model.stoc_stats()["step"] == 2
        runs.append((means, model.base_model.stoc_engine().last_draw))
    (skipped, skipped_draw), (fresh, fresh_draw) = runs
    assert len(skipped) == len(fresh) == 2
    for step in range(2):
        for got, expected in zip(skipped[step], fresh[step]):
            for (a, _), (b, _) in zip(got, expected):
                assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=1e-7), step
    assert all(torch.equal(x, y) for x, y in zip(skipped_draw, fresh_draw))


def test_accumulated_micro_batches_keep_their_statistics_with_zero_grad_set_to_none_false():
    """Gradients left as the backward made them are an accumulation, not an abandoned step: μ covers both
    micro-batches."""
    model = _model("dense")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    means = _means_at_each_step(model, optimizer)
    inputs = [batch(seed=seed) for seed in (3, 4)]
    for x in inputs:
        model(**x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    engine = model.base_model.stoc_engine()
    position = next(i for i, c in enumerate(engine.candidates) if c.name.endswith("word_embeddings.weight"))
    ids = torch.cat([x["input_ids"][x["attention_mask"].bool()] for x in inputs])
    expected = torch.bincount(ids, minlength=means[0][position][0][0].numel()).float() / ids.numel()
    assert torch.allclose(means[0][position][0][0], expected)
