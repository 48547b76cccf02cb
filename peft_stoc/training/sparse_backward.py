"""The backward of a step that reuses its mask (`mask_interval > 1`): the masked entries' gradients only.

Between draws the mask is fixed, and every update rule needs the gradient of the masked entries alone. On such a
step a candidate weight used by a Linear, Conv1D or Embedding forward is read there through a detached alias, so
autograd computes no weight-gradient product for it and saves no input for one. A tap on the layer's output computes,
in its backward, the masked entries' gradient from the layer's output gradient δ:

* Linear (out × in): Σ_t δ[t, i] · x[t, j] for each masked (i, j) — dot products of length T over the input columns
  the mask touches, which the tap keeps instead of the whole input when they are fewer than half of it;
* Conv1D (in × out, transformers' GPT-2): Σ_t x[t, i] · δ[t, j];
* Embedding (rows × dim): Σ over the tokens t that gathered row r of δ[t, c] (the padding row gets none).

Memory-lean training in one process keeps these as sparse sums (`SparseBackward.sums`, summed over the weight's uses
and over micro-batches) and gives the weight a `ConsumedGrad` with their norm, so clipping and loss scaling see
exactly the gradients that exist. Elsewhere (memory="dense", data parallelism) the tap returns them scattered into a
dense gradient: the optimizer or DDP needs one there, but no product is computed for it.

A weight is tapped only where every use is such a forward (a head that TRL reads around its module, a parameter used
outside its module, or an FSDP2 shard keeps the dense backward), as the step that drew the mask found.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import compat
from ..sampling.one_thread import on_one_thread
from ..tuner.candidates import Candidate, UseKind
from .consumed_grad import ConsumedGrad

_TAPPED_KINDS = (UseKind.LINEAR_INPUT, UseKind.CONV1D_INPUT, UseKind.EMBEDDING_ROW)
_GATHERED = 1 << 19  # elements of the output gradient gathered at a time (2 MiB in float32)


def tappable(candidate: Candidate) -> bool:
    """Whether every use of `candidate` is a forward whose weight gradient a tap can take over."""
    if candidate.overlay is not None or not candidate.uses:
        return False
    for use in candidate.uses:
        module = use.module
        if use.kind not in _TAPPED_KINDS or not use.traced:
            return False
        if compat.module_parameters(module).get("weight") is not candidate.param:
            return False
        if _plain(module) is None:  # a subclass with its own forward may use its weight otherwise
            return False
        if isinstance(module, nn.Embedding) and (module.sparse or module.scale_grad_by_freq or module.max_norm):
            return False
    return True


def _plain(module: nn.Module):
    """The library class whose forward `module` uses (nn.Linear, nn.Embedding or transformers' Conv1D), or None."""
    from transformers.pytorch_utils import Conv1D

    for kind in (nn.Linear, nn.Embedding, Conv1D):
        if isinstance(module, kind) and type(module).forward is kind.forward:
            return kind
    return None


@dataclass
class _Plan:
    """Where the masked entries of one weight sit, for one kind of use."""

    kind: UseKind
    index: torch.Tensor  # sorted flat indices of the masked entries
    first: torch.Tensor  # per entry: the output feature (Linear), input feature (Conv1D) or row (Embedding)
    second: torch.Tensor  # per entry: the input feature (Linear), output feature (Conv1D) or column (Embedding)
    columns: torch.Tensor | None = None  # Linear / Conv1D: the input features the mask touches
    slot: torch.Tensor | None = None  # per entry: where its input feature sits among `columns`
    keep_columns: bool = False  # keep only those input columns for the backward (fewer than half)
    shape: tuple[int, ...] = ()  # the weight's
    _derived: dict = dataclasses.field(default_factory=dict, repr=False)  # computed once per mask, see below

    def on_whole_inputs(self) -> _Plan:
        """The plan for a backward that has the layer's whole input (a quantized weight's overlay keeps it)."""
        if "whole" not in self._derived:
            self._derived["whole"] = dataclasses.replace(self, keep_columns=False, _derived={})
        return self._derived["whole"]

    def sampling(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows of the sampled product the mask touches, and the product's CSR pattern over them): the product
        δᵀx (Linear) or xᵀδ (Conv1D) sampled at the masked entries, whose sorted flat indices are sorted (row,
        column) pairs of it. The same for every step that reuses the mask."""
        if "sampling" not in self._derived:
            inputs_at = self.slot if self.keep_columns else self.columns.index_select(0, self.slot)
            rows, cols = (self.first, inputs_at) if self.kind is UseKind.LINEAR_INPUT else (inputs_at, self.second)
            touched, rows = torch.unique_consecutive(rows, return_inverse=True)
            crow = torch.zeros(touched.numel() + 1, dtype=torch.int64, device=rows.device)
            crow[1:] = torch.bincount(rows, minlength=touched.numel()).cumsum(0)
            # The product's columns: the kept input features or all of them (Linear), the output features (Conv1D).
            keeps = self.kind is UseKind.LINEAR_INPUT and self.keep_columns
            width = self.columns.numel() if keeps else self.shape[1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (sparse CSR support's notice that it is in beta)
                zeros = torch.zeros(cols.numel(), device=cols.device)
                pattern = torch.sparse_csr_tensor(crow, cols, zeros, (touched.numel(), width))
            self._derived["sampling"] = (touched, pattern)
        return self._derived["sampling"]


def _plan(kind: UseKind, index: torch.Tensor, shape: torch.Size) -> _Plan:
    width = shape[1]
    first, second = index // width, index % width
    if kind is UseKind.EMBEDDING_ROW:
        return _Plan(kind, index, first, second)
    inputs = second if kind is UseKind.LINEAR_INPUT else first
    columns = torch.unique(inputs)
    size = shape[1] if kind is UseKind.LINEAR_INPUT else shape[0]
    slot = torch.searchsorted(columns, inputs)
    keep = columns.numel() * 2 < size
    return _Plan(kind, index, first, second, columns, slot, keep_columns=keep, shape=tuple(shape))


class SparseBackward:
    """The taps of one step engine: installed on the candidates' modules, active on the steps that reuse a mask."""

    def __init__(self, candidates: list[Candidate]):
        self.candidates = candidates
        self.active = False  # this step reuses its mask: tapped weights get the sparse backward
        self.sparse_sums = True  # False: the tap returns a dense gradient (memory="dense", data parallelism)
        self.sums: dict[int, torch.Tensor] = {}  # position -> the masked gradient values summed so far this step
        self.check = None  # the weight guard's: raises when the weights show something else than at the forward
        self.on_delivered = None  # the engine's: (position) -> None, once a tapped weight's gradient is in `sums`
        self._tapped: set[int] = set()
        self._plans: dict[tuple[int, UseKind], _Plan] = {}
        self._mask: list[torch.Tensor] | None = None
        self._hooks: list = []

    # -- set up ----------------------------------------------------------------------------------------------------
    def install(self, followed: list[bool]) -> None:
        """Tap the candidates whose every use a tap can take over and which the latest draw found followed."""
        tapped = {p for p, c in enumerate(self.candidates) if followed[p] and tappable(c)}
        if tapped == self._tapped and self._hooks:
            return
        self.remove()
        self._tapped = tapped
        self.attach()

    def attach(self) -> None:
        """Hook the tapped candidates' modules (again, after the engine paused)."""
        if self._hooks:
            return
        for position in sorted(self._tapped):
            for use in self.candidates[position].uses:
                module = use.module
                self._hooks.append(module.register_forward_pre_hook(self._pre_hook(position)))
                self._hooks.append(module.register_forward_hook(self._post_hook(position, use.kind), always_call=True))

    def detach(self) -> None:
        """Unhook the modules; the tapped candidates are kept for `attach`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.active = False

    def remove(self) -> None:
        """Unhook the modules and forget which candidates were tapped (the dense backward until the next draw)."""
        self.detach()
        self._tapped = set()

    def begin(self, mask: list[torch.Tensor]) -> None:
        """The mask the coming steps reuse (each step's draw hands over the same index tensors in a new list: the
        plans stay while those tensors do)."""
        same = self._mask is not None and len(mask) == len(self._mask) and all(a is b for a, b in zip(mask, self._mask))
        if not same:
            self._mask = mask
            self._plans.clear()

    def reset(self) -> None:
        self.sums.clear()

    @property
    def tapped(self) -> set[int]:
        return self._tapped

    # -- the forward -------------------------------------------------------------------------------------------
    def _pre_hook(self, position: int):
        param = self.candidates[position].param

        def swap(module, args):
            # (torch.compile traces the module with its registered weight: a compiled model keeps the dense backward)
            if self.active and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                # the weight read through a detached alias: no weight-gradient product, no input kept for one
                compat.module_parameters(module)["weight"] = param.detach()

        return swap

    def _post_hook(self, position: int, kind: UseKind):
        param = self.candidates[position].param

        def tap(module, args, output):
            registered = compat.module_parameters(module)
            if registered["weight"] is param:
                return None
            registered["weight"] = param
            if not isinstance(output, torch.Tensor) or not args:
                return None
            plan = self.plan_for(position, kind)
            kept = args[0]
            if plan.kind is not UseKind.EMBEDDING_ROW and plan.keep_columns:
                kept = kept.index_select(-1, plan.columns)
            return _Tap.apply(output, kept, param, (self, position, plan, module))

        return tap

    def plan_for(self, position: int, kind: UseKind) -> _Plan:
        key = (position, kind)
        if key not in self._plans:
            param = self.candidates[position].param
            self._plans[key] = _plan(kind, self._mask[position].to(param.device), param.shape)
        return self._plans[key]

    # -- the backward ------------------------------------------------------------------------------------------
    @on_one_thread
    def deliver(self, position: int, values: torch.Tensor, param: nn.Parameter) -> torch.Tensor | None:
        """The masked gradient of one use: summed here (and a `ConsumedGrad` on the weight), or as a dense gradient."""
        if self.check is not None:
            self.check()
        if not self.sparse_sums:
            grad = torch.zeros_like(param)
            grad.view(-1).index_add_(0, self._mask[position].to(param.device), values.to(param.dtype))
            return grad
        total = self.sums.get(position)
        total = values if total is None else total + values
        self.sums[position] = total
        existing = param.grad
        if existing is not None and not isinstance(existing, ConsumedGrad):
            existing.view(-1).index_add_(0, self._mask[position].to(existing.device), values.to(existing.dtype))
            del self.sums[position]  # the weight has a dense gradient from another path: the values went into it
            return None
        norm = torch.linalg.vector_norm(total)
        consumed = ConsumedGrad(param, norm, math.isfinite(norm.item()))
        consumed.sparse = True
        if isinstance(existing, ConsumedGrad):
            consumed.factor = existing.factor
        param.grad = consumed
        self.on_delivered(position)
        return None


@on_one_thread
def masked_values(plan: _Plan, kept: torch.Tensor, grad: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The gradient of the masked entries (float32) of one use, from its kept input and its output gradient."""
    if plan.index.numel() == 0:
        return torch.zeros(0, device=grad.device)
    if plan.kind is UseKind.EMBEDDING_ROW:
        return _embedding_values(plan, kept, grad, module)
    inputs, deltas = kept.reshape(-1, kept.shape[-1]), grad.reshape(-1, grad.shape[-1])
    gathered, other = (deltas, inputs) if plan.kind is UseKind.LINEAR_INPUT else (inputs, deltas)
    touched, pattern = plan.sampling()
    # The sampled product (SDDMM) over the rows the mask touches, gathered into a contiguous block. A tall head's
    # rows are far apart in the output gradient: they are gathered a few tokens at a time, which reads each token's
    # row once and keeps the block in cache (a fresh block of the whole would cost more in page faults than in
    # arithmetic).
    tokens = max(1, _GATHERED // max(1, touched.numel()))
    values = None
    for start in range(0, max(1, gathered.shape[0]), tokens):
        block = gathered[start : start + tokens]
        if touched.numel() < block.shape[1]:
            block = block.index_select(1, touched)
        block, right = block.t().contiguous().float(), other[start : start + tokens].float()
        part = torch.sparse.sampled_addmm(pattern, block, right).values()
        values = part if values is None else values.add_(part)
    return values


def _embedding_values(plan: _Plan, ids: torch.Tensor, grad: torch.Tensor, module: nn.Module) -> torch.Tensor:
    ids = ids.reshape(-1)
    deltas = grad.reshape(ids.numel(), -1).float()
    if module.padding_idx is not None:  # the padding row receives no gradient, as in F.embedding's backward
        keep = ids != module.padding_idx
        ids, deltas = ids[keep], deltas[keep]
    rows, inverse = torch.unique(ids, return_inverse=True)
    summed = torch.zeros(rows.numel(), deltas.shape[1], device=deltas.device).index_add_(0, inverse, deltas)
    if rows.numel() == 0:
        return torch.zeros(plan.index.numel(), device=grad.device)
    at = torch.searchsorted(rows, plan.first).clamp_(max=rows.numel() - 1)
    hit = rows.index_select(0, at) == plan.first
    return torch.where(hit, summed[at, plan.second], 0.0)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output; its backward computes the masked entries' gradient of the layer's weight."""

    @staticmethod
    def forward(ctx, output, kept, param, state):
        ctx.state = state
        ctx.save_for_backward(kept)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        taps, position, plan, module = ctx.state
        values = masked_values(plan, kept, grad, module)
        return grad, None, taps.deliver(position, values, taps.candidates[position].param), None
