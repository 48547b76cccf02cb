"""Same seed, same data → same masks: in dense and memory-lean mode, for any chunking, on one process or with the
rows split over FSDP2 ranks. Every entry's random number depends on (seed, step, entry) alone (`entry_keys`)."""

import random
import threading

import pytest
import torch
import torch.distributed as dist

from peft_stoc.distributed import sharded_draw
from peft_stoc.sampling import importance, streaming, thinning
from peft_stoc.sampling.entry_keys import EntryKeys
from peft_stoc.sampling.importance import Source
from peft_stoc.sampling.selection import draw
from peft_stoc.sampling.streaming import StreamingDraw

from .test_lean import OPTIMIZERS, _train, assert_same_training

CASES = 500


class _Hub:
    """What a process group does for threads of one process: every rank's tensor, to every rank."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts


class ThreadSync(sharded_draw.ShardSync):
    """`ShardSync` over the ranks of a `_Hub` (threads) instead of torch.distributed."""

    def __init__(self, hub: _Hub, rank: int):
        super().__init__()
        self.hub, self._rank = hub, rank

    def rank(self) -> int:
        return self._rank

    def all_reduce(self, tensor, op=None):
        parts = torch.stack(self.hub.exchange(self._rank, tensor))
        tensor.copy_(parts.amax(0) if op == dist.ReduceOp.MAX else parts.sum(0))
        self.rounds += 1
        return tensor

    def all_gather(self, tensor):
        self.rounds += 1
        return torch.stack(self.hub.exchange(self._rank, tensor))


def _random_sources(rng: random.Random) -> list[Source]:
    """A few tensors shaped like a model's (row sizes that are and are not multiples of 64), heavy-tailed
    importance, embedding tables with absent tokens, tensors without a gradient, zero entries."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    sources = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(["linear", "embedding", "bias", "norm"])
        rows = rng.randint(1, 40)
        cols = rng.choice([1, 3, 17, 64, 70, 128]) if kind in ("linear", "embedding") else None
        shape = (rows, cols) if cols else (rng.randint(1, 300),)
        param = torch.randn(*shape, generator=g)
        grad = torch.randn(*shape, generator=g) * torch.randn(*shape, generator=g).mul(2.0).exp()
        if rng.random() < 0.3:
            grad = grad * (torch.rand(*shape, generator=g) < 0.3)  # many zero gradients
        if kind == "embedding":
            mu = torch.rand(rows, generator=g) * (torch.rand(rows, generator=g) < 0.3)
            means = [(mu, 0)]
        elif kind == "linear":
            means = [(torch.rand(cols, generator=g), 1)]
        elif kind == "norm":
            means = [(torch.rand(shape[0], generator=g), 0)]
        else:
            means = [(None, 0)]
        sources.append(Source(param, None if rng.random() < 0.1 else grad, means))
    if all(s.grad is None for s in sources):
        sources[0].grad = torch.ones_like(sources[0].param)
    return sources


def _shard(source: Source, rank: int, world: int) -> tuple[Source, int]:
    """Rank `rank`'s rows of `source`, as FSDP2 splits dim 0, and the global flat index of its first entry."""
    rows = source.param.shape[0]
    size = -(-rows // world)
    part = slice(min(rows, rank * size), min(rows, (rank + 1) * size))
    means = [(v[part] if v is not None and d == 0 else v, d) for v, d in source.means]
    grad = source.grad[part] if source.grad is not None else None
    per_row = source.param[0].numel() if source.param.dim() > 1 else 1
    return Source(source.param[part], grad, means), part.start * per_row


def _held(index: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    if index is None:
        return None
    return index[(index >= start) & (index < start + count)] - start


def _streamed(sources, k, method, keys, order, chunk, max_new, changed):
    stream = StreamingDraw(
        [s.param for s in sources], k, method, keys, changed=changed, max_new=max_new, chunk_entries=chunk
    )
    for tensor_id in order:
        if sources[tensor_id].grad is not None and sources[tensor_id].numel:  # a rank may hold no row of a tensor
            stream.add(tensor_id, sources[tensor_id].grad, sources[tensor_id].means)
    return stream


def _sharded(sources, k, method, seed, world, order, chunk, max_new, changed) -> list[torch.Tensor]:
    """The draw of `world` ranks, each holding its rows of every tensor (threads stand for processes)."""
    hub, results = _Hub(world), [None] * world

    def rank_draw(rank: int) -> None:
        try:
            run(rank)
        except BaseException as error:  # let the other ranks stop waiting, and the test see the error
            results[rank] = error
            hub.barrier.abort()

    def run(rank: int) -> None:
        shards = [_shard(s, rank, world) for s in sources]
        local = [s for s, _ in shards]
        starts = [start for _, start in shards]
        held = None
        if changed is not None:
            held = [_held(c, start, s.numel) for c, (s, start) in zip(changed, shards)]
        keys = EntryKeys(seed, offsets=starts)
        stream = _streamed(local, k, method, keys, order, chunk, max_new, held)
        drawn, _, count = sharded_draw.merged_draw(stream, ThreadSync(hub, rank), held)
        results[rank] = ([d + start for d, start in zip(drawn, starts)], count)

    threads = [threading.Thread(target=rank_draw, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    for error in sorted(errors, key=lambda e: isinstance(e, threading.BrokenBarrierError)):
        raise error
    assert len({count for _, count in results}) == 1
    return [torch.cat(parts).sort().values for parts in zip(*(drawn for drawn, _ in results))]


def test_same_seed_same_masks_in_every_mode_chunking_and_world_size(monkeypatch):
    """500 random problems, each drawn once as the dense fast draw does at its default chunking and once in a random
    mode (dense fast, dense with a key per entry, streaming in arrival order, FSDP2-sharded over 1 or 2 ranks), at a
    random chunk size: the same entries every time."""
    rng = random.Random(20261207)
    torch.set_num_threads(1)
    seen = set()
    for case in range(CASES):
        sources = _random_sources(rng)
        sizes = [s.numel for s in sources]
        k = rng.randint(1, max(1, min(60, sum(sizes) - 1)))
        seed = rng.randrange(1 << 62)
        budgeted = rng.random() < 0.15
        method = rng.choice(["stochastic", "random"]) if budgeted else "stochastic"
        changed, max_new = None, None
        if budgeted:
            for source in sources:
                count = rng.randint(0, source.numel)
                source.changed = torch.randperm(source.numel)[:count].sort().values
            changed, max_new = [s.changed for s in sources], rng.randint(0, k)
        # Thinning even small chunks (the blocks and groups of 8 of `entry_keys`), or a key per entry below 8192 —
        # independently for the reference and the case.
        monkeypatch.setattr(thinning, "SMALL_CHUNK_ENTRIES", rng.choice([0, 8192]))
        expected = draw(sources, k, method, EntryKeys(seed), max_new=max_new)
        mode = rng.choice(["fast", "dense", "lean", "sharded"])
        chunk = rng.choice([64, 200, 1024, 4096, 1 << 20])
        world = rng.choice([1, 2]) if mode == "sharded" else 1
        order = list(range(len(sources)))
        rng.shuffle(order)
        monkeypatch.setattr(streaming, "PACK_BELOW", rng.choice([0, 1 << 16]))
        monkeypatch.setattr(thinning, "SMALL_CHUNK_ENTRIES", rng.choice([0, 8192]))
        if mode in ("fast", "dense"):
            got = draw(sources, k, method, EntryKeys(seed), max_new=max_new, chunk_entries=chunk, strategy=mode)
        elif mode == "lean":
            got, _ = _streamed(sources, k, method, EntryKeys(seed), order, chunk, max_new, changed).finish()
        else:
            got = _sharded(sources, k, method, seed, world, order, chunk, max_new, changed)
        for a, b in zip(expected, got):
            assert torch.equal(a, b), (case, mode, chunk, world, method, k, sizes)
        if not budgeted:  # a budget may leave fewer than k entries to draw
            assert sum(d.numel() for d in got) == min(k, sum(sizes))
        seen.add((mode, world, budgeted))
    assert len(seen) == 10  # every mode, both world sizes when sharded, with and without a budget


@pytest.mark.parametrize("memory", ["lean", "auto"])
@pytest.mark.parametrize("chunk", [256, 1 << 20])
def test_stochastic_training_draws_the_same_masks_in_every_memory_mode(memory, chunk, monkeypatch):
    """The default `selection="stochastic"`: memory="lean" and "auto" train exactly as memory="dense" for the same
    seed, also with a chunk size that splits every tensor."""
    monkeypatch.setattr(importance, "CHUNK_ENTRIES", chunk)
    for seed in (0, 7):
        make = OPTIMIZERS["adamw_decay"]
        dense = _train("dense", make, steps=8, selection="stochastic", seed=seed)
        other = _train(memory, make, steps=8, selection="stochastic", seed=seed)
        assert_same_training(dense, other)
        assert len({tuple(torch.cat(d).tolist()) for d in dense[1]}) == 8  # a fresh draw at every step
