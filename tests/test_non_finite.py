"""Non-finite values: a step whose gradients or activations are inf/NaN is skipped with one warning naming it, on
every selection path, model size and memory mode; nothing non-finite can reach an adapter file."""

import warnings

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model

SMALL = {}
LARGE = dict(hidden_size=128, intermediate_size=256, vocab_size=2000)  # enough entries for the thinning draw


def _model(size, memory, selection, budget):
    config = StocTuningConfig(
        k=40, task_type="SEQ_CLS", memory=memory, selection=selection, max_changed=400 if budget else None
    )
    model = get_peft_model(tiny_model(**size), config)
    model.train()
    return model


def _nan_loss(model, inputs):
    return model(**inputs).loss * float("nan")


def _inf_gradient(model, inputs):
    param = model.base_model._adapters["default"].candidates[5].param
    handles = []
    handles.append(param.register_hook(lambda g: (handles[0].remove(), torch.full_like(g, float("inf")))[1]))
    return model(**inputs).loss


def _inf_activation(model, inputs):
    """One real token's input to a feed-forward layer is inf (an fp16 overflow in the forward)."""
    dense = model.base_model.model.bert.encoder.layer[1].intermediate.dense
    handles = []

    def overflow(module, args):
        handles[0].remove()
        x = args[0].clone()
        x[0, 0, 0] = float("inf")
        return (x,)

    handles.append(dense.register_forward_pre_hook(overflow))
    return model(**inputs).loss


INF_INPUT = "bert.encoder.layer.1.intermediate.dense.weight"

# case -> (loss, clip before the step, what the warning blames)
CASES = {
    "nan_loss": (_nan_loss, False, "the gradients of "),
    "inf_gradient": (_inf_gradient, False, "the gradients of "),
    "inf_gradient_then_clipping": (_inf_gradient, True, "the gradients of "),
    "inf_activation": (_inf_activation, False, f"the activations entering {INF_INPUT}"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "selection, budget", [("stochastic", False), ("top", False), ("random", False), ("stochastic", True)]
)
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_a_non_finite_step_is_skipped_with_one_warning(case, selection, budget, size, memory):
    model = _model(SMALL if size == "small" else LARGE, memory, selection, budget)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch(seed=0)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_loss, clip, cause = CASES[case]
    make_loss(model, batch(seed=1)).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    skipped = [w for w in caught if "optimizer step 2 skipped" in str(w.message)]
    assert len(skipped) == 1, [str(w.message) for w in caught]
    message = str(skipped[0].message)
    assert cause in message, message
    if case != "inf_activation":
        assert "activations" not in message, message  # finite activations are not blamed
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # head included
    assert model.stoc_stats()["step"] == 1
    optimizer.zero_grad()
    model(**batch(seed=2)).loss.backward()
    optimizer.step()
    assert model.stoc_stats()["step"] == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_combinations_that_overflow_are_refused_before_anything_changes(tmp_path):
    from peft import PeftModel

    from .helpers import predict, train_stoc

    model = train_stoc(k=40, steps=2)
    with pytest.raises(ValueError, match="overflows"):
        model.add_weighted_adapter(["default"], [1e38 * 1e3], "huge")
    half = tiny_model().half()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(half, tmp_path)
    loaded.add_weighted_adapter(["default"], [1e7], "big")  # finite in float32, beyond float16 once added
    before = predict(loaded)
    with pytest.raises(ValueError, match="inf or NaN"):
        loaded.set_adapter("big")
    assert torch.equal(predict(loaded), before)
    with pytest.raises(ValueError, match="inf or NaN"):
        loaded.merge_adapter(["default", "big"])
    assert torch.equal(predict(loaded), before)


@pytest.mark.parametrize("memory", ["dense", "auto", "lean"])
def test_the_step_after_an_inf_activation_skipped_by_a_scaler_runs(memory):
    """An inf activation: the scaler skips that step; with `zero_grad(set_to_none=False)` its μ must not reach the
    next, finite step, which runs without a warning."""
    model = _model(SMALL, memory, "stochastic", False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, make_loss in enumerate([_inf_activation, lambda m, x: m(**x).loss, lambda m, x: m(**x).loss]):
            scaler.scale(make_loss(model, batch(seed=step))).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=False)
            assert model.stoc_stats()["step"] == step  # the first step skipped, then one step per batch
    assert scaler.get_scale() == 512.0
    assert not [w for w in caught if "StocTuning" in str(w.message)], [str(w.message) for w in caught]
