"""No path changes the base silently: the exact audit (every entry, not a sample), optimizers whose step would move
entries they were not given, low-precision dense steps that would make NaN, steps while an adapter is disabled, and a
second optimizer over the same candidates."""

import pytest
import torch
from peft import get_peft_model

from peft_stoc import StocTuningConfig
from peft_stoc.training.checksums import checksum, entry_terms

from .helpers import base_snapshot, batch, tiny_model


def _model(memory="auto", dtype=None, **config):
    base = tiny_model()
    if dtype is not None:
        base = base.to(dtype)
    return get_peft_model(base, StocTuningConfig(k=40, task_type="SEQ_CLS", memory=memory, **config)).train()


def _step(model, optimizer, seed=0):
    model(**batch(seed=seed)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untouched_entry(model) -> tuple[str, int]:
    """A candidate entry no step changed (not in the record of originals)."""
    name = "bert.encoder.layer.0.attention.self.query.weight"
    recorded = model.base_model.stoc_state.patch.index.get(name, torch.empty(0, dtype=torch.long))
    return name, next(i for i in range(1000) if i not in set(recorded.tolist()))


def test_checksum_of_entries_adds_up_to_the_checksum_of_the_tensor():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for size in (1, 3, 7, 1000, 4099):
            flat = torch.randn(size).to(dtype)
            assert checksum(flat) == entry_terms(flat, torch.arange(size))
            changed = flat.clone()
            bits = changed.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[changed.element_size()])
            bits[size // 2] ^= 1
            assert checksum(changed) != checksum(flat)  # one entry, one step of its last bit
    several_chunks = torch.randn((2 << 20) + 3)  # more 64-bit words than one chunk of the sum, and a tail
    assert checksum(several_chunks) == entry_terms(several_chunks, torch.arange(several_chunks.numel()))


def test_checksums_read_on_several_threads_are_those_of_one(monkeypatch):
    """The audit's pass over the weights, shared among Python threads, gives every tensor's checksum bit for bit:
    tensors of several dtypes and sizes (chunks cut between threads, a view not aligned to 8 bytes, an empty one),
    and the chunks were read on other threads too."""
    import threading

    from peft_stoc.training import checksums as sums

    generator = torch.Generator().manual_seed(0)
    flats = [torch.randn((1 << 20) + 5, generator=generator), torch.randn(3000, generator=generator).half()]
    flats += [torch.randn(777, generator=generator)[1:], torch.empty(0), torch.randn(1 << 19, generator=generator)]
    flats.append(torch.randn(5, generator=generator).double())
    expected = [int(checksum(flat)) for flat in flats]
    readers, terms = [], sums._chunk_terms
    monkeypatch.setattr(sums, "_chunk_terms", lambda jobs: readers.append(threading.current_thread()) or terms(jobs))
    monkeypatch.setattr(sums, "PARALLEL_WORDS", 0)
    threads = torch.get_num_threads()
    try:
        for count in (2, 3):
            torch.set_num_threads(count)
            readers.clear()
            assert [int(value) for value in sums.checksums(flats)] == expected
            # count shares: one read by the calling thread, the others by workers
            assert len(readers) == count and readers.count(threading.current_thread()) == 1
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        readers.clear()
        assert [int(value) for value in sums.checksums(flats)] == expected and not readers  # one thread: `checksum`
    finally:
        torch.set_num_threads(threads)


def test_recorded_sums_for_all_tensors_at_once_are_those_of_each_tensor(monkeypatch):
    """The recorded entries' checksums summed for every tensor in a few operations are, bit for bit, each tensor's
    own `entry_terms` (tensors of several dtypes, two of one entry size, one without a record); the per-position
    terms are worked out again only when a record changed."""
    from peft_stoc.training import record_sums

    generator = torch.Generator().manual_seed(0)
    flats = [torch.randn(n, generator=generator).to(d) for n, d in ((5000, torch.float32), (777, torch.bfloat16))]
    flats += [torch.randn(300, generator=generator).double(), torch.randn(500, generator=generator).half()]
    flats.append(torch.randn(64, generator=generator))
    records = [torch.randperm(f.numel(), generator=generator)[: f.numel() // 3].sort().values for f in flats[:4]]
    records.append(torch.empty(0, dtype=torch.int64))
    held = [(f, i, f.index_select(0, i) * 2) for f, i in zip(flats, records)]
    made, group = [], record_sums._Group
    monkeypatch.setattr(record_sums, "_Group", lambda *a: made.append(a) or group(*a))
    sums = record_sums.RecordSums()
    expected = [int(entry_terms(f.index_select(0, i), i)) for f, i, _ in held]
    assert sums.current(held, torch.device("cpu")).tolist() == expected
    assert sums.originals(held, torch.device("cpu")).tolist() == [int(entry_terms(o, i)) for _, i, o in held]
    assert len(made) == 4  # one group per dtype
    flats[0][records[0][0]] += 1  # a recorded entry moves: the same record, its current sum follows
    expected[0] = int(entry_terms(flats[0].index_select(0, records[0]), records[0]))
    assert sums.current(held, torch.device("cpu")).tolist() == expected and len(made) == 4
    held[1][2][0] += 1  # an original written in place: the record changed
    assert sums.originals(held, torch.device("cpu"))[1] == entry_terms(held[1][2], records[1])
    assert len(made) == 8


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_a_single_entry_edit_is_caught_at_the_next_forward_and_before_a_save(memory, tmp_path):
    model = _model(memory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    name, entry = _untouched_entry(model)
    weight = model.base_model.base_params()[name]
    with torch.no_grad():
        weight.view(-1)[entry] += 1
    with pytest.raises(RuntimeError, match="query.weight' changed outside"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(RuntimeError, match="query.weight' changed outside"):
        model(**batch(seed=1))


@pytest.mark.parametrize("memory", ["dense", "lean"])
@pytest.mark.parametrize("mask_interval", [1, 2])
def test_a_forward_after_a_step_checks_every_entry_in_one_pass(memory, mask_interval, monkeypatch):
    """After a step the audit knows every tensor's whole checksum: the next forward compares it (one pass over the
    weights) and needs no terms of the recorded entries, whose count grows as training goes. An edit still falls
    through to the full check, which names the tensor (the tests above)."""
    from peft_stoc.training import audit

    model = _model(memory, mask_interval=mask_interval)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    full_checks = []
    original = audit.Audit._sums
    monkeypatch.setattr(audit.Audit, "_sums", lambda self: full_checks.append(1) or original(self))
    for seed in range(1, 4):
        _step(model, optimizer, seed=seed)
    assert full_checks == []
    name, entry = _untouched_entry(model)
    with torch.no_grad():
        model.base_model.base_params()[name].view(-1)[entry] += 1
    with pytest.raises(RuntimeError, match="query.weight' changed outside"):
        model(**batch())
    assert full_checks == [1]


def test_an_edit_of_an_entry_training_changed_is_caught():
    model = _model("dense")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer)
    name, index = next((n, i) for n, i in model.base_model.stoc_state.patch.index.items() if i.numel())
    with torch.no_grad():
        model.base_model.base_params()[name].view(-1)[index[0]] += 1
    with pytest.raises(RuntimeError, match="changed outside"):
        model(**batch(seed=1))


def test_weight_clipping_after_the_step_is_caught():
    """Clipping every weight after an SGD step moves entries the step did not draw."""
    model = _model("dense")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer)
    with torch.no_grad():
        for param in model.base_model.base_params().values():
            param.clamp_(-0.065, 0.065)
    with pytest.raises(RuntimeError, match="changed outside"):
        _step(model, optimizer, seed=1)


class _CentralisedSGD(torch.optim.SGD):
    """Gradient-centralised SGD: subtracts each row's mean gradient, which moves entries whose gradient is zero."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.dim() > 1:
                    param.grad.sub_(param.grad.mean(dim=1, keepdim=True))
        return super().step(closure)


class _DecayEverySGD(torch.optim.SGD):
    """SGD that decays every entry it holds, gradient or not."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.mul_(0.999)


@pytest.mark.parametrize("optimizer_class", [_CentralisedSGD, _DecayEverySGD])
def test_an_optimizer_that_moves_undrawn_entries_is_undone_exactly(optimizer_class):
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    before = base_snapshot(model)
    with pytest.warns(UserWarning, match="dense"), pytest.raises(RuntimeError, match="not drawn.*put back"):
        _step(model, optimizer)
    assert _same(base_snapshot(model), before)


@pytest.mark.parametrize("setting", [("dense", torch.optim.AdamW), ("auto", torch.optim.RMSprop)])
def test_a_dense_float16_step_whose_eps_vanishes_is_refused_before_any_nan(setting):
    memory, optimizer_class = setting
    model = _model(memory, dtype=torch.float16)
    optimizer = optimizer_class(model.parameters(), lr=1e-3)
    before = base_snapshot(model)
    with pytest.raises(ValueError, match="eps=1e-08 is 0 in torch.float16"):
        with pytest.warns(UserWarning) if memory == "auto" else _nothing():
            _step(model, optimizer)
    assert _same(base_snapshot(model), before)
    # An eps that float16 can hold trains, and the entries not drawn stay as they were.
    optimizer = optimizer_class(model.parameters(), lr=1e-3, eps=1e-4)
    optimizer.zero_grad()
    _step(model, optimizer, seed=1)
    after = base_snapshot(model)
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    assert 0 < changed <= 40


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_a_step_inside_disable_adapter_is_refused(memory):
    model = _model(memory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    before = base_snapshot(model)
    with model.disable_adapter():
        model(**batch(seed=1))  # the base does not require gradients here: a backward would have nothing to do
        with pytest.raises(RuntimeError, match="not being trained right now"):
            optimizer.step()
    assert _same(base_snapshot(model), before)


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_a_second_optimizer_over_the_same_candidates_is_refused(memory):
    model = _model(memory)
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**batch()).loss.backward()
    first.step()
    after_first = base_snapshot(model)
    with pytest.raises(RuntimeError, match="second optimizer step"):
        second.step()
    assert _same(base_snapshot(model), after_first)


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_two_optimizers_over_different_candidates_step_together(memory):
    """Two optimizers over disjoint candidates in one step train as one optimizer over all of them."""
    runs = []
    for split in (True, False):
        model = _model(memory)
        params = model.base_model.base_params()
        embeddings = [p for n, p in params.items() if "embeddings" in n]
        rest = [p for n, p in params.items() if "embeddings" not in n]
        head = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params.values())]
        groups = [embeddings, rest + head] if split else [embeddings + rest + head]
        optimizers = [torch.optim.SGD(group, lr=0.1) for group in groups]
        before = base_snapshot(model)
        for seed in range(2):
            model(**batch(seed=seed)).loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            for optimizer in optimizers:
                optimizer.zero_grad()
        after = base_snapshot(model)
        runs.append({k: after[k] for k in before if not torch.equal(after[k], before[k])})
        changed = sum(int((after[k] != before[k]).sum()) for k in before)
        assert 0 < changed <= 80
    split, whole = runs
    assert split.keys() == whole.keys()
    assert all(torch.allclose(split[k], whole[k]) for k in split)


def test_stoc_sync_accepts_deliberate_changes_for_paused_adapters_too():
    model = _model("dense")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer)
    model.add_adapter("other", StocTuningConfig(k=40, task_type="SEQ_CLS", memory="dense"))
    model.set_adapter("other")
    _step(model, optimizer, seed=1)
    model.set_adapter("default")
    name, entry = _untouched_entry(model)
    with torch.no_grad():
        model.base_model.base_params()[name].view(-1)[entry] += 1  # on purpose
    model.base_model.stoc_sync()
    _step(model, optimizer, seed=2)
    model.set_adapter("other")
    _step(model, optimizer, seed=3)  # the paused adapter's engine took the change too


@pytest.mark.parametrize("memory", ["dense", "lean"])
def test_converting_the_model_after_a_step_is_no_change_outside_a_step(memory):
    model = _model(memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer)
    model.to(torch.bfloat16).to(torch.float32)  # every weight converted and back: bits moved, on purpose
    _step(model, optimizer, seed=1)
    name, entry = _untouched_entry(model)
    with torch.no_grad():
        model.base_model.base_params()[name].view(-1)[entry] += 1
    with pytest.raises(RuntimeError, match="changed outside"):
        model(**batch(seed=2))
