"""Activation statistics μ: the mean value flowing through each candidate connection during one optimizer step.

Forward hooks sum, per module, the value entering each connection over the real (non-padding) tokens of every
micro-batch; `means()` turns the sums into μ when the optimizer steps, and `reset()` starts the next step. μ is
kept per input feature (or per vocabulary row), never at a weight's full size.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .candidates import Candidate, UseKind, is_rms_norm

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


class ActivationTracker:
    """Forward hooks that accumulate μ for `candidates` while `armed`."""

    def __init__(self, root: nn.Module, candidates: list[Candidate], stat: str):
        self.root = root
        self.candidates = candidates
        self.stat = stat
        self.armed = False
        self._handles: list = []
        self._mask: torch.Tensor | None = None  # (batch, seq) weights of real tokens for the running forward
        self._training_forward = False  # the running forward records gradients
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # per-forward cache by input tensor
        self._sums: dict[int, _Sum] = {}
        self._modules: dict[int, tuple[nn.Module, UseKind]] = {}
        for candidate in candidates:
            for use in candidate.uses:
                if use.kind is not UseKind.CONSTANT:
                    self._modules[id(use.module)] = (use.module, use.kind)
        self._mask_position = _positional_index(root, "attention_mask")

    # -- hooks -------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.root.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._handles.append(self.root.register_forward_hook(self._forget_forward, always_call=True))
        for module, kind in self._modules.values():
            self._handles.append(module.register_forward_hook(self._hook_for(kind)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None
        self._seen.clear()

    def _active(self) -> bool:
        # Grad mode is read when the model's forward starts (`_capture_mask`): the hooks below run under no_grad, and
        # a forward replayed by activation checkpointing during backward is outside the model's forward.
        return self.armed and self._training_forward

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        # Only a (batch, seq) padding mask says which tokens are real; other shapes (4-D masks) are left alone.
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._training_forward = torch.is_grad_enabled()
        self._seen.clear()

    def _forget_forward(self, module, args, output):
        self._mask = None
        self._training_forward = False
        self._seen.clear()

    def _hook_for(self, kind: UseKind):
        if kind is UseKind.EMBEDDING_ROW:
            return self._on_embedding
        if kind is UseKind.NORM_GAIN:
            return self._on_norm
        return self._on_linear

    def _token_weights(self, leading_shape: torch.Size, device) -> torch.Tensor | None:
        """Flat weights (1 real, 0 padding) for tokens laid out as `leading_shape`, or None if all are real."""
        mask = self._mask
        if mask is None:
            return None
        if tuple(leading_shape) == tuple(mask.shape) or leading_shape.numel() == mask.numel():
            return mask.reshape(-1).to(device=device)
        return None

    def _accumulate(self, module: nn.Module, values: torch.Tensor, shared: bool = True) -> None:
        """Add the per-feature sum of `values` (..., features) over real tokens to `module`'s running sum.

        `shared`: `values` may be the input of other modules too (remember its sum for this forward)."""
        key = id(values)
        cached = self._seen.get(key) if shared else None
        if cached is not None and cached[0] is values:
            total, tokens = cached[1], cached[2]
        else:
            features = values.shape[-1]
            flat = values.reshape(-1, features)
            weights = self._token_weights(values.shape[:-1], values.device)
            if self.stat == "abs_mean":
                flat = flat.abs()
            elif self.stat == "rms":
                flat = flat.square()
            if weights is None:
                total, tokens = flat.sum(0, dtype=torch.float32), float(flat.shape[0])
            else:
                weights = weights.to(flat.dtype)
                total, tokens = (weights @ flat).float(), float(weights.sum())
            if shared:  # q, k and v projections read the same tensor: sum it once per forward.
                self._seen[key] = (values, total, tokens)
        self._sums.setdefault(id(module), _Sum()).add(total, tokens)

    # The statistics are not part of the model's computation: no_grad keeps them out of the autograd graph (and
    # out of what activation checkpointing records and replays).
    @torch.no_grad()
    def _on_linear(self, module, args, output):
        if self._active() and args:
            self._accumulate(module, args[0])

    @torch.no_grad()
    def _on_norm(self, module, args, output):
        if not (self._active() and args):
            return
        x = args[0]
        if is_rms_norm(module):
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or torch.finfo(x.dtype).eps
            xf = x.float()
            normalised = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        else:
            normalised = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
        self._accumulate(module, normalised, shared=False)  # a fresh tensor: keeping it would hold memory

    @torch.no_grad()
    def _on_embedding(self, module, args, output):
        if not (self._active() and args):
            return
        ids = args[0]
        weights = None
        if self._mask is not None:
            mask = self._mask.to(ids.device)
            if ids.shape != mask.shape and ids.dim() == mask.dim():
                try:  # position ids of shape (1, seq) stand for every row of the batch
                    ids = ids.expand(mask.shape)
                except RuntimeError:
                    mask = None
            weights = mask.reshape(-1).float() if mask is not None and ids.shape == mask.shape else None
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, weights=weights, minlength=module.num_embeddings).float()
        tokens = float(weights.sum()) if weights is not None else float(flat.numel())
        self._sums.setdefault(id(module), _Sum()).add(counts, tokens)

    # -- results -----------------------------------------------------------------------------------------------
    def _mean(self, module: nn.Module, kind: UseKind, size: int, device) -> torch.Tensor:
        acc = self._sums.get(id(module))
        if acc is None or acc.total is None or acc.tokens == 0:
            return torch.zeros(size, device=device)
        mean = acc.total.to(device) / acc.tokens
        # A one-hot input is 0 or 1, so all three statistics are the share of tokens for 'mean'/'abs_mean'.
        if self.stat == "rms":
            mean = mean.clamp_min(0).sqrt()
        return mean

    def means(self, candidate: Candidate) -> list[MeanFactor]:
        """μ of `candidate` as factors to broadcast and add: [(vector, dim), ...], (None, 0) meaning 1."""
        factors: list[MeanFactor] = []
        param = candidate.param
        for use in candidate.uses:
            if use.kind is UseKind.CONSTANT:
                factors.append((None, 0))
            else:
                factors.append((self._mean(use.module, use.kind, param.shape[use.dim], param.device), use.dim))
        return factors

    def state(self) -> list[_Sum]:
        """The running sums in a fixed order (for reducing them across processes)."""
        return [self._sums.setdefault(key, _Sum()) for key in self._modules]

    def reset(self) -> None:
        self._sums.clear()


def _positional_index(module: nn.Module, name: str) -> int | None:
    """Position of argument `name` in `module.forward`, to find it when passed positionally."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None
