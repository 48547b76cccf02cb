"""The draw: exact distributions, zero-importance handling, budgets, large tensors, seeds."""

import functools

import numpy as np
import pytest
import torch

from peft_stoc.sampling import entry_keys, thinning
from peft_stoc.sampling.entry_keys import EntryKeys
from peft_stoc.sampling.importance import Source, importance
from peft_stoc.sampling.selection import draw


@pytest.fixture
def one_thread():
    """Statistical tests run thousands of draws on tiny tensors, where waking a thread pool costs more than the
    work (and a lot more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sources(weights: list[torch.Tensor]) -> list[Source]:
    """Sources whose importance equals `weights` (θ = w, g = 1, μ = 1)."""
    return [Source(w.clone(), torch.ones_like(w), [(None, 0)]) for w in weights]


def _flat_ids(drawn, sizes):
    offsets = np.cumsum([0] + sizes[:-1])
    return sorted(int(o + i) for o, idx in zip(offsets, drawn) for i in idx.tolist())


def test_top_matches_brute_force_over_mu_theta_grad():
    g = torch.Generator().manual_seed(1)
    theta = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g), torch.randn(11, 3, generator=g)]
    grads = [torch.randn(t.shape, generator=g) for t in theta]
    mus = [[(torch.rand(5, generator=g), 1)], [(None, 0)], [(torch.rand(11, generator=g), 0)]]
    sources = [Source(t, gr, m) for t, gr, m in zip(theta, grads, mus)]
    brute = torch.cat(
        [
            (theta[0] * grads[0] * mus[0][0][0][None, :]).abs().flatten(),
            (theta[1] * grads[1]).abs().flatten(),
            (theta[2] * grads[2] * mus[2][0][0][:, None]).abs().flatten(),
        ]
    )
    k = 9
    drawn = draw(sources, k, "top", torch.Generator().manual_seed(0), chunk_entries=4)
    expected = sorted(torch.topk(brute, k).indices.tolist())
    assert _flat_ids(drawn, [35, 5, 33]) == expected
    for _s, d in zip(sources, drawn):
        assert torch.equal(d, d.sort().values)
        assert d.dtype == torch.int64


def test_importance_sums_uses_of_a_tied_weight():
    theta, grad = torch.randn(4, 3), torch.randn(4, 3)
    rows, cols = torch.rand(4), torch.rand(3)
    source = Source(theta, grad, [(rows, 0), (cols, 1)])
    expected = (theta * grad * (rows[:, None] + cols[None, :])).abs().flatten()
    assert torch.allclose(importance(source, slice(0, 4)), expected)


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_stochastic_matches_numpy_choice_without_replacement(chunk, one_thread):
    # Inclusion frequencies of successive sampling ∝ I² must match numpy.random.choice(replace=False, p=I²/ΣI²).
    importance_values = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.25, 1.5, 0.0, 0.75])
    p = (importance_values**2 / (importance_values**2).sum()).numpy().astype(np.float64)
    n, k, trials = len(p), 3, 6000
    rng = np.random.default_rng(0)
    reference = np.zeros(n)
    for _ in range(trials):
        reference[rng.choice(n, k, replace=False, p=p)] += 1
    ours = np.zeros(n)
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 5]
    for _ in range(trials):
        drawn = draw(
            _sources([importance_values[:3], importance_values[3:]]), k, "stochastic", generator, chunk_entries=chunk
        )
        ours[_flat_ids(drawn, sizes)] += 1
    reference, ours = reference / trials, ours / trials
    assert ours[6] == 0  # zero importance is never drawn while enough entries have importance
    # Standard error of a frequency is at most sqrt(.25/6000) ≈ 0.0065; allow ~5 of them for the difference.
    assert np.abs(ours - reference).max() < 0.045, (ours, reference)


def test_stochastic_first_draw_is_proportional_to_importance_squared(one_thread):
    values = torch.tensor([1.0, 2.0, 3.0, 0.5])
    p = values**2 / (values**2).sum()
    counts = torch.zeros(4)
    generator = torch.Generator().manual_seed(3)
    trials = 8000
    for _ in range(trials):
        counts[draw(_sources([values]), 1, "stochastic", generator)[0]] += 1
    assert torch.allclose(counts / trials, p, atol=0.02)


def test_random_is_uniform(one_thread):
    counts = torch.zeros(10)
    generator = torch.Generator().manual_seed(5)
    trials = 5000
    for _ in range(trials):
        drawn = draw(_sources([torch.zeros(4), torch.ones(6)]), 3, "random", generator)
        counts[_flat_ids(drawn, [4, 6])] += 1
    assert torch.allclose(counts / trials, torch.full((10,), 0.3), atol=0.03)


@pytest.mark.parametrize("method", ["stochastic", "top"])
def test_zero_importance_fills_uniformly_when_too_few_are_nonzero(method, one_thread):
    values = torch.tensor([0.0, 5.0, 0.0, 0.0, 2.0, 0.0])
    counts = torch.zeros(6)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3000):
        drawn = draw(_sources([values]), 4, method, generator)[0]
        assert drawn.numel() == 4 and drawn.unique().numel() == 4
        counts[drawn] += 1
    assert counts[1] == counts[4] == 3000  # every non-zero entry is drawn
    assert torch.allclose(counts[[0, 2, 3, 5]] / 3000, torch.full((4,), 0.5), atol=0.05)


def test_sources_without_gradient_are_skipped_but_filled_if_needed():
    sources = [Source(torch.ones(3), None, [(None, 0)]), Source(torch.ones(2), torch.ones(2), [(None, 0)])]
    drawn = draw(sources, 2, "top", torch.Generator().manual_seed(0))
    assert drawn[0].numel() == 0 and drawn[1].tolist() == [0, 1]
    drawn = draw(sources, 4, "top", torch.Generator().manual_seed(0))
    assert drawn[0].numel() == 2 and drawn[1].tolist() == [0, 1]


def test_budget_limits_new_entries_and_prefers_changed_ones():
    values = torch.arange(1.0, 21.0)  # importance grows with the index
    source = _sources([values])[0]
    source.changed = torch.tensor([0, 1, 2, 3])
    for method in ("top", "stochastic", "random"):
        drawn = draw([source], 6, method, torch.Generator().manual_seed(0), max_new=2)[0]
        new = drawn[~torch.isin(drawn, source.changed)]
        assert drawn.numel() == 6 and new.numel() <= 2, method
    top = draw([source], 6, "top", torch.Generator().manual_seed(0), max_new=2)[0]
    assert top.tolist() == [0, 1, 2, 3, 18, 19]
    exhausted = draw([source], 3, "top", torch.Generator().manual_seed(0), max_new=0)[0]
    assert torch.isin(exhausted, source.changed).all()


def test_same_seed_same_draw_different_seed_different_draw():
    values = [torch.rand(50, 8, generator=torch.Generator().manual_seed(2)), torch.rand(30)]
    a = draw(_sources(values), 20, "stochastic", torch.Generator().manual_seed(11))
    b = draw(_sources(values), 20, "stochastic", torch.Generator().manual_seed(11))
    c = draw(_sources(values), 20, "stochastic", torch.Generator().manual_seed(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_single_tensor_over_2_pow_24_entries():
    n = (1 << 24) + 17
    theta = torch.full((n,), 1e-5)
    theta[n - 5 :] = 1.0  # the heaviest entries sit past index 2^24
    source = Source(theta, torch.ones(n), [(None, 0)])
    drawn = draw([source], 5, "stochastic", torch.Generator().manual_seed(0))[0]
    assert drawn.numel() == 5 and drawn.max() < n and drawn.unique().numel() == 5
    assert (drawn >= (1 << 24)).sum() >= 4  # I² of the 5 heavy entries: 5; of all light ones: 1.7e-3


def test_indices_past_2_pow_31_in_one_tensor_use_int64():
    # An expanded (stride-0) tensor has more than 2^31 entries without the memory; importance grows with the row.
    rows, cols = (1 << 11) + 1, 1 << 20
    theta = torch.ones(1, 1).expand(rows, cols)
    grad = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)
    source = Source(theta, grad, [(None, 0)])
    drawn = draw([source], 4, "top", torch.Generator().manual_seed(0), chunk_entries=1 << 22)[0]
    assert drawn.dtype == torch.int64
    assert (drawn >= (rows - 1) * cols).all() and drawn.max() < rows * cols
    assert int(drawn.min()) >= 2**31


def _model_like_sources(seed: int = 0) -> list[Source]:
    """Sources shaped like a small model: an embedding with absent tokens, Linear weights, biases; heavy-tailed."""
    g = torch.Generator().manual_seed(seed)

    def heavy(*shape):
        return torch.randn(*shape, generator=g) * torch.randn(*shape, generator=g).mul(1.5).exp()

    vocab_mu = torch.zeros(300)
    vocab_mu[torch.randperm(300, generator=g)[:40]] = torch.rand(40, generator=g)
    return [
        Source(torch.randn(300, 24, generator=g), heavy(300, 24), [(vocab_mu, 0)]),  # embedding rows
        Source(torch.randn(96, 64, generator=g), heavy(96, 64), [(torch.rand(64, generator=g), 1)]),  # Linear
        Source(torch.randn(96, generator=g), heavy(96), [(None, 0)]),  # bias
        Source(torch.randn(64, 256, generator=g), heavy(64, 256), [(torch.rand(256, generator=g), 1)]),
        Source(torch.randn(256, generator=g), heavy(256), [(torch.rand(256, generator=g), 0)]),  # norm gain
    ]


def _importance_of(sources: list[Source]) -> torch.Tensor:
    return torch.cat([importance(s, slice(0, s.param.shape[0])) for s in sources])


def _record_rounds(monkeypatch) -> list[int]:
    """The number of rounds of every fast draw made from now on in the test."""
    rounds = []
    original_run = thinning.Thinning.run

    def run(self, sources):
        drawn = original_run(self, sources)
        rounds.append(self.rounds)
        return drawn

    monkeypatch.setattr(thinning.Thinning, "run", run)
    return rounds


@functools.cache
def _numpy_frequencies(k: int, trials: int) -> np.ndarray:
    """Inclusion frequencies of numpy.random.choice(replace=False, p ∝ I²) on `_model_like_sources()`."""
    weight = _importance_of(_model_like_sources()).double() ** 2
    p = (weight / weight.sum()).numpy()
    rng = np.random.default_rng(1)
    counts = np.zeros(len(p))
    for _ in range(trials):
        counts[rng.choice(len(p), k, replace=False, p=p)] += 1
    return counts / trials


@pytest.mark.parametrize(
    "chunk, threshold_factor",
    [(4096, None), (1 << 20, None), (4096, 30.0), (4096, 1e-6)],
    ids=["chunks", "one-chunk", "threshold-too-high", "threshold-too-low"],
)
def test_fast_stochastic_matches_numpy_on_a_model_sized_problem(chunk, threshold_factor, monkeypatch, one_thread):
    # Enough entries that the thinning does the work: a threshold from the block statistics, the pool raising it,
    # blocks with λ ≥ 1, Poisson hits, skipped embedding rows. A threshold too high forces later rounds (keys
    # between two thresholds); one far too low forces the per-chunk fallback. Frequencies must match numpy's.
    k, trials = 30, 1000
    if threshold_factor is not None:
        estimate = thinning.Thinning._first_threshold
        monkeypatch.setattr(
            thinning.Thinning, "_first_threshold", lambda self, *stats: estimate(self, *stats) * threshold_factor
        )
    sources = _model_like_sources()
    sizes = [s.numel for s in sources]
    weight = _importance_of(sources)
    reference = _numpy_frequencies(k, trials)
    ours = np.zeros(len(reference))
    generator = torch.Generator().manual_seed(1)
    rounds = _record_rounds(monkeypatch)
    for _ in range(trials):
        drawn = draw(sources, k, "stochastic", generator, chunk_entries=chunk)
        assert sum(d.numel() for d in drawn) == k
        ours[_flat_ids(drawn, sizes)] += 1
    ours /= trials
    if threshold_factor == 30.0:
        assert min(rounds) > 1  # the later rounds were exercised
    assert ours[(weight == 0).numpy()].sum() == 0
    # Entries drawn often: each frequency within 5 standard errors of the difference.
    frequent = reference >= 0.02
    assert frequent.sum() >= 20
    spread = np.sqrt((reference * (1 - reference) + ours * (1 - ours)) / trials)
    assert np.all(np.abs(ours - reference)[frequent] <= 5 * spread[frequent]), (ours[frequent], reference[frequent])
    # The long tail that only the Poisson thinning reaches: its share of the draw, per tensor and in all.
    offsets = np.cumsum([0] + sizes)
    for lo, hi in [(0, len(ours))] + list(zip(offsets[:-1], offsets[1:])):
        mask = ~frequent[lo:hi]
        a, b = ours[lo:hi][mask].sum(), reference[lo:hi][mask].sum()
        assert abs(a - b) <= 5 * np.sqrt((a + b) / trials) + 2 / trials, (lo, hi, a, b)


@pytest.mark.parametrize("chunk", [2048, 1 << 20])
def test_fast_and_dense_strategies_agree_on_top_and_random_support(chunk):
    sources = _model_like_sources(3)
    fast = draw(sources, 50, "top", torch.Generator().manual_seed(0), chunk_entries=chunk)
    dense = draw(sources, 50, "top", torch.Generator().manual_seed(0), chunk_entries=chunk, strategy="dense")
    assert all(torch.equal(a, b) for a, b in zip(fast, dense))
    drawn = draw(sources, 500, "random", torch.Generator().manual_seed(0))
    assert sum(d.numel() for d in drawn) == 500
    assert all(d.unique().numel() == d.numel() and (d < s.numel).all() for d, s in zip(drawn, sources))


def test_random_is_uniform_over_tensors_of_different_sizes(one_thread):
    sources = [Source(torch.zeros(3), None, [(None, 0)]), Source(torch.zeros(40, 5), None, [(None, 0)])]
    counts = torch.zeros(203)
    generator = torch.Generator().manual_seed(9)
    for _ in range(3000):
        counts[_flat_ids(draw(sources, 20, "random", generator), [3, 200])] += 1
    assert torch.allclose(counts / 3000, torch.full((203,), 20 / 203), atol=0.03)


def test_later_rounds_draw_the_keys_between_two_thresholds(monkeypatch, one_thread):
    # A first threshold above most keys: the draw must mostly come from later rounds, whose keys are conditioned
    # on lying between two thresholds. Inclusion frequencies must still match numpy's.
    values = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    weight = values.double() ** 2
    p = (weight / weight.sum()).numpy()
    k, trials = 2, 4000
    rng = np.random.default_rng(0)
    reference = np.zeros(len(p))
    for _ in range(trials):
        reference[rng.choice(len(p), k, replace=False, p=p)] += 1
    # Thresholds close together, so that each round's keys depend on both of its thresholds.
    monkeypatch.setattr(thinning, "LOWER_BY", 1.5)
    monkeypatch.setattr(thinning, "SMALL_CHUNK_ENTRIES", 0)  # thin even this tiny tensor
    monkeypatch.setattr(thinning.Thinning, "_first_threshold", lambda self, *stats: 40.0)
    rounds = _record_rounds(monkeypatch)
    ours = np.zeros(len(p))
    generator = torch.Generator().manual_seed(4)
    for _ in range(trials):
        ours[draw(_sources([values]), k, "stochastic", generator)[0].numpy()] += 1
    assert np.mean(rounds) > 2.5  # most draws needed two or more rounds after the first
    assert np.abs(ours - reference).max() / trials < 0.04, (ours / trials, reference / trials)


def test_entry_keys_are_those_of_the_earlier_code_for_the_same_seed():
    """An entry's Exp(1) variable depends on (seed, tensor id, position) alone and on nothing in how it is computed:
    these values were computed by the code before its walk down the tree was made faster (commit d01b0bd), so the
    same seed keeps drawing the same masks."""
    keys = EntryKeys(20261207)
    values = keys.exp(torch.tensor([0, 0, 3, 7]), torch.tensor([0, 12345, 5, 2**40]))
    expected = ["0x1.5a442a5d6d3dcp+1", "0x1.0e2fb61eb3ef4p+2", "0x1.507e49f50237ep+0", "0x1.d06e8af6a503ap+0"]
    assert [float(v).hex() for v in values] == expected


@pytest.mark.parametrize("level", [0, 1, 2, 3, 7])
def test_node_minima_are_the_same_evaluated_from_the_roots_or_from_the_nodes(level):
    """`minimum_range` (consecutive nodes of one tensor, from the roots down), `minimum` (any nodes, shared parents
    found) and `children_at` (from the parents) give bit-identical minima and argmin children."""
    keys = EntryKeys(987654321987)
    first, count = 8**4 * 3 + 5, 3000
    nodes = torch.arange(first, first + count)
    by_range = keys.minimum_range(4, level, first, count, "cpu")
    by_nodes = keys.minimum(torch.full_like(nodes, 4), level, nodes)
    assert all(torch.equal(a, b) for a, b in zip(by_range, by_nodes))
    if level < 7:
        parent_min, parent_arg = keys.minimum(torch.full_like(nodes, 4), level + 1, nodes >> 3)
        by_parents = keys.children_at(4, level, nodes, parent_min, parent_arg)
        assert all(torch.equal(a, b) for a, b in zip(by_parents, by_nodes))
    mixed = torch.tensor([4, 9] * (count // 2))  # nodes of two tensors: a stream key per element
    by_mixed = keys.minimum(mixed, level, nodes)
    alone = keys.minimum(torch.full_like(nodes, 9), level, nodes)
    assert torch.equal(by_mixed[0][1::2], alone[0][1::2]) and torch.equal(by_mixed[0][::2], by_nodes[0][::2])


@pytest.mark.parametrize("upper_nodes", [1 << 20, 80, 14])
def test_node_minima_descended_from_the_cached_upper_levels_are_those_from_the_roots(upper_nodes, monkeypatch):
    """`cache_upper` evaluates the upper levels of many tensors at once (tensors of one node, tensors crossing
    roots, global offsets as FSDP2 shards have them); `minimum_range` descending from there gives bit-identical
    minima to the walk from the roots, and ranges the cache does not hold still get the walk from the roots.
    With room for few nodes, the cache keeps a higher level."""
    monkeypatch.setattr(entry_keys, "UPPER_NODES", upper_nodes)
    extents = {0: (0, 5), 1: (8**7 - 700, 8**7 + 300_000), 3: (123_456, 123_456 + 2_000_000), 4: (4096, 8192)}
    cached, plain = EntryKeys(4242), EntryKeys(4242)
    cached.cache_upper(extents, "cpu")
    assert cached._upper.level == {1 << 20: entry_keys.UPPER_LEVEL, 80: 5, 14: 6}[upper_nodes]
    requests = [(0, 0, 0, 5), (1, 0, 8**7 - 700, 1000), (1, 2, (8**7 - 700) // 64, 4000), (3, 1, 123_456 // 8, 9000)]
    requests += [(3, 2, 123_456 // 64, 2_000_000 // 64), (4, 0, 4096, 4096), (4, 2, 60, 10), (2, 0, 77, 100)]
    used = []
    for tensor_id, level, first, count in requests:
        used.append(cached._upper.find(tensor_id, level, first, first + count - 1, "cpu") is not None)
        got, want = (
            cached.minimum_range(tensor_id, level, first, count, "cpu"),
            plain.minimum_range(tensor_id, level, first, count, "cpu"),
        )
        assert got[0].numel() == count
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (tensor_id, level, first)
    # Entries 3840.. (before tensor 4's) are under its cached node at levels 5 and 6 only; tensor 2 has none.
    assert used == [True] * 6 + [upper_nodes != 1 << 20, False]


def test_the_walk_down_the_tree_runs_on_one_thread_and_gives_the_threads_back():
    """The many small operations of the walk run on one intra-op thread (`one_thread`); the user's thread count is
    restored after every chunk, also when the walk raises."""
    from peft_stoc.sampling import one_thread

    if not one_thread._OPENMP:
        pytest.skip("the thread pool is not OpenMP's: the walk keeps the user's threads")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        test = thinning.Thinning._passing_blocks  # called inside the walk
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                thinning.Thinning, "_passing_blocks", lambda *a: seen.append(torch.get_num_threads()) or test(*a)
            )
            draw(
                _sources([torch.rand(300, 200), torch.rand(50, 64)]),
                100,
                "stochastic",
                torch.Generator().manual_seed(0),
            )
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2

        @one_thread.on_one_thread
        def failing():
            raise ValueError("inside")

        with pytest.raises(ValueError, match="inside"):
            failing()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
