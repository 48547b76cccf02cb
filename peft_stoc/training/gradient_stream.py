"""Memory-lean training, the backward: candidate gradients consumed as they complete, optimizer state only where it
is needed.

`GradientStream` does, for the lean strategy (`lean.LeanStrategy`):

* backward — a post-accumulate-grad hook per candidate feeds each complete gradient to the step's `StreamingDraw`
  and replaces it with a `ConsumedGrad` (its norm and finiteness, for clipping and loss scaling), so gradients of
  candidates never exist for the whole model at once, from the first step on. Gradients are left dense, and drawn
  from at the optimizer step instead, when the backward is not the last one of the step (gradient accumulation:
  accelerate's gradient state, `stoc_accumulating()`, or the number of forwards per step seen at a declared step) and
  under data parallelism (DDP reduces gradients in its own buckets after these hooks run). A plain loop that
  accumulates without saying so is refused at its second micro-batch, before anything changed
  (`consumed_grad.accumulation_error`);
* optimizer step — the draw is finished (`finish`: the drawn gradient values and the factors clipping and unscaling
  applied); the lean strategy then updates the candidates itself, so the user's optimizer keeps dense state only for
  the other parameters (task heads).

The sparse state lives in the optimizer's own `state` under a string key, so `optimizer.state_dict()` and
`load_state_dict()` — and with them Trainer and accelerate checkpoints — carry it without any hook.
"""

from __future__ import annotations

import torch

from .. import compat
from ..sampling.importance import finite_means
from ..sampling.streaming import StreamingDraw
from ..tuner.candidates import Candidate
from . import sparse_optim
from .consumed_grad import ConsumedGrad, factor_of


def accelerate_syncs_gradients() -> bool | None:
    """accelerate's (and Trainer's) word on whether the running backward ends an optimizer step; None if no
    accelerate gradient state exists in this process."""
    shared = compat.accelerate_shared_state("GradientState")
    if not shared:
        return None
    return bool(shared.get("sync_gradients", True))


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None or isinstance(tensor, ConsumedGrad) else tensor.numel() * tensor.element_size()


class GradientStream:
    """The candidates' gradients of one step fed to its streaming draw, as the backward (or the step) completes them."""

    def __init__(self, candidates: list[Candidate]):
        self.candidates = candidates
        self.stream: StreamingDraw | None = None
        self.nonfinite: list[str] = []  # candidates whose gradient was not finite in this step
        self.peak_grad_bytes = 0  # most bytes of candidate gradients held at once in the latest step

    # -- one step --------------------------------------------------------------------------------------------------
    def consume(self, position: int, param: torch.Tensor, means, make_stream) -> None:
        """Feed a complete gradient to the step's draw and free it."""
        grad = param.grad
        if grad is None or isinstance(grad, ConsumedGrad):
            return
        if self.stream is None:
            self.stream = make_stream()
        norm = torch.linalg.vector_norm(grad)
        finite = bool(torch.isfinite(norm)) and finite_means(means)
        # This gradient, plus the small ones waiting in the stream for their pack.
        self.peak_grad_bytes = max(self.peak_grad_bytes, _bytes(grad) + self.stream.pending_bytes())
        if finite:
            self._add(position, grad, means)
        else:
            self.nonfinite.append(self.candidates[position].name)
        param.grad = ConsumedGrad(grad, norm, finite)

    def _add(self, position: int, grad: torch.Tensor, means) -> None:
        """A complete gradient to the draw: a quantized weight's a tile of rows at a time, with θ from its overlay."""
        overlay = self.candidates[position].overlay
        if overlay is None:
            self.stream.add(position, grad, means)
            return
        for first, last, theta in overlay.tiles(self.stream.chunk_entries):
            self.stream.add(position, grad[first:last], means, theta, first)

    def consume_tiles(self, position: int, inputs: torch.Tensor, grads: torch.Tensor, means, make_stream):
        """Feed a quantized weight's gradient to the step's draw a tile of rows at a time, each tile computed from its
        layer's inputs and output gradients (tokens first) and freed before the next; its `ConsumedGrad`."""
        candidate = self.candidates[position]
        if self.stream is None:
            self.stream = make_stream()
        finite, squares = finite_means(means), torch.zeros((), dtype=torch.float64, device=inputs.device)
        for first, last, theta in candidate.overlay.tiles(self.stream.chunk_entries):
            grad = grads[:, first:last].t() @ inputs
            norm = torch.linalg.vector_norm(grad)
            squares += norm.double().square()
            self.peak_grad_bytes = max(self.peak_grad_bytes, 2 * _bytes(grad) + self.stream.pending_bytes())
            finite = finite and bool(torch.isfinite(norm))
            if finite:
                self.stream.add(position, grad, means, theta, first)
        if not finite:
            self.nonfinite.append(candidate.name)
        return ConsumedGrad(candidate.param, squares.sqrt().float(), finite)

    def take_values(self, values: dict[int, torch.Tensor], make_stream) -> None:
        """Gradient values at a reused mask's entries, computed by the sparse backward (`sparse_backward`)."""
        for position, part in values.items():
            if self.stream is None:
                self.stream = make_stream()
            if not bool(torch.isfinite(part).all()):
                self.nonfinite.append(self.candidates[position].name)
                continue
            self.stream.add_values(position, part)

    def consume_dense(self, order: list[int], means_of, make_stream) -> None:
        """At the optimizer step: the candidates whose gradient is still dense join the draw, in `order` (every
        candidate: those whose gradients completed, in that order, then the others)."""
        held = sum(_bytes(c.param.grad) for c in self.candidates)
        self.peak_grad_bytes = max(self.peak_grad_bytes, held)
        for position in order:
            candidate = self.candidates[position]
            grad = candidate.param.grad
            if grad is None or isinstance(grad, ConsumedGrad):
                continue
            if self.stream is None:
                self.stream = make_stream()
            means = means_of(candidate)
            if not bool(torch.isfinite(torch.linalg.vector_norm(grad))) or not finite_means(means):
                self.nonfinite.append(candidate.name)
                continue
            self._add(position, grad, means)

    def finish(self, make_stream):
        """Drawn indices, gradient values (None: no gradient this step) and clip/unscale factors, per candidate."""
        stream = self.stream if self.stream is not None else make_stream()
        drawn, values = stream.finish()
        factors = [factor_of(c.param.grad) for c in self.candidates]
        return drawn, values, factors

    def reset(self) -> None:
        """Forget the step (after it ran, or when it was abandoned)."""
        self.stream = None
        self.nonfinite = []
        self.peak_grad_bytes = 0

    def clear_gradients(self) -> None:
        """Drop the consumed-gradient placeholders of an abandoned step."""
        for candidate in self.candidates:
            if isinstance(candidate.param.grad, ConsumedGrad):
                candidate.param.grad = None


def state_bytes(optimizer: torch.optim.Optimizer | None, candidates: list[Candidate], state_key: str) -> int:
    """Bytes of optimizer state held for `candidates`: the sparse state plus any dense state of the optimizer."""
    if optimizer is None:
        return 0
    total = 0
    sparse = optimizer.state.get(state_key, {}).get("tensors", {}) if state_key in optimizer.state else {}
    total += sparse_optim.state_bytes(sparse)
    for candidate in candidates:
        for value in optimizer.state.get(candidate.param, {}).values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
