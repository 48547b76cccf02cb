"""The optimizer's arithmetic on the entries that need it: SGD, Adam and AdamW over a sparse support.

In memory-lean training the user's optimizer never sees a candidate's gradient (it holds dense state only for the
task head and other non-candidates). StocTuning applies the update to candidates itself, with the hyperparameters of
the optimizer's param group at that step, exactly as `torch.optim` would on the masked gradient:

* the support of a tensor is every entry with non-zero optimizer state — under the paper's ``masked_grad`` rule an
  entry drawn once keeps moving on its momentum, so the support is the set of entries drawn so far and the state
  costs memory ∝ changed entries, never ∝ the model;
* entries outside the support have zero gradient and zero state: torch's update leaves them exactly as they are;
* weight decay touches the drawn entries only (as in dense mode);
* Adam's bias correction uses the tensor's step count, as torch does (one count per tensor, advanced at every step
  in which the tensor has a gradient);
* bf16/fp16 parameters keep float32 master values for their support, so updates below the parameter's resolution
  accumulate instead of vanishing.

The functions are pure arithmetic on a state dict of tensors, which the lean strategy keeps in `optimizer.state`.
"""

from __future__ import annotations

import torch

from .. import compat
from ..distributed import shards
from .unchanged import Unchanged

SUPPORTED = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def kind_of(optimizer: torch.optim.Optimizer) -> str | None:
    """'sgd' or 'adam' for the optimizers whose arithmetic StocTuning reproduces, else None. torch's
    ZeroRedundancyOptimizer counts as the optimizer it shards (StocTuning updates the candidates on every rank)."""
    kind = SUPPORTED.get(type(optimizer))
    if kind is None and type(optimizer).__name__ == "ZeroRedundancyOptimizer":
        kind = SUPPORTED.get(compat.zero_optimizer_class(optimizer))
    return kind


def needs_support(kind: str, group: dict, param: torch.Tensor) -> bool:
    """Whether entries keep state between steps (momentum, moments or float32 masters)."""
    return kind == "adam" or bool(group.get("momentum", 0)) or param.dtype in LOW_PRECISION


def _union(support: torch.Tensor, drawn: torch.Tensor):
    """The sorted union of two sorted index sets, and where each set's entries sit in it."""
    if support.numel() == 0:
        return drawn, support, torch.arange(drawn.numel(), device=drawn.device)
    slot = torch.searchsorted(support, drawn)
    known = support.index_select(0, slot.clamp(max=support.numel() - 1)) == drawn
    new = drawn.masked_select(~known)
    if new.numel() == 0:
        return support, torch.arange(support.numel(), device=support.device), slot
    at = torch.searchsorted(support, new) + torch.arange(new.numel(), device=new.device)
    taken = torch.zeros(support.numel() + new.numel(), dtype=torch.bool, device=support.device)
    taken.index_fill_(0, at, True)
    union = torch.empty(taken.numel(), dtype=support.dtype, device=support.device)
    union.index_copy_(0, at, new).masked_scatter_(~taken, support)
    return union, (~taken).nonzero().squeeze(1), torch.searchsorted(union, drawn)


# Indices drawn again into the support they were merged into last time (a mask reused between draws): the support
# stays as it is, and where they sit in it is known. By the drawn tensor's id while it lives: (the drawn tensor, the
# support, both `Unchanged`; the positions of the drawn indices in the support).
_KNOWN_UNIONS: dict[int, tuple] = {}
SAME = slice(None)  # `old_at` of a support that did not grow: every entry keeps its place


def _union_of(support: torch.Tensor, drawn: torch.Tensor):
    """`_union`, answered without a search for indices merged into this very support before."""
    known = _KNOWN_UNIONS.get(id(drawn))
    if known is not None and known[0].holds(drawn) and known[1].holds(support):
        return support, SAME, known[2]
    union, old_at, drawn_at = _union(support, drawn)
    key = id(drawn)
    forget = Unchanged(drawn, on_free=lambda _, key=key: _KNOWN_UNIONS.pop(key, None))
    _KNOWN_UNIONS[key] = (forget, Unchanged(union), drawn_at)
    return union, old_at, drawn_at


def _grown(values: torch.Tensor | None, size: int, old_positions, like: torch.Tensor) -> torch.Tensor:
    """`values` (aligned with the old support) placed in a zero vector aligned with the grown support (`values`
    themselves where the support stayed the same)."""
    if old_positions is SAME and values is not None:
        return values
    out = torch.zeros(size, dtype=torch.float32, device=like.device)
    if values is not None and values.numel():
        out.index_copy_(0, old_positions, values)
    return out


def sparse_step(
    param: torch.Tensor,
    state: dict,
    drawn: torch.Tensor,
    grad: torch.Tensor,
    group: dict,
    kind: str,
    rule: str,
) -> None:
    """One optimizer step of `param` whose masked gradient is `grad` at the sorted flat indices `drawn` and zero
    elsewhere. `state` (this tensor's sparse state) is updated in place; so is `param`.

    `rule`: 'masked_grad' (every entry with state moves, as torch does on the masked gradient), 'strict' (only the
    drawn entries change; the state of the others still evolves, as in dense mode) or 'lazy' (only the drawn entries
    change, and only their state advances: moments and a per-entry step count for Adam's bias correction, as
    `torch.optim.SparseAdam` treats the entries a sparse gradient leaves out)."""
    strict = rule == "strict"
    flat = shards.local_entries(param)[0]  # a flat view (a quantized weight's: its overlay)
    drawn = drawn.to(flat.device)
    grad = grad.to(device=flat.device, dtype=torch.float32)
    keep_support = needs_support(kind, group, param)
    old = state.get("index")
    if keep_support and old is not None:
        support, old_at, drawn_at = _union_of(old, drawn)
    else:
        support, old_at, drawn_at = drawn, None, torch.arange(drawn.numel(), device=drawn.device)
    size = support.numel()
    master = _master(state, flat, support, old_at) if param.dtype in LOW_PRECISION else None
    theta = master if master is not None else flat.index_select(0, support)
    g = torch.zeros(size, dtype=theta.dtype, device=flat.device).index_copy_(0, drawn_at, grad.to(theta.dtype))
    if group.get("maximize", False):
        g = -g
    lr = float(group["lr"])
    snapshot = theta.clone() if strict else None
    _weight_decay(kind, group, theta, g, drawn_at, lr)
    if rule == "lazy":
        _lazy(kind, theta, g, state, old_at, drawn_at, size, group, lr)
    elif kind == "adam":
        _adam(theta, g, state, old_at, size, group, lr)
    else:
        _sgd(theta, g, state, old_at, size, group, lr)
    if snapshot is not None:
        # Only this step's draw changes; the other supported entries keep their values (not their state).
        theta = snapshot.index_copy_(0, drawn_at, theta.index_select(0, drawn_at))
    if master is not None:
        state["master"] = theta
    flat.index_copy_(0, support, theta.to(flat.dtype))
    if keep_support:
        state["index"] = support


def _master(state: dict, flat: torch.Tensor, support: torch.Tensor, old_at: torch.Tensor | None) -> torch.Tensor:
    """The float32 master values of a low-precision tensor's support: kept ones where the support was, the
    parameter's value where entries enter it."""
    size = support.numel()
    master = _grown(state.get("master"), size, old_at, flat)
    if old_at is SAME and "master" in state:
        return master
    new = torch.ones(size, dtype=torch.bool, device=flat.device)
    if old_at is not None and old_at is not SAME:
        new.index_fill_(0, old_at, False)
    master.masked_scatter_(new, flat.index_select(0, support.masked_select(new)).float())
    return master


def _weight_decay(
    kind: str, group: dict, theta: torch.Tensor, g: torch.Tensor, drawn_at: torch.Tensor, lr: float
) -> None:
    """The group's weight decay on the drawn entries: decoupled (AdamW) on `theta`, else added to the gradient `g`."""
    decay = float(group.get("weight_decay", 0) or 0)
    if not decay:
        return
    drawn_theta = theta.index_select(0, drawn_at)
    if kind == "adam" and group.get("decoupled_weight_decay", False):
        theta.index_copy_(0, drawn_at, drawn_theta * (1 - lr * decay))
    else:
        g.index_copy_(0, drawn_at, g.index_select(0, drawn_at).add(drawn_theta, alpha=decay))


def _adam(theta, g, state, old_at, size, group, lr) -> None:
    """torch.optim.Adam/AdamW's single-tensor update on the support vectors, operation for operation."""
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    exp_avg = _grown(state.get("exp_avg"), size, old_at, theta)
    exp_avg_sq = _grown(state.get("exp_avg_sq"), size, old_at, theta)
    step = float(state.get("step", torch.zeros(())).item()) + 1.0
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if group.get("amsgrad", False):
        max_exp_avg_sq = _grown(state.get("max_exp_avg_sq"), size, old_at, theta)
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        state["max_exp_avg_sq"] = max_exp_avg_sq
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    theta.addcdiv_(exp_avg, denom, value=-step_size)
    state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
    state["step"] = torch.tensor(step)


def _sgd(theta, g, state, old_at, size, group, lr) -> None:
    """torch.optim.SGD's single-tensor update on the support vectors (momentum, dampening, nesterov)."""
    momentum = float(group.get("momentum", 0) or 0)
    if momentum:
        dampening = float(group.get("dampening", 0) or 0)
        if "momentum_buffer" not in state:
            buffer = g.clone()  # torch starts the buffer from the first gradient, without dampening
        else:
            buffer = _grown(state["momentum_buffer"], size, old_at, theta)
            buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        state["momentum_buffer"] = buffer
        g = g.add(buffer, alpha=momentum) if group.get("nesterov", False) else buffer
    theta.add_(g, alpha=-lr)
    state["step"] = torch.tensor(float(state.get("step", torch.zeros(())).item()) + 1.0)


def _lazy(kind, theta, g, state, old_at, drawn_at, size, group, lr) -> None:
    """The update of the drawn entries alone; the other entries and their state stay as they are."""
    steps = _grown(state.get("entry_step"), size, old_at, theta)
    step = steps.index_select(0, drawn_at) + 1.0
    values, grad = theta.index_select(0, drawn_at), g.index_select(0, drawn_at)
    if kind == "adam":
        beta1, beta2 = (float(b) for b in group["betas"])
        exp_avg = _grown(state.get("exp_avg"), size, old_at, theta)
        exp_avg_sq = _grown(state.get("exp_avg_sq"), size, old_at, theta)
        m = exp_avg.index_select(0, drawn_at).lerp_(grad, 1 - beta1)
        v = exp_avg_sq.index_select(0, drawn_at).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt_()
        if group.get("amsgrad", False):
            max_exp_avg_sq = _grown(state.get("max_exp_avg_sq"), size, old_at, theta)
            peak = torch.maximum(max_exp_avg_sq.index_select(0, drawn_at), v)
            state["max_exp_avg_sq"] = max_exp_avg_sq.index_copy_(0, drawn_at, peak)
            denom = (peak.sqrt() / bias_correction2_sqrt).add_(float(group["eps"]))
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(float(group["eps"]))
        values.sub_(m / bias_correction1 * lr / denom)
        state["exp_avg"] = exp_avg.index_copy_(0, drawn_at, m)
        state["exp_avg_sq"] = exp_avg_sq.index_copy_(0, drawn_at, v)
    else:
        momentum = float(group.get("momentum", 0) or 0)
        if momentum:
            dampening = float(group.get("dampening", 0) or 0)
            buffer = _grown(state.get("momentum_buffer"), size, old_at, theta)
            old = buffer.index_select(0, drawn_at)
            # An entry's buffer starts from its first gradient, as torch starts a tensor's.
            fresh = torch.where(step == 1.0, grad, old.mul(momentum).add_(grad, alpha=1 - dampening))
            state["momentum_buffer"] = buffer.index_copy_(0, drawn_at, fresh)
            grad = grad.add(fresh, alpha=momentum) if group.get("nesterov", False) else fresh
        values.add_(grad, alpha=-lr)
    theta.index_copy_(0, drawn_at, values)
    state["entry_step"] = steps.index_copy_(0, drawn_at, step)


def state_bytes(states: dict[str, dict]) -> int:
    """Bytes held by sparse optimizer states."""
    return sum(t.numel() * t.element_size() for s in states.values() for t in s.values() if torch.is_tensor(t))
