"""The streaming draw (memory-lean training): the same draw as the global one, fed one gradient at a time."""

import numpy as np
import pytest
import torch

from peft_stoc.sampling import streaming, thinning
from peft_stoc.sampling.importance import Source
from peft_stoc.sampling.selection import draw
from peft_stoc.sampling.streaming import StreamingDraw

from .test_selection import _flat_ids, _importance_of, _model_like_sources, _numpy_frequencies, _sources, one_thread

__all__ = ["one_thread"]  # a fixture, used by name


def stream_draw(sources, k, method, generator, max_new=None, chunk_entries=None, order=None):
    """`draw` through `StreamingDraw`: tensors arrive in `order` (default: last first, as a backward runs). Checks
    that the values carried with the drawn entries are the gradients there."""
    changed = [s.changed for s in sources]
    stream = StreamingDraw(
        [s.param for s in sources], k, method, generator, changed=changed, max_new=max_new, chunk_entries=chunk_entries
    )
    for i in order if order is not None else reversed(range(len(sources))):
        if sources[i].grad is not None:
            stream.add(i, sources[i].grad, sources[i].means)
    index, values = stream.finish()
    for source, drawn, carried in zip(sources, index, values):
        if source.grad is None:
            assert carried is None
        else:
            assert torch.equal(carried, source.grad.reshape(-1).index_select(0, drawn).float())
    return index


@pytest.fixture(params=["packed", "unpacked"])
def packing(request, monkeypatch):
    """Small tensors processed packed together (the default), or each on arrival."""
    if request.param == "unpacked":
        monkeypatch.setattr(streaming, "PACK_BELOW", 0)
    return request.param


def test_streamed_top_equals_the_global_top(packing):
    for seed in range(3):
        sources = _model_like_sources(seed)
        expected = draw(sources, 50, "top", torch.Generator().manual_seed(0))
        got = stream_draw(sources, 50, "top", torch.Generator().manual_seed(0), chunk_entries=2048)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_streamed_stochastic_matches_numpy_on_a_model_sized_problem(chunk, packing, one_thread):
    k, trials = 30, 1000
    sources = _model_like_sources()
    sizes = [s.numel for s in sources]
    weight = _importance_of(sources)
    reference = _numpy_frequencies(k, trials)
    ours = np.zeros(len(reference))
    generator = torch.Generator().manual_seed(2)
    for _ in range(trials):
        drawn = stream_draw(sources, k, "stochastic", generator, chunk_entries=chunk)
        assert sum(d.numel() for d in drawn) == k
        ours[_flat_ids(drawn, sizes)] += 1
    ours /= trials
    assert ours[(weight == 0).numpy()].sum() == 0
    frequent = reference >= 0.02
    spread = np.sqrt((reference * (1 - reference) + ours * (1 - ours)) / trials)
    assert np.all(np.abs(ours - reference)[frequent] <= 5 * spread[frequent]), (ours[frequent], reference[frequent])
    offsets = np.cumsum([0] + sizes)
    for lo, hi in [(0, len(ours))] + list(zip(offsets[:-1], offsets[1:])):
        mask = ~frequent[lo:hi]
        a, b = ours[lo:hi][mask].sum(), reference[lo:hi][mask].sum()
        assert abs(a - b) <= 5 * np.sqrt((a + b) / trials) + 2 / trials, (lo, hi, a, b)


def test_streamed_stochastic_thins_small_tensors_exactly(monkeypatch, one_thread):
    # Thinning forced even on tiny tensors: each arriving tensor is keyed against the pool's running threshold.
    monkeypatch.setattr(thinning, "SMALL_CHUNK_ENTRIES", 0)
    monkeypatch.setattr(streaming, "PACK_BELOW", 0)
    values = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.25, 1.5, 0.0, 0.75])
    p = (values.double() ** 2 / (values.double() ** 2).sum()).numpy()
    k, trials = 3, 6000
    rng = np.random.default_rng(0)
    reference = np.zeros(len(p))
    for _ in range(trials):
        reference[rng.choice(len(p), k, replace=False, p=p)] += 1
    ours = np.zeros(len(p))
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        drawn = stream_draw(_sources([values[:3], values[3:]]), k, "stochastic", generator, chunk_entries=2)
        ours[_flat_ids(drawn, [3, 5])] += 1
    assert ours[6] == 0
    assert np.abs(ours - reference).max() / trials < 0.045


@pytest.mark.parametrize("method", ["stochastic", "top"])
def test_streamed_fill_is_uniform_over_zero_importance_entries(method, one_thread):
    values = [torch.tensor([0.0, 5.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]
    counts = torch.zeros(6)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3000):
        drawn = stream_draw(_sources(values), 4, method, generator)
        counts[_flat_ids(drawn, [3, 3])] += 1
    assert counts[1] == counts[4] == 3000
    assert torch.allclose(counts[[0, 2, 3, 5]] / 3000, torch.full((4,), 0.5), atol=0.05)


def test_streamed_fill_reaches_tensors_without_gradient():
    sources = [Source(torch.ones(3), None, [(None, 0)]), Source(torch.ones(2), torch.ones(2), [(None, 0)])]
    drawn = stream_draw(sources, 4, "top", torch.Generator().manual_seed(0))
    assert drawn[0].numel() == 2 and drawn[1].tolist() == [0, 1]


def test_streamed_random_is_uniform_and_carries_gradients(one_thread):
    sources = [
        Source(torch.zeros(3), torch.arange(3.0), [(None, 0)]),
        Source(torch.zeros(40, 5), torch.randn(40, 5), [(None, 0)]),
    ]
    counts = torch.zeros(203)
    generator = torch.Generator().manual_seed(9)
    for _ in range(3000):
        counts[_flat_ids(stream_draw(sources, 20, "random", generator), [3, 200])] += 1
    assert torch.allclose(counts / 3000, torch.full((203,), 20 / 203), atol=0.03)


def test_streamed_budget_limits_new_entries_and_prefers_changed_ones():
    source = _sources([torch.arange(1.0, 21.0)])[0]
    source.changed = torch.tensor([0, 1, 2, 3])
    for method in ("top", "stochastic", "random"):
        drawn = stream_draw([source], 6, method, torch.Generator().manual_seed(0), max_new=2)[0]
        new = drawn[~torch.isin(drawn, source.changed)]
        assert drawn.numel() == 6 and new.numel() <= 2, method
    top = stream_draw([source], 6, "top", torch.Generator().manual_seed(0), max_new=2)[0]
    assert top.tolist() == [0, 1, 2, 3, 18, 19]


def test_reused_mask_picks_up_the_gradients_at_fixed_entries():
    sources = _model_like_sources(1)
    fixed = [
        torch.tensor([1, 5]),
        torch.tensor([0]),
        torch.empty(0, dtype=torch.long),
        torch.tensor([7]),
        torch.tensor([255]),
    ]
    stream = StreamingDraw([s.param for s in sources], 5, "stochastic", torch.Generator(), fixed=fixed)
    for i in (4, 3, 1, 0):  # tensor 2 gets no gradient
        stream.add(i, sources[i].grad, sources[i].means)
    index, values = stream.finish()
    assert [i.tolist() for i in index] == [f.tolist() for f in fixed]
    assert values[2] is None
    for i in (0, 1, 3, 4):
        assert torch.equal(values[i], sources[i].grad.reshape(-1)[fixed[i]])


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e20])
@pytest.mark.parametrize("path", ["global", "stream"])
def test_draw_is_exact_at_any_magnitude_of_importance(scale, path, one_thread):
    # I² leaves float32's range below ~1e-19 and above ~1e19: the draw must not depend on the scale of importance.
    k, trials = 30, 1000
    sources = _model_like_sources()
    scaled = [Source(s.param * scale, s.grad, s.means) for s in sources]
    sizes = [s.numel for s in sources]
    reference = _numpy_frequencies(k, trials)
    ours = np.zeros(len(reference))
    generator = torch.Generator().manual_seed(3)
    fn = draw if path == "global" else stream_draw
    for _ in range(trials):
        drawn = fn(scaled, k, "stochastic", generator, chunk_entries=4096)
        ours[_flat_ids(drawn, sizes)] += 1
    ours /= trials
    frequent = reference >= 0.02
    spread = np.sqrt((reference * (1 - reference) + ours * (1 - ours)) / trials)
    assert np.all(np.abs(ours - reference)[frequent] <= 5 * spread[frequent])
    # The top 0.1% of entries by importance: their share of the draw against numpy's.
    weight = _importance_of(sources)
    top = (weight >= torch.quantile(weight[weight > 0], 0.999)).numpy()
    a, b = ours[top].sum(), reference[top].sum()
    assert abs(a - b) <= 5 * np.sqrt((a + b) / trials) + 2 / trials, (a, b)
    top_k = draw(scaled, k, "top", torch.Generator())
    assert _flat_ids(top_k, sizes) == sorted(torch.topk(weight, k).indices.tolist())
