"""Confining an optimizer step to the drawn entries.

Masking gradients alone does not confine an update: weight decay moves every entry, and momentum keeps moving
entries drawn at earlier steps. Before the optimizer runs, `confine` therefore

* zeroes every candidate gradient outside the draw,
* switches the optimizer's own weight decay off for the step and applies the same decay to the drawn entries
  (and, unchanged, to parameters that are not candidates, such as a task head in the same group),

and under the ``strict`` rule `StrictGuard` puts back every previously changed entry that was not drawn now.
"""

from __future__ import annotations

import torch

# Optimizers whose weight decay is added to the gradient (L2) unless their group says it is decoupled.
_COUPLED_DECAY = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta")
    if hasattr(torch.optim, name)
)


def decay_is_decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """True for AdamW-style decay (θ ← θ·(1 - lr·wd)), False for L2 decay added to the gradient.

    Raises for optimizers whose decay StocTuning does not know how to confine.
    """
    if group.get("decoupled_weight_decay", False) or isinstance(optimizer, torch.optim.AdamW):
        return True
    if isinstance(optimizer, _COUPLED_DECAY):
        return False
    raise ValueError(
        f"StocTuning cannot confine the weight decay of {type(optimizer).__name__} to the drawn entries. "
        "Set weight_decay=0 for the groups holding base parameters, or use a torch.optim optimizer "
        "(SGD, Adam, AdamW, ...)."
    )


def mask_gradient(param: torch.Tensor, drawn: torch.Tensor) -> None:
    """Zero `param.grad` everywhere except at the flat indices `drawn`."""
    grad = param.grad
    if grad is None:
        return
    if grad.is_sparse:
        raise ValueError("StocTuning needs dense gradients; create embeddings with sparse=False.")
    flat = grad.view(-1)
    if drawn.numel() == 0:
        flat.zero_()
        return
    # index_select / index_copy_: advanced indexing is much slower on a busy CPU.
    kept = flat.index_select(0, drawn)
    flat.zero_()
    flat.index_copy_(0, drawn, kept)


class DecayRedirect:
    """Takes weight decay out of the optimizer's hands for one step and applies it only where allowed."""

    def __init__(self):
        self._suspended: dict[int, tuple[dict, float]] = {}

    def apply(self, optimizer: torch.optim.Optimizer, drawn: dict[int, torch.Tensor]) -> None:
        """`drawn` maps id(candidate parameter) to its drawn flat indices; other parameters decay as usual."""
        for group in optimizer.param_groups:
            held = self._suspended.get(id(group))
            decay = held[1] if held is not None else float(group.get("weight_decay", 0) or 0)
            if decay == 0:
                continue
            decoupled = decay_is_decoupled(optimizer, group)
            self._suspended[id(group)] = (group, decay)
            group["weight_decay"] = 0.0
            lr = float(group["lr"])
            sign = -1.0 if group.get("maximize", False) else 1.0
            # A fused optimizer stepped by GradScaler divides the still-scaled gradients by `grad_scale` itself:
            # L2 decay added to them now must be scaled up alike.
            grad_scale = getattr(optimizer, "grad_scale", None)
            if grad_scale is not None:
                sign *= float(grad_scale)
            with torch.no_grad():
                for param in group["params"]:
                    if param.grad is None:
                        continue  # torch optimizers skip such parameters entirely, decay included
                    index = drawn.get(id(param))
                    if decoupled:
                        _scale(param, 1.0 - lr * decay, index)
                    else:
                        _add_to_grad(param, sign * decay, index)

    def restore(self) -> None:
        """Give each group its weight decay back."""
        for group, decay in self._suspended.values():
            group["weight_decay"] = decay
        self._suspended.clear()


def _scale(param: torch.Tensor, factor: float, index: torch.Tensor | None) -> None:
    if index is None:
        param.mul_(factor)
    elif index.numel():
        flat = param.view(-1)
        flat.index_copy_(0, index, flat.index_select(0, index) * factor)


def _add_to_grad(param: torch.Tensor, alpha: float, index: torch.Tensor | None) -> None:
    if index is None:
        param.grad.add_(param, alpha=alpha)
    elif index.numel():
        grad = param.grad.view(-1)
        grad.index_add_(0, index, param.detach().view(-1).index_select(0, index).to(grad.dtype), alpha=alpha)


class StrictGuard:
    """Under the strict rule: remember the changed-but-not-drawn entries before a step, put them back after."""

    def __init__(self):
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def save(self, param: torch.Tensor, changed: torch.Tensor, drawn: torch.Tensor) -> None:
        if changed.numel() == 0:
            return
        keep = changed[~torch.isin(changed, drawn)]
        if keep.numel():
            self._saved.append((param, keep, param.detach().view(-1)[keep].clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for param, index, values in self._saved:
                param.view(-1)[index] = values
        self._saved.clear()
