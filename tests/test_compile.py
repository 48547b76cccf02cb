"""torch.compile: StocTuning's hooks cause no graph break, compiled training equals eager training, and a compiled
model switches adapters without recompiling.

The `aot_eager` backend keeps these tests quick: graph breaks and recompilations are dynamo's doing, and AOTAutograd
is the same for every backend; inductor would add minutes of C++ compilation on 2 cores.
"""

import pytest
import torch
import torch._dynamo
from peft import PeftModel, get_peft_model
from torch._dynamo.utils import counters
from transformers import Trainer

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model
from .test_trainer import _args, _Rows

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0, **config):
    base = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, seed=seed)
    config.setdefault("selection", "top")
    return get_peft_model(base, StocTuningConfig(k=40, task_type="SEQ_CLS", **config))


def _train(model, forward, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = forward(**batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def _graph_breaks() -> dict:
    """Dynamo's graph breaks so far; checked only after it compiled frames (an empty count must mean something)."""
    assert counters["stats"]["unique_graphs"] >= 1, "dynamo compiled nothing"
    return dict(counters["graph_break"])


@pytest.mark.parametrize("memory", ["lean", "dense"])
def test_compiled_training_has_no_graph_break_and_equals_eager(memory):
    eager, compiled = _model(memory=memory), _model(memory=memory)
    eager_losses = _train(eager, eager)
    compiled_losses = _train(compiled, torch.compile(compiled, backend=BACKEND))

    assert _graph_breaks() == {}
    assert compiled.stoc_stats()["step"] == eager.stoc_stats()["step"] == 3
    # μ comes from the hooks run through the opaque op: the same draws, hence the same weights (float rounding of
    # the compiled graph aside).
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=0, atol=1e-5)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert compiled.stoc_stats()["changed"] == eager.stoc_stats()["changed"]


def _masks(model, forward, steps: int = 5) -> list[dict[str, torch.Tensor]]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, masks = model.base_model.stoc_engine(), []
    for step in range(steps):
        forward(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        masks.append({c.name: index.clone() for c, index in zip(engine.candidates, engine.last_draw) if index.numel()})
    return masks


@pytest.mark.parametrize("selection", ["top", "stochastic"])
def test_compiled_and_eager_draw_the_same_masks_at_every_step(selection):
    """With a backend that keeps eager's arithmetic, a compiled model draws exactly the entries eager training draws,
    step after step (inductor's fused kernels round differently: README, torch.compile)."""
    eager, compiled = _model(selection=selection), _model(selection=selection)
    expected = _masks(eager, eager)
    got = _masks(compiled, torch.compile(compiled, backend=BACKEND))
    assert _graph_breaks() == {}
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def test_trainer_with_torch_compile_trains_without_graph_breaks(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=3, torch_compile=True, torch_compile_backend=BACKEND)
    Trainer(model=model, args=args, train_dataset=_Rows()).train()

    assert _graph_breaks() == {}
    assert model.stoc_stats()["step"] == 3
    assert model.stoc_stats()["changed"] > 0


def test_compiled_model_switches_adapters_without_recompiling(tmp_path):
    """StocTuning's hot swap: `set_adapter` writes the other adapter's deltas into the same weight tensors, so a
    compiled model runs on without recompiling (a model without `modules_to_save`: PEFT's head wrappers read the
    active adapter's name, which makes one graph per adapter)."""
    for name, seed in (("a", 1), ("b", 2)):
        trained = get_peft_model(tiny_model("llama", "CAUSAL_LM"), StocTuningConfig(k=60, task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=5e-2)
        for step in range(2):
            trained(**batch("CAUSAL_LM", seed=seed + step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        trained.save_pretrained(str(tmp_path / name))

    model = PeftModel.from_pretrained(tiny_model("llama", "CAUSAL_LM"), str(tmp_path / "a"), adapter_name="a")
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model.eval()
    inputs = batch("CAUSAL_LM", seed=9)
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name, inference_mode=True)
        with torch.no_grad():
            expected[name] = model(**inputs).logits
    assert not torch.equal(expected["a"], expected["b"])

    # PeftModel.forward reads the active adapter's name (a guard of PEFT's): compile the transformers model under it,
    # whose weights are what set_adapter changes, in place. inference_mode=True: the adapter is not set up for
    # training (set_adapter's default, as for every PEFT method), so no statistics hooks come and go.
    model.get_base_model().compile(backend=BACKEND)
    with torch.no_grad():
        model.set_adapter("a", inference_mode=True)
        model(**inputs)  # the one compilation
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "a", "b"):
                model.set_adapter(name, inference_mode=True)
                torch.testing.assert_close(model(**inputs).logits, expected[name], rtol=0, atol=1e-6)
    assert _graph_breaks() == {}
