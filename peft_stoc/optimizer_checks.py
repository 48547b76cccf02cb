"""What a StocTuning engine checks of an optimizer before its step (a part of `engine.StepEngine`): that it can be
confined, that no base parameter outside the candidates would be trained densely, and that the sparse optimizer
state it holds indexes the entries this process holds.
"""

from __future__ import annotations

import torch

from . import distributed, optimizer_hooks

# Optimizers that move entries whose gradient is zero although their state is zero (ASGD's decay and averaging,
# L-BFGS's dense search direction): their steps cannot be confined, so they are refused before they run.
UNCONFINABLE = ("ASGD", "LBFGS", "SparseAdam")


class OptimizerChecks:
    """Checks of `StepEngine` on the optimizers it serves."""

    def _check_sparse_state(self, optimizer) -> None:
        """The sparse optimizer state indexes the entries this process holds: under FSDP2 the rows of its shards.
        State loaded from another layout (another rank or number of processes, sharded or whole) is refused before
        anything changes; the layout is kept in the state for the next check."""
        optimizer_hooks.watch_checkpoints(optimizer)
        layout = None
        if self.sharded:
            group = self._shard_sync.group
            layout = (torch.distributed.get_rank(group), torch.distributed.get_world_size(group))
        holder = optimizer.state.get(self.state_key)
        if holder and holder.get("tensors"):
            saved = tuple(holder["shards"]) if holder.get("shards") is not None else None
            if saved != layout:

                def where(shards):
                    return (
                        f"rank {shards[0]} of {shards[1]} processes under FSDP2 (the rows that rank holds)"
                        if shards
                        else "whole parameters (one process or DDP)"
                    )

                raise distributed.UnsupportedDistributedSetup(
                    f"The optimizer's StocTuning state ({self.state_key!r}) indexes the entries of {where(saved)}, "
                    f"but this process holds those of {where(layout)}. Load each process's own optimizer state on as "
                    "many processes sharded alike, or start the optimizer afresh (the adapter's state in the model "
                    "loads onto any layout)."
                )
        if layout is not None:
            optimizer.state[self.state_key]["shards"] = layout
        elif holder:
            holder.pop("shards", None)

    def _refuse_unconfinable(self, optimizer) -> None:
        name = type(optimizer).__name__
        if name in UNCONFINABLE:
            raise ValueError(
                f"StocTuning cannot confine {name}: it moves entries whose gradient is zero, so every base entry "
                "would change. Use SGD, Adam or AdamW (or another optimizer that leaves such entries alone)."
            )
        strays = [name for name, param in self.untracked_base_params(optimizer) if param.grad is not None]
        if strays:
            raise RuntimeError(
                f"StocTuning: base parameter '{strays[0]}' (and {len(strays) - 1} more) would be trained densely: it "
                "requires a gradient but is not a candidate of the adapter being trained, so its change would be "
                "neither confined nor saved. Freeze it (`requires_grad_(False)`), or make it a candidate "
                "(`target_modules`) or a fully trained module (`modules_to_save`)."
            )

    def untracked_base_params(self, optimizer) -> list[tuple[str, torch.Tensor]]:
        """Base parameters held by `optimizer` that are neither candidates nor trained copies of modules_to_save."""
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._strays.get(optimizer)
        if cached is None or cached[0] != count:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            allowed = set(self._ids) | self._trained_copies()
            found = [
                (n, p)
                for n, p in self.tracker.root.named_parameters(remove_duplicate=True)
                if id(p) in held and id(p) not in allowed
            ]
            cached = (count, found)
            self._strays[optimizer] = cached
        return cached[1]

    def _trained_copies(self) -> set[int]:
        from peft.utils.other import AuxiliaryTrainingWrapper

        return {
            id(p)
            for m in self.tracker.root.modules()
            if isinstance(m, AuxiliaryTrainingWrapper)
            for name, p in m.named_parameters()
            if not name.startswith("original_module.")
        }
