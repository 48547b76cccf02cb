"""Steps that reuse a mask (`mask_interval > 1`) compute only the masked entries' gradients: the same masks and
weights as the dense backward, and on such a step no weight gradient of full size is ever formed."""

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from peft_stoc import StocTuningConfig
from peft_stoc.training.sparse_backward import tappable

from .helpers import batch, loss_of, state_of, tiny_model

CASES = [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM")]


def _model(arch, task, dropout: bool = True, **options):
    torch.manual_seed(0)
    options = {"k": 40, "task_type": task, "mask_interval": 4, **options}
    no_dropout = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return get_peft_model(tiny_model(arch, task, seed=0, **no_dropout), StocTuningConfig(**options))


def _train(model, task, steps: int = 12, accumulation: int = 1, sparse: bool = True):
    """`steps` AdamW steps; `sparse=False`: the dense backward on every step (the taps taken off)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    engine = model.base_model.stoc_engine()
    masks, reuse_steps = [], 0
    torch.manual_seed(1)  # the same dropout masks for both runs
    for step in range(steps):
        if not sparse:
            engine.sparse.remove()
        for micro in range(accumulation):
            holding = accumulation > 1 and micro < accumulation - 1
            with model.base_model.stoc_accumulating() if holding else _nothing():
                loss = loss_of(model, batch(task, seed=step * accumulation + micro)) / accumulation
                reuse_steps += engine.sparse.active and bool(engine.sparse.tapped)
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        masks.append([index.clone() for index in engine.last_draw])
    return masks, reuse_steps


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_same(a, b, masks_a, masks_b):
    for step, (x, y) in enumerate(zip(masks_a, masks_b)):
        assert all(torch.equal(i, j) for i, j in zip(x, y)), f"step {step} drew other entries"
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        scale = q.detach().abs().max().clamp_min(1e-12)
        assert float((p - q).detach().abs().max() / scale) <= 1e-6, name


@pytest.mark.parametrize("arch, task", CASES)
@pytest.mark.parametrize("selection", ["top", "stochastic"])
@pytest.mark.parametrize("memory", ["lean", "dense"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_reused_masks_train_as_the_dense_backward(arch, task, selection, memory, accumulation):
    sparse, dense = (_model(arch, task, selection=selection, memory=memory) for _ in range(2))
    masks, reused = _train(sparse, task, accumulation=accumulation)
    reference, none = _train(dense, task, accumulation=accumulation, sparse=False)
    assert reused == 9 * accumulation and none == 0  # steps 2-4, 6-8, 10-12 reuse the mask of steps 1, 5, 9
    tapped = sparse.base_model.stoc_engine().sparse.tapped
    assert len(tapped) >= 3  # the embeddings and the projections (tied tables too) get the sparse backward
    _assert_same(sparse, dense, masks, reference)
    assert sparse.base_model.adapter_delta("default").num_changed > 0


class _FullSizeGradients(TorchDispatchMode):
    """Dense tensors of a tapped weight's shape that an operation allocates (views of existing tensors are not
    counted; the batch's token count is chosen so that no activation has a weight's shape)."""

    def __init__(self, shapes, weights):
        super().__init__()
        self.shapes, self.weights, self.found = shapes, weights, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = [a for a in leaves if isinstance(a, torch.Tensor) and a.layout is torch.strided]
        known = self.weights | {t.untyped_storage().data_ptr() for t in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            # (a sparse tensor of a weight's shape holds only the masked entries)
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.layout is torch.strided
                and tuple(tensor.shape) in self.shapes
            ):
                if tensor.untyped_storage().data_ptr() not in known:
                    self.found.append((str(func), tuple(tensor.shape)))
        return out


def test_a_step_reusing_its_mask_forms_no_weight_gradient_of_full_size():
    model = _model("llama", "CAUSAL_LM", memory="lean", k=60)
    engine = model.base_model.stoc_engine()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch("CAUSAL_LM", size=5, length=11)  # 55 tokens: no activation has a weight's shape
    found, saved = [], []
    shapes = {tuple(c.param.shape) for c in engine.candidates if tappable(c)}
    for _ in range(4):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sizes: list[int] = []

        def pack(tensor, sizes=sizes, weights=weights):
            if tensor.untyped_storage().data_ptr() not in weights:
                sizes.append(tensor.untyped_storage().nbytes())
            return tensor

        mode = _FullSizeGradients(shapes, weights)
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**inputs).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        found.append(mode.found)
        saved.append(sum(sizes))
    # Step 1 draws (its backward forms every weight's gradient); steps 2-4 reuse its mask.
    assert len(engine.sparse.tapped) >= 10 and all(tappable(engine.candidates[p]) for p in engine.sparse.tapped)
    assert found[0]  # every weight's gradient, formed by the step that draws
    assert found[1] == found[2] == found[3] == []
    assert max(saved[1:]) < saved[0]  # no input kept for a weight-gradient product


def test_where_the_mask_sits_is_worked_out_once_per_draw(monkeypatch):
    """The plan of each tapped use (the rows and CSR pattern of its sampled product) is made by the first step that
    reuses a mask and kept while the mask is: 12 steps with mask_interval=4 make each plan 3 times, once per draw."""
    from peft_stoc.training import sparse_backward

    made = []
    plan = sparse_backward._plan
    monkeypatch.setattr(sparse_backward, "_plan", lambda *args: made.append(args[0]) or plan(*args))
    model = _model("llama", "CAUSAL_LM", memory="lean")
    _, reuse_steps = _train(model, "CAUSAL_LM")
    uses = sum(
        len(model.base_model.stoc_engine().candidates[p].uses) for p in model.base_model.stoc_engine().sparse.tapped
    )
    assert reuse_steps == 9 and uses >= 10
    assert len(made) == 3 * uses


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, masked", [(3000, 900), (64, 40)])
def test_the_masked_product_gathered_a_few_tokens_at_a_time_is_the_dense_gradient_at_the_mask(
    monkeypatch, kind, dtype, rows, masked
):
    """A tall weight's masked gradient is summed over blocks of tokens (the output gradient gathered a block at a
    time); each value is the dense weight gradient's at its entry, from kept input columns and from whole inputs."""
    from peft_stoc.training import sparse_backward
    from peft_stoc.tuner.candidates import UseKind

    monkeypatch.setattr(sparse_backward, "_GATHERED", 4096)  # several blocks at this size
    generator = torch.Generator().manual_seed(0)
    tokens, width = 200, 48
    shape = (rows, width) if kind == "linear" else (width, rows)
    index = torch.randperm(rows * width, generator=generator)[:masked].sort().values
    x = torch.randn(tokens, width, generator=generator).to(dtype)
    delta = torch.randn(tokens, rows, generator=generator).to(dtype)
    dense = (delta.float().t() @ x.float()) if kind == "linear" else (x.float().t() @ delta.float())
    use = UseKind.LINEAR_INPUT if kind == "linear" else UseKind.CONV1D_INPUT
    plan = sparse_backward._plan(use, index, torch.Size(shape))
    kept = x.index_select(-1, plan.columns) if plan.keep_columns else x
    assert plan.sampling()[0].numel() > 4096 // tokens  # more rows than one block holds a token of
    values = sparse_backward.masked_values(plan, kept, delta, None)
    torch.testing.assert_close(values, dense.reshape(-1)[index], rtol=1e-5, atol=1e-5)
    whole = sparse_backward.masked_values(plan.on_whole_inputs(), x, delta, None)  # (a quantized weight's overlay)
    torch.testing.assert_close(whole, dense.reshape(-1)[index], rtol=1e-5, atol=1e-5)


def test_the_check_sees_full_size_gradients_on_a_drawing_step():
    """The detector above is not blind: on a step that draws, the weight gradients it looks for are formed."""
    model = _model("llama", "CAUSAL_LM", memory="lean", k=60)
    engine = model.base_model.stoc_engine()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch("CAUSAL_LM", size=5, length=11)
    for _ in range(4):  # the mask of step 1, reused by steps 2-4; step 5 draws
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    shapes = {tuple(engine.candidates[p].param.shape) for p in engine.sparse.tapped}
    mode = _FullSizeGradients(shapes, {p.untyped_storage().data_ptr() for p in model.parameters()})
    with mode:
        model(**inputs).loss.backward()
    assert not engine.sparse.active and mode.found


def test_clipping_sees_the_norm_of_the_masked_gradients():
    from peft_stoc.training.consumed_grad import ConsumedGrad

    model = _model("bert", "SEQ_CLS", memory="lean")
    engine = model.base_model.stoc_engine()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    for step in range(2):
        loss_of(model, batch("SEQ_CLS", seed=step)).backward()
        if step == 1:  # a step reusing the mask: a tapped weight's gradient is its masked entries' sums
            sums = engine.sparse.sums
            assert sums and engine.sparse.active
            for position, values in sums.items():
                grad = engine.candidates[position].param.grad
                assert isinstance(grad, ConsumedGrad) and grad.sparse
                torch.testing.assert_close(grad.norm, torch.linalg.vector_norm(values))
            parts = [
                (g.norm if isinstance(g, ConsumedGrad) else torch.linalg.vector_norm(g)).double()
                for g in (p.grad for p in trained)
                if g is not None
            ]
            norm = torch.nn.utils.clip_grad_norm_(trained, 1e9)
            torch.testing.assert_close(norm.double(), torch.stack(parts).square().sum().sqrt(), rtol=1e-6, atol=0)
        optimizer.step()
        optimizer.zero_grad()


def test_a_reference_pass_and_a_pause_keep_the_sparse_backward():
    """DPO's reference forward under `disable_adapter()` between the policy's forward and backward, and a pause of
    the adapter, leave the taps in place: the reused steps still train as the dense backward does."""
    sparse, dense = (_model("llama", "CAUSAL_LM", memory="lean") for _ in range(2))
    results = []
    for model, taps in ((sparse, True), (dense, False)):
        engine = model.base_model.stoc_engine()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        masks = []
        for step in range(8):
            if not taps:
                engine.sparse.remove()
            inputs = batch("CAUSAL_LM", seed=step)
            loss = model(**inputs).loss
            with model.disable_adapter(), torch.no_grad():
                model(**inputs)  # the reference pass
            loss.backward()
            assert bool(engine.sparse.sums) == (taps and step % 4 != 0)  # the masked sums of a reused step
            optimizer.step()
            optimizer.zero_grad()
            masks.append([index.clone() for index in engine.last_draw])
        results.append(masks)
    _assert_same(sparse, dense, *results)


def _trainer_run(tmp_path, taps: bool):
    import datasets
    import transformers

    model = _model("bert", "SEQ_CLS", dropout=False, memory="lean")
    if not taps:
        model.base_model.stoc_engine().sparse = None
    rows = [batch("SEQ_CLS", size=1, seed=s) for s in range(32)]
    data = datasets.Dataset.from_dict({key: [r[key][0].tolist() for r in rows] for key in rows[0]})
    args = transformers.TrainingArguments(
        str(tmp_path / ("taps" if taps else "dense")),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4 * 2,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    return model


def test_trainer_with_accumulation_trains_reused_masks_as_the_dense_backward(tmp_path):
    sparse, dense = _trainer_run(tmp_path, taps=True), _trainer_run(tmp_path, taps=False)
    assert sparse.base_model.stoc_engine().sparse.tapped
    for (name, p), (_, q) in zip(sparse.named_parameters(), dense.named_parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-6 * float(q.detach().abs().max().clamp_min(1e-12)), name


def test_a_gradient_scaler_skips_an_overflowing_reused_step_and_unscales_the_masked_sums():
    results = []
    for taps in (True, False):
        model = _model("bert", "SEQ_CLS", dropout=False, memory="lean")
        engine = model.base_model.stoc_engine()
        if not taps:
            engine.sparse = None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(6):
            loss = loss_of(model, batch("SEQ_CLS", seed=step))
            if step == 2:  # a step reusing the mask overflows: skipped, nothing changes
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        assert model.stoc_stats()["step"] == 5
        results.append(model)
    for (name, p), (_, q) in zip(results[0].named_parameters(), results[1].named_parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-6 * float(q.detach().abs().max().clamp_min(1e-12)), name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_steps_reusing_a_mask_under_gradient_checkpointing_equal_those_without(reentrant):
    """Checkpointing runs each layer's forward again in the backward: the taps see the recomputed forward."""

    def run(checkpointing: bool) -> dict[str, torch.Tensor]:
        base = tiny_model("llama", "CAUSAL_LM")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(base, StocTuningConfig(k=40, task_type="CAUSAL_LM", mask_interval=3))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(6):
            model(**batch("CAUSAL_LM", seed=step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return state_of(model)

    plain, checkpointed = run(False), run(True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=0, atol=1e-6) for k in plain)
