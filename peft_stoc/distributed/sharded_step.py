"""The optimizer step of a StocTuning engine over FSDP2's dim-0 shards (a part of `engine.StepEngine`).

Each process offers the best keys among the entries it holds, the processes agree on the global top-k
(`sharded_draw.merged_draw`), and each updates the drawn entries it holds.
"""

from __future__ import annotations

import weakref

import torch

from ..sampling.entry_keys import EntryKeys
from ..sampling.importance import Source, finite_means
from ..sampling.selection import draw_uniform
from ..sampling.streaming import StreamingDraw
from ..training.audit import Audit
from ..training.consumed_grad import factor_of
from ..training.weak_hooks import weak_call
from . import ranks as distributed
from . import sharded_draw, shards


class ShardedSteps:
    """FSDP2 support of `StepEngine`: following the shards, and the draw and update over them."""

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def parameters_replaced(self) -> None:
        """The candidates hold other parameters now (FSDP2's shards): the optimizers this engine serves are found by
        the new ones. (The ids of the replaced parameters, freed, may come back with the parameters of another
        model.)"""
        self._ids = {id(c.param): i for i, c in enumerate(self.candidates)}
        self._owned = weakref.WeakKeyDictionary()

    def follow_shards(self) -> None:
        """The candidates are FSDP2's dim-0 shards now: draw over the rows held here, update them in place."""
        if self.lean is None:
            raise distributed.UnsupportedDistributedSetup(
                "Under FSDP2, StocTuning applies the optimizer's update to the drawn entries of each shard itself "
                "(memory-lean mode): use StocTuningConfig(memory='auto') or 'lean' with torch.optim SGD, Adam or "
                "AdamW, not memory='dense'."
            )
        whole = [c.name for c in self.candidates if not shards.is_shard(c.param)]
        if whole:  # every rank holds it whole: each would offer its entries as its own
            raise distributed.UnsupportedDistributedSetup(
                f"FSDP2 left {len(whole)} candidate parameters unsharded (e.g. '{whole[0]}', in `ignored_params` or "
                "outside every `fully_shard` unit): StocTuning draws over dim-0 shards, so shard them too, or leave "
                "their modules out of the candidates with `exclude_modules`."
            )
        self.shards = [shards.shard_rows(c.param) for c in self.candidates]
        self.parameters_replaced()
        self._strays = weakref.WeakKeyDictionary()
        self.audit = Audit(self.candidates, self.patch)
        mesh = next(c.param.device_mesh for c in self.candidates if shards.is_shard(c.param))
        group = mesh.get_group()
        self._shard_sync = sharded_draw.ShardSync(group)
        if self.reduce_statistics is None:
            self.reduce_statistics = distributed.RankSync(group)
        if self._grad_handles:  # the hooks of the parameters FSDP2 replaced never fire: hook the shards
            for handle in self._grad_handles:
                handle.remove()
            self._grad_handles.clear()
            for position, candidate in enumerate(self.candidates):
                self._grad_handles.append(
                    candidate.param.register_post_accumulate_grad_hook(weak_call(self._on_gradient, position))
                )

    def _start_of(self, position: int) -> int:
        """Flat index in the whole tensor of the first entry held here."""
        shape = self.candidates[position].param.shape
        return self.shards[position].start * (int(shape[1:].numel()) if len(shape) else 1)

    def _sharded_step(self, optimizer, kind: str) -> None:
        """The draw over FSDP2 shards: each process offers the best keys among the entries it holds, the processes
        agree on the global top-k (`sharded_draw.merged_draw`), and each keeps the drawn entries it holds."""
        sync = self._shard_sync
        sync.reset()
        self._rank_sync = self._sync_statistics()
        budgeted = self.max_changed is not None
        locals_ = [c.param.detach().to_local() for c in self.candidates]
        starts = [self._start_of(i) for i in range(len(self.candidates))]
        device = locals_[0].device
        fixed = None
        if self._reuses_mask():
            fixed = [(d - start).to(local.device) for d, start, local in zip(self.last_draw, starts, locals_)]
        elif self.config.selection == "random" and not budgeted:
            whole = draw_uniform([Source(c.param, None, []) for c in self.candidates], self.k, self._generator(device))
            fixed = [
                shards.held_locally(index, start, local.numel()) for index, start, local in zip(whole, starts, locals_)
            ]
        changed = None
        if budgeted:
            changed = [
                shards.held_locally(self.patch.index[c.name], start, local.numel())
                if c.name in self.patch.index
                else None
                for c, start, local in zip(self.candidates, starts, locals_)
            ]
        stream = StreamingDraw(
            locals_,
            self.k,
            self.config.selection,
            EntryKeys.of(self._generator(device), offsets=starts),  # the same keys as one process: global positions
            fixed=fixed,
            changed=changed,
            max_new=max(0, self.max_changed - self._changed_count()) if budgeted else None,
        )
        order = list(self._gradient_order)
        order += [p for p in range(len(self.candidates)) if p not in self._gradient_order]
        bad, held = [], 0
        for position in order:
            candidate, grad = self.candidates[position], self.candidates[position].param.grad
            if grad is None:
                continue
            grad = grad.to_local() if shards.is_shard(grad) else grad
            if grad.numel() == 0:
                continue  # no rows of this tensor here (it has fewer rows than there are processes)
            held += grad.numel() * grad.element_size()
            means = self.tracker.means(candidate, self.shards[position])
            if not bool(torch.isfinite(torch.linalg.vector_norm(grad))) or not finite_means(means):
                bad.append(candidate.name)
                continue
            stream.add(position, grad, means)
        if sync.total(len(bad)):  # a shard anywhere with inf/NaN: every process skips
            where = ", ".join(bad[:3]) or "tensors held by another process"
            self._skip(
                optimizer,
                reason=f"the gradients or activations of {where} are not finite (inf or NaN). No weight changed.",
            )
            return
        if fixed is not None:
            drawn, values = stream.finish()
            count = self.stats.drawn if self._reuses_mask() else self.k
        else:
            drawn, values, count = sharded_draw.merged_draw(stream, sync, changed)
        if not self._reuses_mask():
            self.draws += 1
        self.last_draw = [index + start for index, start in zip(drawn, starts)]  # the part held here
        self.stats.drawn = count
        self.stats.grad_bytes = held
        self._pending = (drawn, values, [factor_of(c.param.grad) for c in self.candidates], kind, set())
        self._release_gradients(optimizer)
        self.stats.step += 1
        self._cycle_drawn = True
