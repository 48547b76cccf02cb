"""Activation statistics μ: the mean value flowing through each candidate connection during one optimizer step.

Forward hooks sum, per module, the value entering each connection over the real (non-padding) tokens of every
micro-batch; `means()` turns the sums into μ when the optimizer steps, and `reset()` starts the next step. μ is
kept per input feature (or per vocabulary row), never at a weight's full size.

Which tokens are real comes from the padding mask of the token scope a module runs in (`token_masks`). A use of a
candidate the hooks cannot follow gets μ = 1, with one warning (`untraced_uses`).

A model whose forward projects its backbone's output through the output embedding's weight itself (TRL's fused LM
head, `fused_lm_head=True`) is followed there: μ of the head is the mean of the backbone's output over the positions
whose next-token label is not -100, the positions that reach the head.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..tuner.candidates import Candidate, UseKind, is_rms_norm
from . import opaque_hooks
from .row_gathers import RowGathers
from .token_masks import TokenMasks
from .token_scopes import fused_head
from .untraced_uses import UNTRACED_TYPES, UntracedUses, untraced_types, warn_once

# A factor of μ: a vector along one weight dimension, or None for the constant 1.
MeanFactor = tuple[torch.Tensor | None, int]


class _Sum:
    """Running sum of a per-feature statistic and the number of tokens it covers."""

    __slots__ = ("total", "tokens")

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.tokens = 0.0

    def add(self, total: torch.Tensor, tokens: float) -> None:
        total = total.detach().float()
        self.total = total if self.total is None else self.total + total
        self.tokens += float(tokens)


class ActivationTracker(TokenMasks, UntracedUses):
    """Forward hooks that accumulate μ for `candidates` while `armed`."""

    def __init__(self, root: nn.Module, candidates: list[Candidate], stat: str):
        self.root = root
        self.candidates = candidates
        self.stat = stat
        self.armed = False
        self._hooks = opaque_hooks.HookSet()
        self._training_forward = False  # the running forward records gradients
        self._init_token_masks(root)
        # Per-forward cache of sums by input tensor. The input is held weakly: a strong reference would keep every
        # layer's input alive until the forward ends, which activation checkpointing exists to avoid.
        self._seen: dict[tuple, tuple[weakref.ref, torch.Tensor, float]] = {}
        self._sums: dict[int, _Sum] = {}
        self._head_labels: tuple[torch.Tensor, bool] | None = None  # a fused-head forward's labels, and if shifted
        self._recorders: dict[int, RowGathers] = {}  # embedding modules running under a row recorder
        self._untraced: set[int] = set()  # embedding modules that ran this step without a row gather we can follow
        self._forwards = 0  # training forwards this step
        self._bypassed_now: set[int] | None = None  # parameters used around their modules (found at the first means())
        self._bypassed_heads: dict[int, set[int]] = {}  # tied tables by id -> head modules their weight was read around
        self._modules: dict[int, tuple[nn.Module, UseKind]] = {}
        for candidate in candidates:
            for use in candidate.uses:
                if use.kind is not UseKind.CONSTANT:
                    self._modules[id(use.module)] = (use.module, use.kind)
        warn_once(root, untraced_types(candidates), UNTRACED_TYPES)

    # -- hooks -------------------------------------------------------------------------------------------------
    # Each hook selects the tensors it reads (traceable code) and hands them to a body that keeps this tracker's
    # Python state; under torch.compile the bodies run through an opaque op (`opaque_hooks`).
    def attach(self) -> None:
        if self._hooks:
            return
        hooks = self._hooks
        hooks.before(self.root, functools.partial(self._on_root_start, self.root), self._scope_tensors)
        hooks.after(self.root, self._on_root_end, opaque_hooks.nothing, always_call=True)
        fused = fused_head(self.root)
        if fused is not None and id(fused[1]) in self._modules:
            backbone, head = fused
            hooks.before(self.root, self._on_head_labels, _fused_head_labels)  # after `_on_root_start`
            hooks.after(backbone, functools.partial(self._on_backbone_output, head), _output_tensor)
        for module in self._scope_arguments:
            if module is not self.root:
                hooks.before(module, functools.partial(self._enter_scope, module), self._scope_tensors)
                hooks.after(module, self._leave_scope, _output_tensor, always_call=True)
        for module, kind in self._modules.values():
            if kind is UseKind.EMBEDDING_ROW and type(module).forward is not nn.Embedding.forward:
                hooks.before(module, functools.partial(self._start_recording, module), opaque_hooks.nothing)
                hooks.after(
                    module,
                    functools.partial(self._on_recorded_embedding, module),
                    opaque_hooks.nothing,
                    always_call=True,
                )
            else:
                hooks.after(module, functools.partial(self._hook_for(kind), module), _first_input)

    def detach(self) -> None:
        self._hooks.remove()
        self._forget_forward()

    def _active(self) -> bool:
        # Grad mode is read when the model's forward starts (`_on_root_start`): the hooks below run under no_grad,
        # and a forward replayed by activation checkpointing during backward is outside the model's forward.
        return self.armed and self._training_forward

    def _on_root_start(self, module, mask, tokens):
        self._forget_forward()
        self._bypassed_now = None
        self._bypassed_heads.clear()
        self._training_forward = torch.is_grad_enabled()
        self._forwards += self._active()
        self._enter_scope(module, mask, tokens)

    def skip_forward(self) -> None:
        """The forward under way needs no statistics: its step reuses a mask drawn before (`mask_interval`)."""
        if self._training_forward:
            self._training_forward = False
            self._forwards -= 1

    def _on_root_end(self):
        self._forget_forward()

    def _forget_forward(self) -> None:
        self._training_forward = False
        self._scopes.clear()
        self._scope_outputs.clear()
        self._seen.clear()
        self._weights.clear()
        self._head_labels = None
        for recorder in self._recorders.values():
            recorder.__exit__(None, None, None)
        self._recorders.clear()

    def _hook_for(self, kind: UseKind):
        if kind is UseKind.EMBEDDING_ROW:
            return self._on_embedding
        if kind is UseKind.NORM_GAIN:
            return self._on_norm
        return self._on_linear

    # -- token scopes --------------------------------------------------------------------------------------------
    # -- statistics ----------------------------------------------------------------------------------------------
    def _accumulate(self, module: nn.Module, values: torch.Tensor, shared: bool = True) -> None:
        """Add the per-feature sum of `values` (..., features) over real tokens to `module`'s running sum.

        `shared`: `values` may be the input of other modules too (remember its sum for this forward)."""
        weights = self._token_weights(module, values.shape[:-1], self._mask_for(values), values.dtype, values.device)
        key = (id(values), None if weights is None else id(weights[0]))
        cached = self._seen.get(key) if shared else None
        if cached is not None and cached[0]() is values:
            total, tokens = cached[1], cached[2]
        else:
            total, tokens = self._weighted_sum(values, weights)
            if shared:  # q, k and v projections read the same tensor: sum it once per forward.
                self._seen[key] = (weakref.ref(values), total, tokens)
        self._sums.setdefault(id(module), _Sum()).add(total, tokens)

    def _weighted_sum(
        self, values: torch.Tensor, weights: tuple[torch.Tensor, float] | None
    ) -> tuple[torch.Tensor, float]:
        """The statistic of `values` (..., features) summed over tokens with `weights` (laid out as the tokens; None:
        every token counts), and the tokens it covers."""
        flat = values.reshape(-1, values.shape[-1])
        if self.stat == "abs_mean":
            flat = flat.abs()
        elif self.stat == "rms":
            flat = flat.square()
        if weights is None:
            return flat.sum(0, dtype=torch.float32), float(flat.shape[0])
        return (weights[0].reshape(-1) @ flat).float(), weights[1]

    def _count_rows(self, module: nn.Module, rows: torch.Tensor) -> None:
        """Add how many real tokens gathered each row of `module`'s table."""
        rows = rows.to(torch.long)
        found = self._token_weights(
            module, rows.shape, self._mask_for(rows), torch.float32, rows.device, broadcast=True
        )
        if found is None:
            flat, weights, tokens = rows.reshape(-1), None, float(rows.numel())
        else:
            # Rows gathered once for every sequence (positions of shape (1, seq)) stand for each row of the batch.
            weights, tokens = found
            flat, weights = rows.expand(weights.shape).reshape(-1), weights.reshape(-1)
        counts = torch.bincount(flat, weights=weights, minlength=module.num_embeddings).float()
        self._sums.setdefault(id(module), _Sum()).add(counts, tokens)

    # The statistics are not part of the model's computation: no_grad keeps them out of the autograd graph (and
    # out of what activation checkpointing records and replays).
    @torch.no_grad()
    def _on_linear(self, module, values):
        if self._active() and values is not None:
            self._accumulate(module, values)

    @torch.no_grad()
    def _on_norm(self, module, x):
        if not (self._active() and x is not None):
            return
        if is_rms_norm(module):
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or torch.finfo(x.dtype).eps
            xf = x.float()
            normalised = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        else:
            normalised = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
        self._accumulate(module, normalised, shared=False)  # a fresh tensor: keeping it would hold memory

    @torch.no_grad()
    def _on_embedding(self, module, ids):
        # nn.Embedding.forward passes its argument to F.embedding unchanged: it is exactly the rows gathered.
        if self._active() and ids is not None:
            self._count_rows(module, ids)

    def _on_head_labels(self, labels, shift_labels):
        # The root's forward with `fused_lm_head=True`: the positions its head projects are those whose next-token
        # label is not -100 (`shift_labels` are already next-token labels).
        if self._active() and (labels is not None or shift_labels is not None):
            self._head_labels = (labels, False) if shift_labels is None else (shift_labels, True)

    @torch.no_grad()
    def _on_backbone_output(self, head, hidden):
        found, self._head_labels = self._head_labels, None
        if found is None or hidden is None or not self._active():
            return
        labels, shifted = found
        if not shifted:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        if labels.dim() != 2 or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            self._untraced.add(id(head))  # projected in a way these labels do not describe: μ = 1, with a warning
            return
        weights = (labels != -100).to(device=hidden.device, dtype=hidden.dtype)
        total, tokens = self._weighted_sum(hidden, (weights, float(weights.sum())))
        self._sums.setdefault(id(head), _Sum()).add(total, tokens)

    def _start_recording(self, module):
        if torch.compiler.is_compiling() or not self._active() or id(module) in self._recorders:
            return  # a torch function mode cannot run inside a compiled graph: `_on_recorded_embedding` says so
        recorder = RowGathers(module.weight)
        recorder.__enter__()
        self._recorders[id(module)] = recorder

    @torch.no_grad()
    def _on_recorded_embedding(self, module):
        recorder = self._recorders.pop(id(module), None)
        if recorder is None:
            if self._active():
                self._untraced.add(id(module))  # under torch.compile: its rows could not be followed
            return
        recorder.__exit__(None, None, None)
        if not recorder.rows:
            self._untraced.add(id(module))
        for rows in recorder.rows:
            self._count_rows(module, rows)

    # -- results -----------------------------------------------------------------------------------------------
    def _mean(self, module: nn.Module, size: int, device) -> torch.Tensor:
        acc = self._sums.get(id(module))
        if acc is None or acc.total is None or acc.tokens == 0:
            return torch.zeros(size, device=device)
        mean = acc.total.to(device) / acc.tokens
        # A one-hot input is 0 or 1, so all three statistics are the share of tokens for 'mean'/'abs_mean'.
        if self.stat == "rms":
            mean = mean.clamp_min(0).sqrt()
        return mean

    def means(self, candidate: Candidate, rows: slice | None = None) -> list[MeanFactor]:
        """μ of `candidate` as factors to broadcast and add: [(vector, dim), ...], (None, 0) meaning 1.

        `rows`: the rows of the parameter this process holds (an FSDP2 shard): factors along dim 0 (embedding rows,
        norm gains, Conv1D inputs) are cut to them. A parameter whose use could not be followed gets μ = 1
        (importance |weight * gradient|), with one warning."""
        if id(candidate.param) in self._fallbacks():
            return [(None, 0)]
        factors: list[MeanFactor] = []
        param = candidate.param
        around = self._heads_read_around(candidate)
        for use in candidate.uses:
            if use.kind is UseKind.CONSTANT or id(use.module) in self._untraced or id(use.module) in around:
                factors.append((None, 0))
            else:
                mean = self._mean(use.module, param.shape[use.dim], param.device)
                factors.append((mean[rows] if rows is not None and use.dim == 0 else mean, use.dim))
        return factors

    def nonfinite_reason(self, names: list[str]) -> str:
        """Why the step of the candidates `names` cannot be drawn: the activations entering them (μ), their gradients,
        or both, each named as what it is, in the model's order (a non-finite activation spreads to every later
        layer: the first one named is where it entered)."""
        named = set(names)
        found = [c for c in self.candidates if c.name in named]  # in the model's order: the first use comes first
        activations = [c.name for c in found if not _finite_factors(self.means(c))]
        gradients = [c.name for c in found if not _finite_gradient(c.param.grad)]
        parts = []
        if activations:
            parts.append(f"the activations entering {', '.join(activations[:3])}")
        if gradients:
            parts.append(f"the gradients of {', '.join(gradients[:3])}")
        if not parts:
            parts.append(f"the gradients or activations of {', '.join(names[:3])}")
        return f"{' and '.join(parts)} are not finite (inf or NaN)"

    def state(self) -> list[_Sum]:
        """The running sums in a fixed order (for reducing them across processes)."""
        return [self._sums.setdefault(key, _Sum()) for key in self._modules]

    def reset(self) -> None:
        self._sums.clear()
        self._untraced.clear()
        self._bypassed_now = None
        self._bypassed_heads.clear()
        self._forwards = 0


def _finite_factors(means: list[MeanFactor]) -> bool:
    return all(vector is None or bool(torch.isfinite(vector).all()) for vector, _ in means)


def _finite_gradient(grad: torch.Tensor | None) -> bool:
    """A gradient (dense, a shard, or one consumed during the backward, whose norm is kept) free of inf and NaN."""
    if grad is None:
        return True
    if hasattr(grad, "to_local"):
        grad = grad.to_local()
    return bool(torch.isfinite(torch.linalg.vector_norm(grad)))


def _first_input(module, args, kwargs, output) -> tuple[torch.Tensor | None]:
    """The tensor a module's forward reads first: its input values, ids or hidden states."""
    values = args[0] if args else next(iter(kwargs.values()), None)
    return ((values if isinstance(values, torch.Tensor) else None),)


def _fused_head_labels(module, args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The labels of a forward that projects through the output embedding's weight itself (TRL's fused LM head)."""
    if kwargs.get("fused_lm_head") is not True:
        return None, None
    labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
    return (
        labels if isinstance(labels, torch.Tensor) else None,
        shift_labels if isinstance(shift_labels, torch.Tensor) else None,
    )


def _output_tensor(module, args, kwargs, output) -> tuple[torch.Tensor | None]:
    return (_first_tensor(output),)


def _first_tensor(output) -> torch.Tensor | None:
    """The first tensor of a module's output (a tensor, a tuple, or a transformers ModelOutput)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    return output if isinstance(output, torch.Tensor) else None
