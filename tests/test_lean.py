"""Memory-lean training: the training dense mode does, without dense gradients or dense optimizer state."""

import contextlib
import copy
import warnings

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig

from .helpers import batch, tiny_model

OPTIMIZERS = {
    "sgd_momentum_nesterov_decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd_dampening_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
    "adam_amsgrad_decay": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.05),
    "adamw_decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _train(memory, make_optimizer, steps=20, clip=None, accumulation=1, arch="bert", task="SEQ_CLS", **config):
    """`steps` optimizer steps under a linear learning-rate schedule; returns the model, the draws and the norms
    `clip_grad_norm_` returned. With `accumulation` > 1 the micro-batches before the last of each step run under
    `stoc_accumulating()`, as a plain loop declares them."""
    config.setdefault("selection", "top")
    model = get_peft_model(tiny_model(arch, task), StocTuningConfig(k=40, task_type=task, memory=memory, **config))
    model.train()
    optimizer = make_optimizer(model.parameters())
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=steps)
    draws, norms = [], []
    for step in range(steps):
        for micro in range(accumulation):
            torch.manual_seed(100 + step)
            last = micro == accumulation - 1
            with contextlib.nullcontext() if last else model.base_model.stoc_accumulating():
                (model(**batch(task, seed=step * 7 + micro)).loss / accumulation).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        draws.append([d.clone() for d in model.base_model.stoc_engine().last_draw])
    return model, draws, norms


def assert_same_training(a, b, tolerance=1e-6):
    """Same entries drawn at every step, and weights equal within `tolerance` relative to each tensor's scale."""
    (model_a, draws_a, norms_a), (model_b, draws_b, norms_b) = a, b
    for step, (x, y) in enumerate(zip(draws_a, draws_b)):
        assert all(torch.equal(p, q) for p, q in zip(x, y)), f"different draws at step {step + 1}"
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    for key, value in state_a.items():
        if value.is_floating_point():
            scale = float(value.abs().max()) or 1.0
            assert float((value - state_b[key]).abs().max()) <= tolerance * scale, key
    assert norms_a == pytest.approx(norms_b, rel=tolerance)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lean_equals_dense_for_each_optimizer_with_a_schedule(name):
    assert_same_training(_train("dense", OPTIMIZERS[name]), _train("lean", OPTIMIZERS[name]))


@pytest.mark.parametrize("rule", ["masked_grad", "strict"])
def test_lean_equals_dense_under_clipping_that_clips(rule):
    dense = _train("dense", OPTIMIZERS["adamw_decay"], clip=0.05, update_rule=rule)
    assert min(dense[2]) > 0.05  # every step was clipped
    assert_same_training(dense, _train("lean", OPTIMIZERS["adamw_decay"], clip=0.05, update_rule=rule))


def test_lean_equals_dense_on_a_tied_llama_with_rmsnorm():
    make = OPTIMIZERS["adamw_decay"]
    dense = _train("dense", make, steps=8, arch="llama", task="CAUSAL_LM")
    assert_same_training(dense, _train("lean", make, steps=8, arch="llama", task="CAUSAL_LM"))


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_declared_accumulation_draws_once_on_the_summed_gradient_in_a_plain_loop(micro_batches):
    make = OPTIMIZERS["adamw_decay"]
    dense = _train("dense", make, steps=6, accumulation=micro_batches)
    assert_same_training(dense, _train("auto", make, steps=6, accumulation=micro_batches))


def _weights_and_state(model, optimizer):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    return weights, state


def _assert_same_weights_and_state(before, after):
    (weights_a, state_a), (weights_b, state_b) = before, after
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert repr(state_a) == repr(state_b)  # the sparse state nests dicts of tensors; repr shows every value


@pytest.mark.parametrize("memory", ["auto", "lean"])
@pytest.mark.parametrize("plain_steps", [0, 2])
def test_undeclared_accumulation_is_refused_before_anything_changes(memory, plain_steps):
    """A plain loop that accumulates without `stoc_accumulating()`, from its first step or after plain steps: the
    second micro-batch raises, naming the one-line fix, and no weight or optimizer state has changed."""
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory=memory, task_type="SEQ_CLS"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(plain_steps):
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    before = _weights_and_state(model, optimizer)
    (model(**batch(seed=10)).loss / 2).backward()
    with pytest.raises(RuntimeError, match=r"with model\.base_model\.stoc_accumulating\(\):") as error:
        model(**batch(seed=11))
    assert "nothing was changed" in str(error.value)
    _assert_same_weights_and_state(before, _weights_and_state(model, optimizer))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_default_mode_holds_no_dense_candidate_gradient_after_the_first_backward(checkpointing):
    """`memory="auto"` (the default) in a plain loop: each candidate's gradient is consumed as the first backward
    completes it, with and without gradient checkpointing; the step then trains as `memory="lean"` does."""
    from peft_stoc.sampling.streaming import PACK_BELOW
    from peft_stoc.training.consumed_grad import ConsumedGrad

    models = {}
    for memory in ("auto", "lean"):
        base = tiny_model("llama", "CAUSAL_LM", hidden_size=64, intermediate_size=1100, vocab_size=2000)
        if checkpointing:
            base.gradient_checkpointing_enable()
        model = get_peft_model(base, StocTuningConfig(k=40, memory=memory, task_type="CAUSAL_LM"))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(**batch("CAUSAL_LM", seed=0)).loss.backward()
        engine = model.base_model.stoc_engine()
        grads = {c.name: c.param.grad for c in engine.candidates}
        assert all(g is None or isinstance(g, ConsumedGrad) for g in grads.values()), memory
        assert any(isinstance(g, ConsumedGrad) for g in grads.values())
        nbytes = [c.param.numel() * c.param.element_size() for c in engine.candidates]
        small = sum(n for n, c in zip(nbytes, engine.candidates) if c.param.numel() < PACK_BELOW)
        # One gradient at a time, and small ones awaiting their pack: never all of them.
        assert engine.lean.peak_grad_bytes <= max(nbytes) + small < sum(nbytes)
        optimizer.step()
        optimizer.zero_grad()
        models[memory] = model
    for key, value in models["lean"].state_dict().items():
        assert torch.equal(value, models["auto"].state_dict()[key]), key


def test_accumulation_from_the_first_step_with_explicit_lean_is_refused_clearly_or_declared():
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory="lean", selection="top"))
    model.train()
    model(**batch(seed=0)).loss.backward()
    with pytest.raises(RuntimeError, match="stoc_accumulating"):
        model(**batch(seed=1))  # a second micro-batch after the first gradient was consumed
    # Declared, it trains exactly as dense mode does.
    declared = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory="lean", selection="top"))
    dense = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory="dense", selection="top"))
    for model in (declared, dense):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            torch.manual_seed(step)
            with model.base_model.stoc_accumulating():
                (model(**batch(seed=10 * step)).loss / 2).backward()
            (model(**batch(seed=10 * step + 1)).loss / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
    for key, value in dense.state_dict().items():
        assert torch.allclose(value, declared.state_dict()[key], rtol=0, atol=1e-7), key


def test_after_a_lean_step_no_candidate_holds_a_gradient_or_optimizer_state():
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory="lean", task_type="SEQ_CLS"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    for step in range(3):
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        candidates = model.base_model.stoc_engine().candidates
        assert all(c.param.grad is None for c in candidates)
        assert all(len(optimizer.state[c.param]) == 0 for c in candidates)
        optimizer.zero_grad()
    assert len(optimizer.state[head]) > 0  # the task head keeps its dense AdamW state
    stats = model.stoc_stats()
    sparse = optimizer.state["peft_stoc.default"]["tensors"]
    supported = sum(s["index"].numel() for s in sparse.values())
    assert supported == stats["changed"]  # state for the entries drawn so far, not for the model
    assert 0 < stats["optimizer_state_bytes"] <= supported * (8 + 4 + 4) + 8 * len(sparse)


def test_gradient_memory_held_is_one_tensor_not_the_model():
    base = tiny_model(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=8000, num_attention_heads=4
    )
    model = get_peft_model(base, StocTuningConfig(k=500, memory="lean", task_type="SEQ_CLS"))
    model.train()
    candidates = model.base_model._adapters["default"].candidates
    nbytes = [c.param.numel() * c.param.element_size() for c in candidates]
    held = []

    def measure(_param):  # runs after StocTuning's own hook on the same parameter
        held.append(
            sum(
                c.param.grad.numel() * 4
                for c in candidates
                if c.param.grad is not None and type(c.param.grad) is torch.Tensor
            )
        )

    handles = [c.param.register_post_accumulate_grad_hook(measure) for c in candidates]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for handle in handles:
        handle.remove()
    from peft_stoc.sampling.streaming import PACK_BELOW

    # One tensor, plus the small ones (biases, norms) that wait to be processed packed together.
    bound = max(nbytes) + sum(n for n, c in zip(nbytes, candidates) if c.param.numel() < PACK_BELOW)
    assert max(held) <= bound < sum(nbytes) / 2
    assert model.stoc_stats()["grad_bytes"] <= bound
    # Dense mode holds every candidate's gradient at the step.
    dense = get_peft_model(
        tiny_model(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=8000, num_attention_heads=4
        ),
        StocTuningConfig(k=500, memory="dense", task_type="SEQ_CLS"),
    )
    dense.train()
    optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    dense(**batch(seed=0)).loss.backward()
    optimizer.step()
    assert dense.stoc_stats()["grad_bytes"] == sum(nbytes)


def test_bf16_base_accumulates_updates_below_its_resolution():
    def run(memory):
        base = tiny_model().to(torch.bfloat16)
        model = get_peft_model(base, StocTuningConfig(k=40, memory=memory, selection="top"))
        model.train()
        tuner = model.base_model
        before = {n: p.detach().clone() for n, p in tuner.base_params().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=2e-4)
        for step in range(30):
            model(**batch(seed=step % 3)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = sum(int((p != before[n]).sum()) for n, p in tuner.base_params().items())
        return model, changed, before

    _, dense_changed, _ = run("dense")
    model, lean_changed, before = run("lean")
    assert dense_changed == 0  # each bf16 update rounds to nothing
    assert lean_changed > 0  # float32 masters accumulate them
    masters = model.base_model.stoc_engine().masters()
    delta = model.base_model.adapter_delta("default")
    for name, (index, values) in delta.tensors.items():
        master_index, master = masters[name]
        slot = torch.searchsorted(master_index, index)
        assert torch.equal(master_index[slot], index)
        expected = master[slot] - before[name].view(-1)[index].float()
        assert torch.equal(values, expected), name  # the float32-accumulated update, not the bf16 rounding


def test_unsupported_optimizer_falls_back_to_dense_once_or_is_refused_when_lean_is_explicit():
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, selection="top"))
    model.train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model(**batch(seed=step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    fallbacks = [w for w in caught if "memory='dense'" in str(w.message)]
    assert len(fallbacks) == 1 and "RMSprop" in str(fallbacks[0].message)
    explicit = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory="lean", task_type="SEQ_CLS"))
    explicit.train()
    before = {k: v.clone() for k, v in explicit.state_dict().items()}
    optimizer = torch.optim.RMSprop(explicit.parameters(), lr=1e-3)
    explicit(**batch()).loss.backward()
    with pytest.raises(ValueError, match="RMSprop"):
        optimizer.step()
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_grad_scaler_overflow_skips_the_step_and_lowers_the_scale(memory):
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, memory=memory, selection="top"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    candidate = model.base_model._adapters["default"].candidates[3].param
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = candidate.register_hook(lambda g: torch.full_like(g, float("inf")))
    scaler.scale(model(**batch(seed=0)).loss).backward()
    handle.remove()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.stoc_stats()["step"] == 0
    scaler.scale(model(**batch(seed=1)).loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert model.stoc_stats()["step"] == 1 and model.stoc_stats()["changed"] == 40


def test_lazy_rule_advances_only_the_drawn_entries_state():
    # Reference: a hand-written per-entry Adam/AdamW on the masked gradient whose moments and step counts advance
    # only at the drawn entries (SparseAdam's treatment of entries a sparse gradient leaves out).
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(
        tiny_model(**no_dropout), StocTuningConfig(k=40, task_type="SEQ_CLS", selection="top", update_rule="lazy")
    )
    reference = tiny_model(**no_dropout)
    model.train()
    reference.train()
    lr, betas, eps, decay = 1e-2, (0.9, 0.999), 1e-8, 0.1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    head = [p for n, p in reference.named_parameters() if n.startswith("classifier.")]
    head_optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=decay)
    names = [c.name for c in model.base_model._adapters["default"].candidates]
    params = dict(reference.named_parameters())
    state = {
        n: (torch.zeros(params[n].numel()), torch.zeros(params[n].numel()), torch.zeros(params[n].numel()))
        for n in names
    }
    moved_outside = 0
    for step in range(6):
        before = {n: p.detach().clone() for n, p in model.base_model.base_params().items()}
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        drawn = dict(zip(names, model.base_model.stoc_engine().last_draw))
        reference(**batch(seed=step)).loss.backward()
        with torch.no_grad():
            for n in names:
                index = drawn[n]
                flat, grad = params[n].view(-1), params[n].grad.view(-1)[index]
                m, v, count = state[n]
                count[index] += 1
                m[index] = betas[0] * m[index] + (1 - betas[0]) * grad
                v[index] = betas[1] * v[index] + (1 - betas[1]) * grad * grad
                theta = flat[index] * (1 - lr * decay)
                m_hat = m[index] / (1 - betas[0] ** count[index])
                v_hat = v[index] / (1 - betas[1] ** count[index])
                flat[index] = theta - lr * m_hat / (v_hat.sqrt() + eps)
        head_optimizer.step()
        reference.zero_grad()
        for n, p in model.base_model.base_params().items():
            changed = (p.detach() != before[n]).view(-1).nonzero().squeeze(1)
            moved_outside += int((~torch.isin(changed, drawn[n])).sum())
    assert moved_outside == 0  # only drawn entries ever change under the lazy rule
    trained = dict(model.base_model.base_params())
    for n in names:
        assert torch.allclose(trained[n], params[n], rtol=0, atol=2e-6), n


def test_grad_bytes_are_those_of_the_latest_step():
    """`memory="auto"` streams gradients from the first step on, and declared accumulation holds them densely: the
    figure of each step is its own, not the largest so far."""
    model = get_peft_model(
        tiny_model(hidden_size=128, intermediate_size=512, num_hidden_layers=2, vocab_size=4000, num_attention_heads=4),
        StocTuningConfig(k=200, task_type="SEQ_CLS"),
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    figures = []
    for step in range(3):
        with model.base_model.stoc_accumulating() if step == 1 else contextlib.nullcontext():
            model(**batch(seed=step)).loss.backward()  # step 1: a held micro-batch, drawn from at the step
        optimizer.step()
        optimizer.zero_grad()
        figures.append(model.stoc_stats()["grad_bytes"])
    from peft_stoc.sampling.streaming import PACK_BELOW

    nbytes = [c.param.numel() * c.param.element_size() for c in model.base_model.stoc_engine().candidates]
    small = sum(n for n, c in zip(nbytes, model.base_model.stoc_engine().candidates) if c.param.numel() < PACK_BELOW)
    assert figures[1] == sum(nbytes)
    assert figures[0] <= max(nbytes) + small < figures[1]
    assert figures[2] <= max(nbytes) + small < figures[1]


@pytest.mark.parametrize("rule", ["masked_grad", "strict", "lazy"])
@pytest.mark.parametrize("kind, group", [("adam", {"betas": (0.9, 0.999), "eps": 1e-8}), ("sgd", {"momentum": 0.9})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_drawn_again_updates_as_a_mask_drawn_anew(rule, kind, group, dtype):
    """Indices drawn again (the very tensor, as a reused mask hands over) skip the search for their place in the
    support: the weights and the state are those of the same indices handed over as new tensors, bit for bit."""
    from peft_stoc.training.sparse_optim import sparse_step

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(40, 30, generator=generator).to(dtype)
    masks = [torch.randperm(1200, generator=generator)[:90].sort().values for _ in range(3)]
    grads = [torch.randn(90, generator=generator) for _ in range(12)]
    group = {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, **group}
    results = []
    for fresh in (False, True):
        param, state = start.clone(), {}
        for step in range(12):
            drawn = masks[step // 4]  # a draw every 4 steps, its mask reused in between
            sparse_step(param, state, drawn.clone() if fresh else drawn, grads[step], group, kind, rule)
        results.append((param, state))
    (param, state), (fresh_param, fresh_state) = results
    assert torch.equal(param, fresh_param)
    assert state.keys() == fresh_state.keys()
    assert all(torch.equal(state[key], fresh_state[key]) for key in state)
