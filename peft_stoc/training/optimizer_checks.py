"""What the training step checks of an optimizer before it steps: that its update can be confined, that it steps
once per forward, that no base parameter outside the candidates would be trained densely, that its `eps` holds in a
low-precision dtype, and that the sparse optimizer state it holds indexes the entries this process holds.
"""

from __future__ import annotations

import inspect
import weakref

import torch

# Optimizers that move entries whose gradient is zero although their state is zero (ASGD's decay and averaging,
# L-BFGS's dense search direction): their steps cannot be confined, so they are refused before they run.
UNCONFINABLE = ("ASGD", "LBFGS", "SparseAdam")


# torch.optim's update rules that leave an entry alone where its gradient and its state are zero, so that masking the
# gradient confines their step. Other optimizers (subclasses that override `step`, other libraries') are checked
# after each step against a copy of the weights they hold, and their step is undone if it moved an entry not drawn.
_CONFINED_BY_MASKING = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta")


def _update_rule(optimizer_class) -> object:
    return inspect.unwrap(optimizer_class.step)


def confined_by_masking(optimizer) -> bool:
    rule = _update_rule(type(optimizer))
    return any(rule is _update_rule(getattr(torch.optim, n)) for n in _CONFINED_BY_MASKING if hasattr(torch.optim, n))


class OptimizerChecks:
    """The checks that need to remember something: which candidates were stepped since the latest forward, and the
    base parameters each optimizer holds outside the candidates."""

    def __init__(self, candidates, root: torch.nn.Module):
        self.candidates = candidates
        self.root = root
        self.stepped: set[int] = set()  # candidates held by the optimizers stepped since the latest forward
        self._strays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def parameters_replaced(self) -> None:
        """The candidates hold other parameters now (FSDP2's shards): forget what was found with the old ones."""
        self._strays = weakref.WeakKeyDictionary()

    def held(self, optimizer) -> set[int]:
        """The ids of the candidates `optimizer` holds."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return {id(c.param) for c in self.candidates if id(c.param) in held}

    def refuse_second_optimizer(self, optimizer) -> None:
        """Two optimizer steps over the same candidates between two forwards would update the drawn entries twice
        (or, in memory-lean mode, not at all the second time): refused before the second changes anything."""
        held = self.held(optimizer)
        twice = held & self.stepped
        if twice:
            name = next(c.name for c in self.candidates if id(c.param) in twice)
            raise RuntimeError(
                f"StocTuning: a second optimizer step over '{name}' (and {len(twice) - 1} more candidates) since the "
                f"latest forward ({type(optimizer).__name__}): one draw is made per step, and an optimizer step "
                "applies it. Give each candidate to one optimizer and step each optimizer once per step."
            )
        self.stepped |= held

    def refuse_unconfinable(self, optimizer) -> None:
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
            allowed = {id(c.param) for c in self.candidates} | self._trained_copies()
            found = [
                (n, p)
                for n, p in self.root.named_parameters(remove_duplicate=True)
                if id(p) in held and id(p) not in allowed
            ]
            cached = (count, found)
            self._strays[optimizer] = cached
        return cached[1]

    def _trained_copies(self) -> set[int]:
        from peft.utils.other import AuxiliaryTrainingWrapper

        return {
            id(p)
            for m in self.root.modules()
            if isinstance(m, AuxiliaryTrainingWrapper)
            for name, p in m.named_parameters()
            if not name.startswith("original_module.")
        }


def skipped_by_scaler(optimizer) -> bool:
    """A fused optimizer stepped by GradScaler skips inside its kernel when an inf/NaN was found."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.sum() > 0)


def refuse_paused_step(candidates) -> None:
    """Raise, before anything changes, when an optimizer holding candidates steps while their adapter is not being
    trained: the step would train nothing (the candidates do not require gradients then), or apply gradients
    left from before, which could neither be confined nor saved."""
    pending = [c.name for c in candidates if c.param.grad is not None]
    what = (
        f"would update {len(pending)} base tensors (e.g. '{pending[0]}') outside any adapter"
        if pending
        else "would train nothing"
    )
    raise RuntimeError(
        f"StocTuning: optimizer.step() {what}: the adapter is not being trained right now (it is disabled, "
        "inactive or in inference mode). Step the optimizer where the adapter is enabled and active (e.g. after "
        "the `with model.disable_adapter():` block, or after `set_adapter(name)`); to drop pending gradients, "
        "call `optimizer.zero_grad()`."
    )


def refuse_underflowing_eps(optimizer, candidates) -> None:
    """A dense step over low-precision weights: an `eps` that rounds to 0 in their dtype makes Adam-like updates
    0/0 = NaN at every entry whose gradient was masked (zero gradient, zero state). Refused before the step."""
    names = {id(c.param): c.name for c in candidates if c.param.dtype in (torch.float16, torch.bfloat16)}
    if not names:
        return  # float32 and float64 hold any eps an optimizer takes
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or eps <= 0:
            continue
        for param in group["params"]:
            if id(param) in names and torch.tensor(eps, dtype=param.dtype) == 0:
                smallest = torch.finfo(param.dtype).smallest_normal
                raise ValueError(
                    f"{type(optimizer).__name__}'s eps={eps} is 0 in {param.dtype} (the dtype of "
                    f"'{names[id(param)]}'): its dense step would divide 0 by 0 at every entry that was not drawn "
                    "and turn them into NaN. Nothing was changed. Train with memory='lean' or 'auto' and SGD, "
                    "Adam or AdamW (StocTuning's own update keeps float32 values for low-precision weights), set "
                    f"eps to at least {smallest:.1e}, or train a float32 base."
                )


def check_sparse_state(optimizer, state_key: str, layout: tuple[int, int] | None) -> None:
    """The sparse optimizer state indexes the entries this process holds: under FSDP2 the rows of its shards
    (`layout`: this rank and the number of processes). State loaded from another layout (another rank or number of
    processes, sharded or whole) is refused before anything changes; the layout is kept in the state for the next
    check."""
    from ..distributed.ranks import UnsupportedDistributedSetup

    holder = optimizer.state.get(state_key)
    if holder and holder.get("tensors"):
        saved = tuple(holder["shards"]) if holder.get("shards") is not None else None
        if saved != layout:
            raise UnsupportedDistributedSetup(
                f"The optimizer's StocTuning state ({state_key!r}) indexes the entries of {_layout_text(saved)}, "
                f"but this process holds those of {_layout_text(layout)}. Load each process's own optimizer state on "
                "as many processes sharded alike, or start the optimizer afresh (the adapter's state in the model "
                "loads onto any layout)."
            )
    if layout is not None:
        optimizer.state[state_key]["shards"] = layout
    elif holder:
        holder.pop("shards", None)


def _layout_text(shards: tuple[int, int] | None) -> str:
    if shards:
        return f"rank {shards[0]} of {shards[1]} processes under FSDP2 (the rows that rank holds)"
    return "whole parameters (one process or DDP)"
