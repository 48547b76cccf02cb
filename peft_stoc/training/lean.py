"""The lean strategy of the training step (`memory="lean"`, and `"auto"` with SGD, Adam or AdamW): the draw is
finished from the gradients
consumed during the backward (`gradient_stream`), the optimizer is handed no candidate gradient, and StocTuning applies
the optimizer's own arithmetic to the drawn entries after its step (`sparse_optim`).
"""

from __future__ import annotations

import torch

from ..distributed.ranks import RankSync
from ..sampling.one_thread import on_one_thread
from . import sparse_optim
from .gradient_stream import GradientStream
from .optimizer_checks import check_sparse_state
from .optimizer_hooks import watch_checkpoints
from .user_warnings import warn_at_user


class LeanStrategy:
    """The step with gradients consumed in the backward and a sparse optimizer state."""

    def __init__(self, engine):
        self.engine = engine
        self.gradients = GradientStream(engine.candidates)
        self.pending = None  # (drawn, values, factors, kind, updated positions) of the step under way
        self.sparse_states: dict | None = None  # the sparse optimizer state of the latest step
        self.rank_sync = None  # the data-parallel check of the draw under way

    def check(self, optimizer) -> None:
        """The sparse state this optimizer holds must index the entries this process holds."""
        watch_checkpoints(optimizer)
        check_sparse_state(optimizer, self.engine.state_key, self.layout())

    def layout(self) -> tuple[int, int] | None:
        """What the sparse state indexes: None for whole parameters (FSDP2 shards: `ShardedStrategy`)."""
        return None

    def draw(self, optimizer) -> list[torch.Tensor] | None:
        engine, gradients = self.engine, self.gradients
        # Under data parallelism nothing was streamed: μ is reduced across ranks before the draw, as in dense mode.
        self.rank_sync = engine.sync_statistics() if gradients.stream is None else None
        gradients.consume_dense(engine.progress.order(), engine.tracker.means, engine.new_stream)
        if engine.sparse is not None and engine.sparse.sums:
            gradients.take_values(engine.sparse.sums, engine.new_stream)
        if gradients.nonfinite:
            reason = engine.tracker.nonfinite_reason(gradients.nonfinite)
            engine.skip(optimizer, reason=f"{reason}. No weight changed.")
            return None
        drawn, values, factors = gradients.finish(engine.new_stream)
        if isinstance(self.rank_sync, RankSync):
            self.rank_sync.check_draw(drawn)
        engine.stats.grad_bytes = gradients.peak_grad_bytes
        self.pending = (drawn, values, factors, sparse_optim.kind_of(optimizer), set())
        return drawn

    def confine(self, drawn: list[torch.Tensor], optimizer) -> None:
        """The candidates this optimizer holds leave its hands: StocTuning updates their drawn entries after its
        step, and the optimizer steps only the other parameters."""
        held = self.engine.checks.held(optimizer)
        for candidate in self.engine.candidates:
            if id(candidate.param) in held:
                candidate.param.grad = None

    def join(self, optimizer) -> None:
        """Another optimizer, holding other candidates, in a step already drawn: it leaves them to StocTuning too,
        which updates them after its step (`update`; each candidate once in a step)."""
        if self.pending is not None:
            self.confine(self.pending[0], optimizer)

    def update(self, optimizer) -> None:
        """The optimizer's arithmetic on the drawn entries of the candidates it holds; the originals are recorded
        first. Recorded entries only move, so their checksum is taken anew."""
        if self.pending is not None:
            drawn, values, factors, kind, done = self.pending
            kind = sparse_optim.kind_of(optimizer) or kind
            self._apply(optimizer, kind, drawn, values, factors, done)
            self.sparse_states = self.states(optimizer)
        self.engine.audit.take_touched()

    def changed_count(self) -> int:
        """Entries changed so far."""
        return self.engine.patch.count

    def record(self, position: int, index: torch.Tensor) -> None:
        """The originals of the drawn entries of a candidate, recorded before the update writes them."""
        candidate = self.engine.candidates[position]
        self.engine.patch.record(candidate.name, candidate.param, index)

    def local(self, candidate) -> torch.Tensor:
        """The tensor the drawn indices index: the whole parameter."""
        return candidate.param

    def states(self, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
        """This adapter's sparse optimizer state per candidate name, kept in `optimizer.state`."""
        holder = optimizer.state[self.engine.state_key]
        return holder.setdefault("tensors", {})

    @on_one_thread
    def _apply(self, optimizer, kind: str, drawn, values, factors, done: set[int]) -> None:
        """Apply the step to the candidates this optimizer holds (and that have not been updated in this step)."""
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        states = self.states(optimizer)
        scale = getattr(optimizer, "grad_scale", None)  # a fused optimizer stepped by GradScaler unscales itself
        rule = self.engine.config.update_rule
        for position, candidate in enumerate(self.engine.candidates):
            group = groups.get(id(candidate.param))
            if group is None or position in done:
                continue
            done.add(position)
            if values[position] is None:
                candidate.param.grad = None
                continue  # no gradient in this step: torch's optimizers skip such a parameter entirely
            grad = values[position] * factors[position]
            if scale is not None:
                grad = grad / scale
            if drawn[position].numel():
                self.record(position, drawn[position])
            state = states.setdefault(candidate.name, {})
            sparse_optim.sparse_step(self.local(candidate), state, drawn[position], grad, group, kind, rule)
            candidate.param.grad = None

    def leave(self, optimizer) -> list[torch.Tensor] | None:
        """An optimizer whose arithmetic StocTuning does not reproduce: the way to the dense strategy (or a refusal).
        Gradients already consumed in this step are given back, masked; their draw is returned."""
        _refuse_dense(self.engine, type(optimizer).__name__)
        gradients, drawn = self.gradients, None
        if gradients.stream is not None:
            drawn, values, factors = gradients.finish(self.engine.new_stream)
            for candidate, index, value, factor in zip(self.engine.candidates, drawn, values, factors):
                if value is None:
                    candidate.param.grad = None
                    continue
                grad = torch.zeros_like(candidate.param)
                grad.view(-1).index_copy_(0, index, (value * factor).to(grad.dtype))
                candidate.param.grad = grad
        gradients.reset()
        return drawn

    def drop_pending(self) -> None:
        """A new step begins (its first forward): forget the latest draw, which every optimizer of its step has
        applied by now (or whose optimizer raised). The gradients consumed since stay."""
        self.pending = None

    def finish(self) -> None:
        """The step ran: its gradient stream starts afresh. The draw stays pending until the next forward, for
        another optimizer stepping in the same step (`join`)."""
        self.gradients.reset()

    def abandon(self) -> None:
        """The step was abandoned: its consumed gradients and its partial draw are dropped."""
        self.gradients.clear_gradients()
        self.finish()

    def detach(self) -> None:
        """Nothing is lent to the optimizer between steps."""

    def masters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Float32 master values of low-precision candidates, by name: (sorted flat indices, values). They outlive
        the optimizer, so an adapter saved after training still gets the float32 deltas."""
        states = self.sparse_states or {}
        return {name: (s["index"], s["master"]) for name, s in states.items() if "master" in s and "index" in s}


def _refuse_dense(engine, name: str) -> None:
    """Settings under which the dense strategy cannot stand in for the lean one; otherwise a warning."""
    quantized = [c.name for c in engine.candidates if c.overlay is not None]
    if quantized:
        raise ValueError(
            f"StocTuning updates the quantized weights of this model (e.g. '{quantized[0]}') itself, with the "
            f"arithmetic of torch.optim SGD, Adam and AdamW; it cannot apply {name}'s. Use one of those."
        )
    if engine.config.update_rule == "lazy":
        raise ValueError(
            f"update_rule='lazy' is applied by StocTuning's memory-lean mode, which reproduces torch.optim SGD, "
            f"Adam and AdamW, not {name}. Use one of those, or update_rule='masked_grad' / 'strict'."
        )
    if engine.config.memory == "lean":
        raise ValueError(
            f"StocTuningConfig(memory='lean') reproduces the updates of torch.optim SGD, Adam and AdamW, not of "
            f"{name}. Use one of those, or memory='dense' (or the default 'auto', which falls back to dense)."
        )
    warn_at_user(
        f"StocTuning trains in memory='dense' mode with {name}: the memory-lean mode reproduces the updates of "
        "torch.optim SGD, Adam and AdamW only, so this optimizer gets dense gradients and keeps its own state "
        "for every candidate."
    )
