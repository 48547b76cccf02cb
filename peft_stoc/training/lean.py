"""The optimizer step of a StocTuning engine in memory-lean mode (a part of `engine.StepEngine`): the draw finished
from the gradients consumed during the backward, the update applied to the drawn entries after the optimizer's
step, and the way back to dense mode for optimizers whose arithmetic is not reproduced.
"""

from __future__ import annotations

import warnings

import torch

from ..distributed import ranks as distributed
from . import sparse_optim


class LeanSteps:
    """Memory-lean steps of `StepEngine`."""

    def _leave_lean(self, optimizer) -> None:
        """An optimizer whose arithmetic StocTuning does not reproduce: dense mode from now on (or refuse)."""
        name = type(optimizer).__name__
        quantized = [c.name for c in self.candidates if c.overlay is not None]
        if quantized:
            raise ValueError(
                f"StocTuning updates the quantized weights of this model (e.g. '{quantized[0]}') itself, with the "
                f"arithmetic of torch.optim SGD, Adam and AdamW; it cannot apply {name}'s. Use one of those."
            )
        if self.config.update_rule == "lazy":
            raise ValueError(
                f"update_rule='lazy' is applied by StocTuning's memory-lean mode, which reproduces torch.optim SGD, "
                f"Adam and AdamW, not {name}. Use one of those, or update_rule='masked_grad' / 'strict'."
            )
        if self.config.memory == "lean":
            raise ValueError(
                f"StocTuningConfig(memory='lean') reproduces the updates of torch.optim SGD, Adam and AdamW, not of "
                f"{name}. Use one of those, or memory='dense' (or the default 'auto', which falls back to dense)."
            )
        warnings.warn(
            f"StocTuning trains in memory='dense' mode with {name}: the memory-lean mode reproduces the updates of "
            "torch.optim SGD, Adam and AdamW only, so this optimizer gets dense gradients and keeps its own state "
            "for every candidate.",
            stacklevel=4,
        )
        lean, self.lean = self.lean, None
        if lean.stream is not None:  # gradients already consumed in this step: give them back, masked
            drawn, values, factors = lean.finish(self._new_stream)
            for candidate, index, value, factor in zip(self.candidates, drawn, values, factors):
                if value is None:
                    candidate.param.grad = None
                    continue
                grad = torch.zeros_like(candidate.param)
                grad.view(-1).index_copy_(0, index, (value * factor).to(grad.dtype))
                candidate.param.grad = grad
            self._given_draw = drawn
        lean.reset()

    def _lean_step(self, optimizer, kind: str) -> None:
        if self.sharded:
            return self._sharded_step(optimizer, kind)
        lean = self.lean
        self._sync_statistics_for_lean()
        lean.consume_dense(list(self._gradient_order), self.tracker.means, self._new_stream)
        if self.sparse is not None and self.sparse.sums:
            lean.take_values(self.sparse.sums, self._new_stream)
        if lean.nonfinite:
            reason = self.tracker.nonfinite_reason(lean.nonfinite)
            self._skip(optimizer, reason=f"{reason}. No weight changed.")
            return
        drawn, values, factors = lean.finish(self._new_stream)
        if isinstance(self._rank_sync, distributed.RankSync):
            self._rank_sync.check_draw(drawn)
        if not self._reuses_mask():
            self.draws += 1
        self._drew_now = not self._reuses_mask()
        self.last_draw = drawn
        self.stats.drawn = int(sum(d.numel() for d in drawn))
        self.stats.grad_bytes = lean.peak_grad_bytes
        self._pending = (drawn, values, factors, kind, set())
        self._release_gradients(optimizer)
        self.stats.step += 1
        self._cycle_drawn = True

    def _release_gradients(self, optimizer) -> None:
        """The candidates this optimizer holds leave its hands: StocTuning updates them after its step."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for candidate in self.candidates:
            if id(candidate.param) in held:
                candidate.param.grad = None

    def _sync_statistics_for_lean(self) -> None:
        # Under data parallelism nothing was streamed: μ is reduced across ranks before the draw, as in dense mode.
        self._rank_sync = self._sync_statistics() if self.lean.stream is None else None

    def _lean_update(self, optimizer) -> None:
        drawn, values, factors, kind, done = self._pending
        kind = sparse_optim.kind_of(optimizer) or kind
        record, local = (lambda c, index: self.patch.record(c.name, c.param, index)), {}
        if self.sharded:  # indices local to the rows held here; the record of originals keeps whole-tensor indices
            starts = {id(c): self._start_of(i) for i, c in enumerate(self.candidates)}
            record = lambda c, index: self.patch.record(c.name, c.param, index + starts[id(c)])  # noqa: E731
            local = {"param_of": lambda c: c.param.detach().to_local()}
        self.lean.update(optimizer, kind, self.config.update_rule, drawn, values, factors, record, done, **local)
        self._sparse_states = self.lean.states(optimizer)

    def masters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Float32 master values of low-precision candidates, by name: (sorted flat indices, values). They outlive
        the optimizer, so an adapter saved after training still gets the float32 deltas."""
        states = self._sparse_states or {}
        masters = {name: (s["index"], s["master"]) for name, s in states.items() if "master" in s and "index" in s}
        if self.sharded:  # the sparse state of a shard indexes the rows held here
            starts = {c.name: self._start_of(i) for i, c in enumerate(self.candidates)}
            masters = {name: (index + starts[name], values) for name, (index, values) in masters.items()}
        return masters
