"""The sharded strategy of the training step (FSDP2's dim-0 shards): the lean strategy, over the rows each process
holds.

Each process offers the best keys among the entries it holds, the processes agree on the global top-k
(`sharded_draw.merged_draw`), and each updates the drawn entries it holds.
"""

from __future__ import annotations

import torch

from ..sampling.entry_keys import EntryKeys
from ..sampling.importance import Source, entries_per_row, finite_means
from ..sampling.selection import draw_uniform
from ..sampling.streaming import StreamingDraw
from ..training import sparse_optim
from ..training.consumed_grad import factor_of
from ..training.lean import LeanStrategy
from . import ranks as distributed
from . import sharded_draw, shards


def check_shardable(engine) -> None:
    """The candidates are FSDP2's dim-0 shards now: the lean strategy over every one of them, or a refusal."""
    if engine.config.memory == "dense" or not isinstance(engine.strategy, LeanStrategy):
        raise distributed.UnsupportedDistributedSetup(
            "Under FSDP2, StocTuning applies the optimizer's update to the drawn entries of each shard itself "
            "(memory-lean mode): use StocTuningConfig(memory='auto') or 'lean' with torch.optim SGD, Adam or "
            "AdamW, not memory='dense'."
        )
    whole = [c.name for c in engine.candidates if not shards.is_shard(c.param)]
    if whole:  # every rank holds it whole: each would offer its entries as its own
        raise distributed.UnsupportedDistributedSetup(
            f"FSDP2 left {len(whole)} candidate parameters unsharded (e.g. '{whole[0]}', in `ignored_params` or "
            "outside every `fully_shard` unit): StocTuning draws over dim-0 shards, so shard them too, or leave "
            "their modules out of the candidates with `exclude_modules`."
        )


class ShardedStrategy(LeanStrategy):
    """The lean step over FSDP2 shards: the draw agreed between the processes, the update of the rows held here."""

    def __init__(self, engine):
        super().__init__(engine)
        self.rows = [shards.shard_rows(c.param) for c in engine.candidates]  # per candidate, the rows held here
        mesh = next(c.param.device_mesh for c in engine.candidates if shards.is_shard(c.param))
        self.group = mesh.get_group()
        self.sync = sharded_draw.ShardSync(self.group)

    def layout(self) -> tuple[int, int]:
        return torch.distributed.get_rank(self.group), torch.distributed.get_world_size(self.group)

    def start_of(self, position: int) -> int:
        """Flat index in the whole tensor of the first entry held here."""
        return self.rows[position].start * entries_per_row(self.engine.candidates[position].param.shape)

    def changed_count(self) -> int:
        """Entries changed so far, over all processes."""
        return self.sync.total(self.engine.patch.count)

    def record(self, position: int, index: torch.Tensor) -> None:
        # Indices local to the rows held here; the record of originals keeps whole-tensor indices.
        super().record(position, index + self.start_of(position))

    def local(self, candidate) -> torch.Tensor:
        return candidate.param.detach().to_local()

    def masters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # The sparse state of a shard indexes the rows held here.
        starts = {c.name: self.start_of(i) for i, c in enumerate(self.engine.candidates)}
        return {name: (index + starts[name], values) for name, (index, values) in super().masters().items()}

    def draw(self, optimizer) -> list[torch.Tensor] | None:
        """Each process offers the best keys among the entries it holds, the processes agree on the global top-k,
        and each keeps the drawn entries it holds (returned as whole-tensor indices)."""
        engine = self.engine
        self.sync.reset()
        self.rank_sync = engine.sync_statistics()
        locals_ = [c.param.detach().to_local() for c in engine.candidates]
        starts = [self.start_of(i) for i in range(len(engine.candidates))]
        fixed, changed = self._fixed(locals_, starts), self._changed(locals_, starts)
        stream = StreamingDraw(
            locals_,
            engine.k,
            engine.config.selection,
            EntryKeys.of(engine.generator(), offsets=starts),  # the same keys as one process: global positions
            fixed=fixed,
            changed=changed,
            max_new=max(0, engine.max_changed - self.changed_count()) if changed is not None else None,
        )
        bad, held = self._offer(stream)
        if self.sync.total(len(bad)):  # a shard anywhere with inf/NaN: every process skips
            where = ", ".join(bad[:3]) or "tensors held by another process"
            reason = f"the gradients or activations of {where} are not finite (inf or NaN). No weight changed."
            engine.skip(optimizer, reason=reason)
            return None
        if fixed is not None:
            drawn, values = stream.finish()
            engine.stats.drawn = engine.stats.drawn if engine.reuses_mask() else engine.k
        else:
            drawn, values, engine.stats.drawn = sharded_draw.merged_draw(stream, self.sync, changed)
        engine.stats.grad_bytes = held
        factors = [factor_of(c.param.grad) for c in engine.candidates]
        self.pending = (drawn, values, factors, sparse_optim.kind_of(optimizer), set())
        return [index + start for index, start in zip(drawn, starts)]  # the part held here

    def _fixed(self, locals_, starts) -> list[torch.Tensor] | None:
        """The entries drawn already: a reused mask, or a uniform draw made alike on every process."""
        engine = self.engine
        if engine.reuses_mask():
            return [(d - start).to(local.device) for d, start, local in zip(engine.last_draw, starts, locals_)]
        if engine.config.selection == "random" and engine.max_changed is None:
            sources = [Source(c.param, None, []) for c in engine.candidates]
            whole = draw_uniform(sources, engine.k, engine.generator())
            return [shards.held_locally(i, start, local.numel()) for i, start, local in zip(whole, starts, locals_)]
        return None

    def _changed(self, locals_, starts) -> list[torch.Tensor | None] | None:
        """Under `max_changed`: the entries changed so far, among those held here."""
        engine = self.engine
        if engine.max_changed is None:
            return None
        return [
            shards.held_locally(engine.patch.index[c.name], start, local.numel())
            if c.name in engine.patch.index
            else None
            for c, start, local in zip(engine.candidates, starts, locals_)
        ]

    def _offer(self, stream: StreamingDraw) -> tuple[list[str], int]:
        """Feed the shards' gradients to the draw in the order they completed; the names of those not finite and
        the bytes of gradients held."""
        engine = self.engine
        bad, held = [], 0
        for position in engine.progress.order():
            candidate = engine.candidates[position]
            grad = candidate.param.grad
            if grad is None:
                continue
            grad = grad.to_local() if shards.is_shard(grad) else grad
            if grad.numel() == 0:
                continue  # no rows of this tensor here (it has fewer rows than there are processes)
            held += grad.numel() * grad.element_size()
            means = engine.tracker.means(candidate, self.rows[position])
            if not bool(torch.isfinite(torch.linalg.vector_norm(grad))) or not finite_means(means):
                bad.append(candidate.name)
                continue
            stream.add(position, grad, means)
        return bad, held
