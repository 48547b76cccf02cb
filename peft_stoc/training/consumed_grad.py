"""`ConsumedGrad`: what `param.grad` holds for a candidate whose gradient was consumed during the backward.

In memory-lean training a candidate's gradient is taken by the streaming draw as soon as it is complete and then
freed. Gradient clipping and loss scaling still have to see it: `clip_grad_norm_` sums the norms of every `.grad`,
then multiplies each by the clipping coefficient; `GradScaler.unscale_` checks every `.grad` for inf/NaN and
multiplies it by 1/scale. A `ConsumedGrad` is a tensor of the gradient's shape and dtype that holds no data, only
the gradient's 2-norm, whether it was finite, and a factor: it answers those operations from its figures and
records the factors, which StocTuning applies to the drawn entries' gradients at the optimizer step. Any other use
raises with a clear message instead of returning something wrong.
"""

from __future__ import annotations

import torch

from .. import compat

aten = torch.ops.aten

LEAN_HINT = (
    "StocTuning (memory='lean') consumed this gradient during the backward to save memory: only its norm, "
    "clipping and loss scaling are available until the optimizer step. Use StocTuningConfig(memory='dense') to keep "
    "dense gradients on the base parameters."
)


class ConsumedGrad(torch.Tensor):
    """A gradient consumed by the streaming draw: its 2-norm, finiteness and the factors applied to it since."""

    norm: torch.Tensor
    finite: bool
    factor: torch.Tensor | float
    zeroed: bool
    sparse: bool  # the masked entries' sums of a step that reuses its mask, kept over micro-batches (sparse_backward)

    @staticmethod
    def __new__(cls, like: torch.Tensor, norm: torch.Tensor, finite: bool):
        self = compat.make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)
        self.norm = norm.detach().float()
        self.finite = finite
        self.factor = 1.0
        self.zeroed = False
        self.sparse = False
        return self

    def __repr__(self) -> str:
        return f"ConsumedGrad(shape={tuple(self.shape)}, norm={float(self.norm):.4g}, finite={self.finite})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise RuntimeError(f"`{func}` on a consumed gradient. {LEAN_HINT}")
        return handler(func, *args, **kwargs)


def _vector_norm(func, grad: ConsumedGrad, ord=2, dim=None, keepdim=False, dtype=None):
    if dim is not None or float(ord) != 2.0:
        raise RuntimeError(f"Only the 2-norm of a whole consumed gradient is known (asked: ord={ord}). {LEAN_HINT}")
    norm = grad.norm * (grad.factor.abs() if isinstance(grad.factor, torch.Tensor) else abs(grad.factor))
    return norm.to(dtype or grad.dtype)


def _scale(func, grad: ConsumedGrad, other):
    grad.factor = grad.factor * (other.detach().float() if isinstance(other, torch.Tensor) else float(other))
    return grad


def _foreach_scale(func, grads, other):
    _plain_part(func, grads, other)
    for grad in grads:
        if isinstance(grad, ConsumedGrad):
            _scale(func, grad, other)


def _plain_part(func, grads, *args):
    """Run a foreach kernel on the real gradients of a list that mixes them with consumed ones."""
    plain = [g for g in grads if not isinstance(g, ConsumedGrad)]
    if plain:
        func(plain, *args)


def _unscale_and_check(func, grads, found_inf: torch.Tensor, inv_scale: torch.Tensor):
    """GradScaler's check: plain gradients go to the real kernel; consumed ones report their finiteness."""
    _plain_part(func, grads, found_inf, inv_scale)
    for grad in grads:
        if isinstance(grad, ConsumedGrad):
            if not grad.finite:
                found_inf.fill_(1.0)
            _scale(func, grad, inv_scale)


def _zero(func, grad: ConsumedGrad):
    """`zero_grad(set_to_none=False)`: the step was abandoned (e.g. skipped by a gradient scaler)."""
    grad.zeroed = True
    return grad


def _foreach_zero(func, grads):
    _plain_part(func, grads)
    for grad in grads:
        if isinstance(grad, ConsumedGrad):
            _zero(func, grad)


def _same(func, grad: ConsumedGrad, *args, **kwargs):
    return grad


def _refuse_accumulation(func, *args, **kwargs):
    raise RuntimeError(accumulation_error())


def accumulation_error() -> str:
    """The one message for a second micro-batch of a plain loop after the first's gradients were consumed."""
    return (
        "StocTuning: a second micro-batch before `optimizer.step()`, after the first backward's candidate gradients "
        "were consumed by the draw (memory='auto' and 'lean' free them during the backward, from the first step on). "
        "The draw needs the summed gradient of every micro-batch, so nothing was changed: no weight and no optimizer "
        "state. Gradient accumulation is recognised by itself under transformers Trainer, TRL, accelerate's "
        "`accumulate()` and DDP; in a plain loop, add one line: run each micro-batch that is not the last of its step "
        "under `with model.base_model.stoc_accumulating():` (or use StocTuningConfig(memory='dense'))."
    )


_FOREACH = compat.foreach_grad_ops()
_HANDLERS = {
    aten.linalg_vector_norm.default: _vector_norm,
    aten.mul_.Tensor: _scale,
    aten.mul_.Scalar: _scale,
    _FOREACH.mul_scalar: _foreach_scale,
    _FOREACH.mul_tensor: _foreach_scale,
    _FOREACH.non_finite_check_and_unscale: _unscale_and_check,
    aten.zero_.default: _zero,
    _FOREACH.zero: _foreach_zero,
    aten.detach.default: _same,
    aten.detach_.default: _same,
    aten.alias.default: _same,
    aten.add_.Tensor: _refuse_accumulation,
    aten.add.Tensor: _refuse_accumulation,
    aten.copy_.default: _refuse_accumulation,
}


def factor_of(grad) -> torch.Tensor | float:
    """The factor to apply to a gradient's drawn values: 1 for a real gradient (clipped in place already)."""
    return grad.factor if isinstance(grad, ConsumedGrad) else 1.0
