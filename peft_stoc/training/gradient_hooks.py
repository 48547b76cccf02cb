"""The step engine's hooks on the candidates' gradients: each complete gradient is noted (and, in the lean strategy,
consumed by the streaming draw while the backward still runs); a quantized weight's gradient is computed from its
layer's inputs and output gradients; under a reused mask, only the masked entries' gradients arrive.
"""

from __future__ import annotations

import torch

from ..tuner.candidates import UseKind
from .consumed_grad import ConsumedGrad
from .sparse_backward import masked_values
from .weak_hooks import weak_call


class GradientHooks:
    """The post-accumulate-grad hooks of one engine's candidates (and the gradient sinks of quantized ones)."""

    def __init__(self, engine):
        self.engine = engine
        self._handles: list = []

    def __bool__(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        # Held weakly: autograd holds the hooks out of the garbage collector's sight (`weak_hooks`).
        for position, candidate in enumerate(self.engine.candidates):
            self._handles.append(
                candidate.param.register_post_accumulate_grad_hook(weak_call(self.on_gradient, position))
            )
            if candidate.overlay is not None:
                candidate.overlay.gradient_sink = lambda o, x, d, p=position: self.quantized_gradient(p, x, d)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for candidate in self.engine.candidates:
            if candidate.overlay is not None:
                candidate.overlay.gradient_sink = None

    def on_gradient(self, position: int, param: torch.Tensor) -> None:
        engine = self.engine
        if not engine.tracker.armed:
            return
        grad = param.grad
        # A consumed gradient (a tapped weight's masked values, delivered by its tap) has nothing left to consume.
        consumable = grad is not None and not isinstance(grad, ConsumedGrad)
        if consumable and engine.lean is not None and engine.progress.streams_now(engine.sharded):
            engine.lean.consume(position, param, engine.tracker.means(engine.candidates[position]), engine.new_stream)
        engine.progress.completes(position, param.grad)  # (a consumed one now, if it was consumed)

    def on_sparse_gradient(self, position: int) -> None:
        """A tapped weight's masked gradient arrived (the weight's own gradient hook does not run for it)."""
        self.engine.progress.completes(position, self.engine.candidates[position].param.grad)

    def quantized_gradient(self, position: int, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The gradient of a quantized weight's handle, from its layer's inputs and output gradients (tokens first):
        drawn from a few rows at a time when this backward ends the step (a `ConsumedGrad` is left), else the dense
        gradient, held until the step as a float weight's is (gradient accumulation; the last micro-batch adds its
        gradient to the held one, which is then drawn from as a float weight's is)."""
        engine = self.engine
        candidate, sparse = engine.candidates[position], engine.sparse
        if sparse is not None and sparse.active and sparse.sparse_sums:  # a reused mask: its entries' gradients only
            plan = sparse.plan_for(position, UseKind.LINEAR_INPUT).on_whole_inputs()
            return sparse.deliver(position, masked_values(plan, inputs, grads, None), candidate.param)
        held = candidate.param.grad is not None
        streams = engine.lean is not None and engine.tracker.armed and engine.progress.streams_now(engine.sharded)
        if held or not streams:
            return grads.t() @ inputs
        return engine.lean.consume_tiles(position, inputs, grads, engine.tracker.means(candidate), engine.new_stream)
