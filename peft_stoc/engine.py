"""The per-step work of Stochastic Tuning, attached to whatever optimizer steps the model.

torch's global optimizer-step hooks reach every `torch.optim.Optimizer` — plain loops, transformers `Trainer`,
accelerate's wrapped optimizers — so no training code has to change. Per optimizer step:

    pre-step:  μ (tracked during the forwards) + gradients → draw → remember originals → confine the step
    post-step: weight decay back, strict rule applied, audit of the untouched entries, μ reset

An audit of a few fixed entries per tensor catches any change to the base that did not pass through an
intercepted step (a manual update, `param.data` assignment, an optimizer outside `torch.optim`): it raises
instead of letting training run dense in silence.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed
from .candidates import Candidate
from .layer import Patch
from .selection import Source, draw
from .tracking import ActivationTracker
from .update import DecayRedirect, StrictGuard, mask_gradient

AUDIT_ENTRIES_PER_TENSOR = 4


@dataclass
class StepStats:
    """Figures of the latest optimizer step."""

    step: int = 0  # optimizer steps taken with this adapter
    drawn: int = 0  # entries drawn at the latest step
    changed: int = 0  # distinct entries changed so far
    candidates: int = 0  # entries that may be drawn
    k: int = 0

    @property
    def density(self) -> float:
        return self.changed / self.candidates if self.candidates else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}step": self.step,
            f"{prefix}drawn": self.drawn,
            f"{prefix}changed": self.changed,
            f"{prefix}density": self.density,
        }


class Audit:
    """A few fixed entries per candidate tensor whose values must only change through intercepted steps."""

    def __init__(self, candidates: list[Candidate]):
        generator = torch.Generator().manual_seed(0x5170C)
        self.candidates = candidates
        self.positions = [
            torch.randint(c.numel, (min(AUDIT_ENTRIES_PER_TENSOR, c.numel),), generator=generator)
            .unique()
            .to(c.param.device)
            for c in candidates
        ]
        self.values: torch.Tensor | None = None

    def _gather(self) -> torch.Tensor:
        """The audited values of all tensors in one vector: one comparison per check, whatever the model's size."""
        if not self.candidates:
            return torch.empty(0)
        device = self.candidates[0].param.device  # a model spread over devices is checked on the first one's
        return torch.cat([c.param.detach().view(-1).index_select(0, p).to(device)
                          for c, p in zip(self.candidates, self.positions)])

    def refresh(self) -> None:
        self.values = self._gather()

    def invalidate(self) -> None:
        """Our own changes to the weights: take a new baseline at the next check."""
        self.values = None

    def verify(self, allowed: Patch | None = None, context: str = "") -> None:
        """Raise if an audited entry changed since the last refresh (entries in `allowed` may change)."""
        if self.values is None:
            self.refresh()
            return
        current = self._gather()
        moved = (self.values != current) & ~(torch.isnan(self.values) & torch.isnan(current))
        if bool(moved.any()):
            sizes = [p.numel() for p in self.positions]
            for candidate, positions, moved_here in zip(self.candidates, self.positions, moved.split(sizes)):
                if not bool(moved_here.any()):
                    continue
                if allowed is not None and candidate.name in allowed.index:
                    changed = allowed.index[candidate.name].to(positions.device)
                    moved_here = moved_here & ~torch.isin(positions, changed).to(moved_here.device)
                    if not bool(moved_here.any()):
                        continue
                raise RuntimeError(f"StocTuning: base parameter '{candidate.name}' changed {context}")
        self.values = current


_ENGINES: weakref.WeakSet = weakref.WeakSet()
_HOOK_HANDLES: list = []


def _ensure_optimizer_hooks() -> None:
    if _HOOK_HANDLES:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _HOOK_HANDLES.append(register_optimizer_step_pre_hook(_before_any_step))
    _HOOK_HANDLES.append(register_optimizer_step_post_hook(_after_any_step))


def _before_any_step(optimizer, args, kwargs):
    for engine in list(_ENGINES):
        if engine.owns(optimizer):
            engine.before_step(optimizer)


def _after_any_step(optimizer, args, kwargs):
    for engine in list(_ENGINES):
        if engine.owns(optimizer):
            engine.after_step(optimizer)


BYPASS_HINT = (
    "outside an optimizer step that StocTuning intercepted (a manual update, an assignment to `param.data`, or an "
    "optimizer that is not a torch.optim.Optimizer). StocTuning confines `optimizer.step()` of torch.optim "
    "optimizers, which is what transformers Trainer, accelerate and plain PyTorch loops call; update the base "
    "through such an optimizer, or call `model.base_model.stoc_sync()` after changing weights on purpose."
)


class StepEngine:
    """Stochastic Tuning for one trainable adapter: tracking, drawing and confining every optimizer step."""

    def __init__(self, root: nn.Module, candidates: list[Candidate], config, patch: Patch, k: int, max_changed):
        self.candidates = candidates
        self.config = config
        self.patch = patch
        self.k = k
        self.max_changed = max_changed
        self.tracker = ActivationTracker(root, candidates, config.activation_stat)
        self.audit = Audit(candidates)
        self.decay = DecayRedirect()
        self.strict = StrictGuard()
        self.stats = StepStats(candidates=sum(c.numel for c in candidates), k=k, changed=patch.count)
        self.last_draw: list[torch.Tensor] | None = None
        self.draws = 0  # number of fresh draws (a mask reused under mask_interval is not a fresh draw)
        self._ids = {id(c.param): i for i, c in enumerate(candidates)}
        self._owned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._cycle_drawn = False
        self._depth = 0  # optimizer steps under way: a wrapper such as ZeroRedundancyOptimizer steps an inner one
        self._root_handle = None
        # Called with the tracker before each draw. None: `distributed.default_sync()` all-reduces μ's sums across
        # ranks when torch.distributed runs with several processes (and checks the ranks drew alike).
        self.reduce_statistics = None
        self._setup_checked = False

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        distributed.check_supported(self.tracker.root, self.candidates)
        _ensure_optimizer_hooks()
        self.tracker.attach()
        self.tracker.armed = True
        if self._root_handle is None:
            self._root_handle = self.tracker.root.register_forward_pre_hook(self._on_forward)
        _ENGINES.add(self)

    @property
    def running(self) -> bool:
        return self in _ENGINES

    def stop(self) -> None:
        self.tracker.detach()
        self.tracker.armed = False
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        _ENGINES.discard(self)
        self.decay.restore()
        self.strict.restore()

    def weights_changed_by_us(self) -> None:
        """Apply/revert/load changed the base deliberately: re-baseline the audit."""
        self.audit.invalidate()

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._owned.get(optimizer)
        if cached is None or cached[0] != count:
            found = any(id(p) in self._ids for g in optimizer.param_groups for p in g["params"])
            cached = (count, found)
            self._owned[optimizer] = cached
        return cached[1]

    # -- forward -----------------------------------------------------------------------------------------------
    def _on_forward(self, module, args):
        # A forward with gradients starts a new step, also in eval mode (a model trained without dropout).
        if not torch.is_grad_enabled():
            return
        self._cycle_drawn = False
        self._depth = 0
        self._check_setup()
        self.audit.verify(context=BYPASS_HINT)

    def _check_setup(self) -> None:
        """Refuse sharded engines (FSDP, DeepSpeed), which wrap the model after `get_peft_model`: once per engine."""
        if not self._setup_checked:
            distributed.check_supported(self.tracker.root, self.candidates)
            self._setup_checked = True

    # -- optimizer step ----------------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.config.seed)
            self._generators[device] = generator
        return generator

    def _draw(self) -> list[torch.Tensor]:
        sync = self.reduce_statistics if self.reduce_statistics is not None else distributed.default_sync()
        if sync is not None:
            sync(self.tracker)
        budgeted = self.max_changed is not None
        sources = [
            Source(
                c.param,
                c.param.grad,
                self.tracker.means(c),
                self.patch.index.get(c.name) if budgeted else None,
            )
            for c in self.candidates
        ]
        max_new = None if not budgeted else max(0, self.max_changed - self.patch.count)
        device = self.candidates[0].param.device
        drawn = draw(sources, self.k, self.config.selection, self._generator(device), max_new=max_new)
        if isinstance(sync, distributed.RankSync):
            sync.check_draw(drawn)
        return drawn

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._depth += 1
        if self._cycle_drawn:
            # A second optimizer in the same step: gradients are already masked, only its decay needs confining.
            self.decay.apply(optimizer, self._drawn_by_id)
            return
        self._check_setup()
        self.audit.verify(context=BYPASS_HINT)
        reuse = self.last_draw is not None and self.stats.step % self.config.mask_interval != 0
        drawn = self.last_draw if reuse else self._draw()
        if not reuse:
            self.draws += 1
        self.last_draw = drawn
        self._drawn_by_id = {id(c.param): idx for c, idx in zip(self.candidates, drawn)}
        strict = self.config.update_rule == "strict"
        for candidate, index in zip(self.candidates, drawn):
            if strict and candidate.name in self.patch.index:
                self.strict.save(candidate.param, self.patch.index[candidate.name], index)
            if index.numel():
                self.patch.record(candidate.name, candidate.param, index)
            mask_gradient(candidate.param, index)
        self.decay.apply(optimizer, self._drawn_by_id)
        self.stats.drawn = int(sum(d.numel() for d in drawn))
        self.stats.step += 1
        self._cycle_drawn = True

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return  # an optimizer stepped inside another's step: finish when the outer one (and its broadcast) ends
        self.decay.restore()
        self.strict.restore()
        self.audit.verify(
            allowed=self.patch,
            context=(
                f"in a step of {type(optimizer).__name__} although it was not drawn: this optimizer moves entries "
                "whose gradient is zero, so StocTuning cannot confine it. Use SGD, Adam or AdamW from torch.optim."
            ),
        )
        self.stats.changed = self.patch.count
        self.tracker.reset()
