"""The training step as one public object: `StocTuningStep.step()` runs draw → confine → the optimizer's step →
update, in that order, in every memory mode; the optimizer-step hooks run the same object; both give the same
training."""

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig, StocTuningStep

from .helpers import batch, state_of, tiny_model


def _model(memory: str, **config):
    torch.manual_seed(0)
    return get_peft_model(tiny_model("bert"), StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory, **config))


def _spy(model, optimizer, calls: list) -> None:
    """Record the phases of the step as the strategy and the optimizer run them."""
    strategy = model.base_model.stoc_engine().strategy
    for phase in ("draw", "confine", "update"):
        original = getattr(strategy, phase)

        def record(*args, _phase=phase, _original=original, **kwargs):
            calls.append(_phase)
            return _original(*args, **kwargs)

        setattr(strategy, phase, record)
    # The optimizer's own pre-step hooks run after torch's global ones, right before its arithmetic.
    optimizer.register_step_pre_hook(lambda *args: calls.append("optimizer"))


@pytest.mark.parametrize("memory", ["lean", "dense"])
@pytest.mark.parametrize("explicit", [True, False])
def test_one_step_draws_confines_and_updates_in_this_order(memory, explicit):
    model = _model(memory)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch()).loss.backward()
    calls: list[str] = []
    _spy(model, optimizer, calls)
    if explicit:
        StocTuningStep(model, optimizer).step()
    else:
        optimizer.step()  # the optimizer-step hooks run the same step object
    assert calls == ["draw", "confine", "optimizer", "update"]
    assert model.stoc_stats()["step"] == 1
    assert model.stoc_stats()["drawn"] == 40


@pytest.mark.parametrize("memory", ["lean", "dense"])
def test_a_loop_that_shows_the_step_trains_as_the_hooks_do(memory):
    runs = []
    for explicit in (False, True):
        model = _model(memory, mask_interval=2)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        step = StocTuningStep(model, optimizer)
        masks = []
        for index in range(4):
            model(**batch(seed=index)).loss.backward()
            step.step() if explicit else optimizer.step()
            optimizer.zero_grad()
            masks.append([d.clone() for d in model.base_model.stoc_engine().last_draw])
        runs.append((state_of(model), masks, model.stoc_stats()))
    (hooked, hooked_masks, hooked_stats), (shown, shown_masks, shown_stats) = runs
    assert hooked_stats == shown_stats
    assert all(torch.equal(a, b) for x, y in zip(hooked_masks, shown_masks) for a, b in zip(x, y))
    assert hooked.keys() == shown.keys()
    assert all(torch.equal(hooked[name], shown[name]) for name in hooked)


def test_the_step_object_names_what_is_missing_when_no_adapter_trains():
    model = _model("lean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = state_of(model)
    with model.disable_adapter(), pytest.raises(RuntimeError, match="no adapter is being trained"):
        StocTuningStep(model, optimizer).step()
    after = state_of(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("explicit", [True, False])
def test_a_warning_of_the_step_points_at_the_line_that_stepped(explicit):
    model = _model("auto")
    model.train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)  # not reproduced by the lean strategy: dense
    model(**batch()).loss.backward()
    with pytest.warns(UserWarning, match="memory='dense' mode") as record:
        StocTuningStep(model, optimizer).step() if explicit else optimizer.step()
    assert [w.filename for w in record if "memory='dense'" in str(w.message)] == [__file__]


def test_the_step_object_of_an_optimizer_without_candidates_only_steps_it():
    model = _model("lean")
    model.train()
    base = {id(p) for p in model.base_model.base_params().values()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in base]
    optimizer = torch.optim.SGD(head, lr=0.1)
    before = [p.detach().clone() for p in head]
    model(**batch()).loss.backward()
    StocTuningStep(model, optimizer).step()
    assert model.stoc_stats()["step"] == 0  # no draw was made for it
    assert any(not torch.equal(b, p) for b, p in zip(before, head))
