"""A step changes exactly the drawn entries: plain loops, optimizers, rules, accumulation, seeds, bypasses."""

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import base_snapshot, batch, changed_entries, drawn_entries, tiny_model

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd_momentum_decay": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params),
    "adam_decay": lambda params: torch.optim.Adam(params, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params),  # weight_decay=0.01 by default
}


def _model(arch="bert", task="SEQ_CLS", k=40, **config):
    return get_peft_model(tiny_model(arch, task), StocTuningConfig(k=k, task_type=task, **config))


def _step(model, optimizer, inputs):
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_step_changes_exactly_the_drawn_entries(name):
    model = _model(k=40)
    model.train()
    optimizer = OPTIMIZERS[name](model.parameters())
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    before = base_snapshot(model)
    _step(model, optimizer, batch())
    changed, drawn = changed_entries(model, before), drawn_entries(model)
    assert sum(i.numel() for i in drawn.values()) == 40
    assert changed.keys() <= drawn.keys()
    for key, index in changed.items():
        assert torch.isin(index, drawn[key]).all(), key
    # Adam's first step moves every entry with a non-zero gradient, so all drawn entries change.
    if name.startswith("adam"):
        assert sum(i.numel() for i in changed.values()) == 40
    # The head is trained fully and keeps its weight decay.
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, head_before)


def test_weight_decay_of_head_in_same_group_still_applies():
    model = _model(k=5)
    model.train()
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    reference = head.detach().clone()
    ref_opt = torch.optim.AdamW([reference.requires_grad_()], lr=0.1, weight_decay=0.5)
    model(**batch()).loss.backward()
    reference.grad = head.grad.clone()
    optimizer.step()
    ref_opt.step()
    assert torch.allclose(head.detach(), reference.detach())


def test_momentum_moves_earlier_draws_under_masked_grad_but_not_under_strict():
    for rule in ("masked_grad", "strict"):
        model = _model(k=30, update_rule=rule, seed=3)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        escaped = 0
        for step in range(20):
            before = base_snapshot(model)
            _step(model, optimizer, batch(seed=step))
            changed, drawn = changed_entries(model, before), drawn_entries(model)
            for key, index in changed.items():
                outside = ~torch.isin(index, drawn.get(key, torch.empty(0, dtype=torch.long)))
                escaped += int(outside.sum())
        if rule == "strict":
            assert escaped == 0
        else:
            assert escaped > 0  # the paper's rule: Adam's momentum keeps moving entries drawn before


def test_gradient_accumulation_draws_once_on_summed_gradient():
    model = _model(k=25, selection="top", memory="dense")  # the reference reads the summed dense gradients
    model.train()
    engine = model.base_model.stoc_engine()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = [batch(seed=1, pad_from=6), batch(seed=2, pad_from=10)]
    for inputs in micro:
        (model(**inputs).loss / 2).backward()
    # Reference: importance from the summed gradient and μ over both micro-batches.
    expected = {}
    for candidate in engine.candidates:
        if candidate.param.grad is None:
            continue
        mu = sum(
            (v if v is not None else torch.tensor(1.0)).reshape(
                [-1 if d == i else 1 for i in range(max(candidate.param.dim(), 1))]
            )
            if candidate.param.dim()
            else torch.tensor(1.0)
            for v, d in engine.tracker.means(candidate)
        )
        expected[candidate.name] = (mu * candidate.param.detach() * candidate.param.grad).abs().flatten()
    names = list(expected)
    flat = torch.cat([expected[n] for n in names])
    top = torch.topk(flat, 25).indices
    offsets = torch.tensor([0] + [expected[n].numel() for n in names]).cumsum(0)
    reference = {}
    for i in top.tolist():
        t = int(torch.searchsorted(offsets, torch.tensor(i), right=True)) - 1
        reference.setdefault(names[t], []).append(i - int(offsets[t]))
    draws_before = engine.draws
    optimizer.step()
    assert engine.draws == draws_before + 1
    got = {k: sorted(v.tolist()) for k, v in drawn_entries(model).items()}
    assert got == {k: sorted(v) for k, v in reference.items()}


def test_mask_interval_reuses_the_draw():
    model = _model(k=20, mask_interval=3, seed=1)
    model.train()
    engine = model.base_model.stoc_engine()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = []
    for step in range(6):
        _step(model, optimizer, batch(seed=step))
        masks.append({k: v.clone() for k, v in drawn_entries(model).items()})
    assert engine.draws == 2
    assert masks[0].keys() == masks[2].keys() and all(torch.equal(masks[0][k], masks[2][k]) for k in masks[0])
    assert any(not torch.equal(masks[0].get(k, torch.empty(0)), masks[3].get(k, torch.empty(0))) for k in masks[3])


def _train(seed, steps=4):
    model = _model(k=30, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masks = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # same dropout in every run
        _step(model, optimizer, batch(seed=step))
        masks.append(drawn_entries(model))
    return masks, base_snapshot(model)


def test_same_seed_same_masks_and_weights_different_seed_different_masks():
    masks_a, weights_a = _train(seed=5)
    masks_b, weights_b = _train(seed=5)
    masks_c, _ = _train(seed=6)
    for a, b in zip(masks_a, masks_b):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(a.keys() != c.keys() or any(not torch.equal(a[k], c[k]) for k in a) for a, c in zip(masks_a, masks_c))


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_manual_update_outside_an_optimizer_is_detected(memory):
    model = _model(memory=memory)
    model.train()
    model(**batch()).loss.backward()
    # A hand-written SGD step bypasses every optimizer hook. Dense mode: the audit sees the change at the next
    # forward. Lean mode: the candidates' gradients were consumed in the backward, so the update itself refuses.
    with pytest.raises(RuntimeError, match="changed outside an optimizer step|consumed this gradient"):
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        model(**batch())


def test_param_data_assignment_is_detected():
    model = _model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer, batch())
    model.base_model.model.bert.encoder.layer[0].attention.self.query.weight.data.add_(1.0)
    with pytest.raises(RuntimeError, match="query.weight' changed outside"):
        model(**batch(seed=1))


class _DenseOptimizer(torch.optim.Optimizer):
    """An optimizer that moves every entry, gradient or not (what StocTuning cannot confine)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.01)


def test_optimizer_moving_undrawn_entries_is_detected():
    model = _model()
    model.train()
    optimizer = _DenseOptimizer(model.parameters())
    model(**batch()).loss.backward()
    with pytest.raises(RuntimeError, match="not drawn"):
        optimizer.step()


def test_unknown_optimizer_with_weight_decay_is_refused():
    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1, "weight_decay": 0.1})

        def step(self, closure=None):
            pass

    model = _model()
    model.train()
    optimizer = Custom(model.parameters())
    model(**batch()).loss.backward()
    with pytest.raises(ValueError, match="cannot confine the weight decay"):
        optimizer.step()
    assert model.stoc_stats()["step"] == 0  # the refused step is not counted


def test_stats_report_drawn_changed_density():
    model = _model(k=30)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        _step(model, optimizer, batch(seed=step))
    stats = model.stoc_stats()
    total = sum(p.numel() for p in model.base_model.base_params().values())
    assert stats["step"] == 3 and stats["drawn"] == 30
    assert 30 <= stats["changed"] <= 90
    assert stats["density"] == pytest.approx(stats["changed"] / total)


def test_bf16_autocast_training_step():
    model = _model(k=30)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = base_snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch()).loss
    loss.backward()
    optimizer.step()
    changed, drawn = changed_entries(model, before), drawn_entries(model)
    assert sum(i.numel() for i in changed.values()) == 30
    assert all(torch.isin(i, drawn[k]).all() for k, i in changed.items())


def test_reference_forward_with_disabled_adapter_keeps_training_state():
    # DPO-style: a reference forward with the adapter disabled between training steps.
    model = _model(k=20, seed=4)
    model.train()
    engine = model.base_model.stoc_engine()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masks = []
    for step in range(3):
        with model.disable_adapter(), torch.no_grad():
            model(**batch(seed=step))
        torch.manual_seed(100 + step)  # same dropout as the reference run
        _step(model, optimizer, batch(seed=step))
        masks.append(drawn_entries(model))
    assert model.base_model.stoc_engine() is engine and engine.stats.step == 3
    reference = _model(k=20, seed=4)
    reference.train()
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(3):
        torch.manual_seed(100 + step)
        _step(reference, ref_optimizer, batch(seed=step))
        expected = drawn_entries(reference)
        assert expected.keys() == masks[step].keys() and all(torch.equal(expected[k], masks[step][k]) for k in expected)
