"""The per-step work of Stochastic Tuning for one trainable adapter, run from the optimizer-step hooks
(`optimizer_hooks`) so that no training code has to change. Per optimizer step:

    pre-step:  μ (tracked during the forwards) + gradients → draw → remember originals → confine the step
    post-step: weight decay back, strict rule applied, audit of the untouched entries (`audit`), μ reset
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import ranks as distributed
from ..distributed import sharded_draw, shards
from ..distributed.sharded_step import ShardedSteps
from ..sampling.importance import Source, finite_means
from ..sampling.selection import draw, step_seed
from ..sampling.streaming import StreamingDraw
from ..tuner.candidates import Candidate, UseKind
from ..tuner.originals import Patch
from . import opaque_hooks, optimizer_hooks, sparse_optim
from .audit import BYPASS_HINT, Audit
from .consumed_grad import ConsumedGrad, accumulation_error
from .lean import LeanStep, accelerate_syncs_gradients, state_bytes
from .lean_steps import LeanSteps
from .optimizer_checks import OptimizerChecks
from .sparse_backward import SparseBackward, masked_values
from .tracking import ActivationTracker
from .update import DecayRedirect, StrictGuard, mask_gradient
from .weak_hooks import weak_call


@dataclass
class StepStats:
    """Figures of the latest optimizer step."""

    step: int = 0  # optimizer steps taken with this adapter
    drawn: int = 0  # entries drawn at the latest step
    changed: int = 0  # distinct entries changed so far
    candidates: int = 0  # entries that may be drawn
    grad_bytes: int = 0  # most bytes of candidate gradients held at once during the latest step
    optimizer_state_bytes: int = 0  # optimizer state held for candidates after the latest step

    @property
    def density(self) -> float:
        return self.changed / self.candidates if self.candidates else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "step": self.step,
            "drawn": self.drawn,
            "changed": self.changed,
            "density": self.density,
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
        }


class StepEngine(LeanSteps, ShardedSteps, OptimizerChecks):
    """Stochastic Tuning for one trainable adapter: tracking, drawing and confining every optimizer step."""

    def __init__(
        self,
        root: nn.Module,
        candidates: list[Candidate],
        config,
        patch: Patch,
        k: int,
        max_changed,
        state_key: str = "peft_stoc",
        step: int = 0,
    ):
        self.candidates = candidates
        self.config = config
        self.patch = patch
        self.k = k
        self.max_changed = max_changed
        self.tracker = ActivationTracker(root, candidates, config.activation_stat)
        self.audit = Audit(candidates, patch)
        self.decay = DecayRedirect()
        self.strict = StrictGuard()
        self.stats = StepStats(step=step, candidates=sum(c.numel for c in candidates), changed=patch.count)
        self.last_draw: list[torch.Tensor] | None = None
        self.draws = 0  # number of fresh draws (a mask reused under mask_interval is not a fresh draw)
        self._ids = {id(c.param): i for i, c in enumerate(candidates)}
        self._owned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._strays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._cycle_drawn = False
        self._depth = 0  # optimizer steps under way: a wrapper such as ZeroRedundancyOptimizer steps an inner one
        self._root_hooks = opaque_hooks.HookSet()
        # Called with the tracker before each draw. None: `distributed.default_sync()` all-reduces μ's sums across
        # ranks when torch.distributed runs with several processes (and checks the ranks drew alike).
        self.reduce_statistics = None
        self._setup_checked = False
        # Memory-lean training (see lean.py); `memory="auto"` falls back to dense for optimizers it cannot emulate.
        self.lean = LeanStep(candidates, state_key) if config.memory != "dense" else None
        self.hold_gradients = False  # set by `stoc_accumulating()`: this backward is not the last of the step
        self._backward_seen = False  # a backward ran since the latest step
        self._forwards = 0  # forwards with gradients since the latest step
        self._forwards_per_step = 1  # as seen at the latest step: the backward of the last of them ends a step
        self._steps_here = 0  # optimizer steps this engine has seen
        # accelerate's gradient state outlives the loop that set it (a notebook that ran a Trainer before a plain
        # loop): its word counts while a Trainer runs, or once it has marked a micro-batch as not the last.
        self.driven_by_trainer = False
        self._accelerate_accumulates = False
        self._pending = None  # (drawn, values, factors, kind, updated positions) of a lean step under way
        self._stepped: set[int] = set()  # candidates held by the optimizers stepped since the latest forward
        self._undo: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # weights before an unknown optimizer's step
        self._state_key = state_key
        self._grad_handles: list = []
        self._rank_sync = None
        self._gradient_order: dict[int, None] = {}
        self._completed: dict[int, tuple] = {}  # position -> (gradient, version) as the step's latest backward left it
        self._given_draw: list[torch.Tensor] | None = None
        self._sparse_states: dict | None = None  # the sparse optimizer state of the latest lean step
        # FSDP2: candidates are dim-0 shards. `on_shard` (set by the tuner) makes every adapter follow the shards
        # FSDP2 replaced the parameters with; `shards` then holds, per candidate, the rows held here.
        self.on_shard = None
        self.on_graph = None  # set by the tuner: a forward with gradients is building a graph on the weights shown
        self.shards: list[slice] | None = None
        self._shard_sync: sharded_draw.ShardSync | None = None
        # mask_interval > 1: steps that reuse the mask compute only the masked entries' gradients (sparse_backward).
        self.sparse = SparseBackward(candidates) if config.mask_interval > 1 else None
        if self.sparse is not None:
            self.sparse.on_delivered = self._on_sparse_gradient
        self._drew_now = False  # the latest step drew a fresh mask

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        distributed.check_supported(self.tracker.root, self.candidates)
        optimizer_hooks.ensure_installed()
        self.tracker.attach()
        self.tracker.armed = True
        if not self._root_hooks:
            self._root_hooks.before(self.tracker.root, self._on_forward, opaque_hooks.nothing)
        if not self._grad_handles:
            for position, candidate in enumerate(self.candidates):
                self._grad_handles.append(
                    candidate.param.register_post_accumulate_grad_hook(weak_call(self._on_gradient, position))
                )
                if candidate.overlay is not None:
                    candidate.overlay.gradient_sink = lambda o, x, d, p=position: self._quantized_gradient(p, x, d)
        if self.sparse is not None:
            self.sparse.attach()
        optimizer_hooks.ENGINES.add(self)
        optimizer_hooks.PAUSED.discard(self)

    @property
    def running(self) -> bool:
        return self in optimizer_hooks.ENGINES

    def stop(self) -> None:
        """Pause: the adapter is not trained for now (disabled, another adapter active, inference mode). Pending
        gradients stay where they are; an optimizer step while paused is refused (`refuse_paused_step`)."""
        self._detach()
        optimizer_hooks.PAUSED.add(self)

    def retire(self) -> None:
        """Stop for good (the adapter is deleted, reloaded or unloaded): nothing of this engine stays behind."""
        self._detach()
        optimizer_hooks.PAUSED.discard(self)
        if self.sparse is not None:
            self.sparse.remove()
        if self.lean is not None:
            self.lean.clear_gradients()
            self.lean.reset()

    def refuse_paused_step(self) -> None:
        """Raise, before anything changes, when an optimizer holding candidates steps while their adapter is not being
        trained: the step would train nothing (the candidates do not require gradients then), or apply gradients
        left from before, which could neither be confined nor saved."""
        pending = [c.name for c in self.candidates if c.param.grad is not None]
        what = (
            f"would update {len(pending)} base tensors (e.g. '{pending[0]}') outside any adapter"
            if pending
            else "would train nothing"
        )
        raise RuntimeError(
            f"StocTuning: optimizer.step() {what}: the adapter is not being trained right now (it is disabled, "
            "inactive or in inference mode). Step the optimizer where the adapter is enabled and active (e.g. after "
            "the `with model.disable_adapter():` block, or after `set_adapter(name)`); to drop pending gradients, "
            "call `optimizer.zero_grad()`."
        )

    def _detach(self) -> None:
        self.tracker.detach()
        self.tracker.armed = False
        self._root_hooks.remove()
        if self.sparse is not None:
            self.sparse.detach()
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles.clear()
        for candidate in self.candidates:
            if candidate.overlay is not None:
                candidate.overlay.gradient_sink = None
        optimizer_hooks.ENGINES.discard(self)
        self.decay.restore()
        self.strict.restore()

    def accept_weights(self, base_too: bool = False) -> None:
        """The weights were changed on purpose: an adapter applied, reverted or loaded (recorded entries only), or —
        `base_too` — the base itself (`stoc_sync`, parameters replaced): the audit starts over for what changed."""
        if base_too or self.audit.base is None:
            self.audit.refresh()  # from now on every entry is held to these values (a pass of a few ms)
        else:
            self.audit.invalidate()

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._owned.get(optimizer)
        if cached is None or cached[0] != count:
            found = any(id(p) in self._ids for g in optimizer.param_groups for p in g["params"])
            cached = (count, found)
            self._owned[optimizer] = cached
        return cached[1]

    @property
    def lean_active(self) -> bool:
        return self.lean is not None

    # -- forward -----------------------------------------------------------------------------------------------
    def _on_forward(self):
        # A forward with gradients starts a new step, also in eval mode (a model trained without dropout).
        if not torch.is_grad_enabled():
            return
        self._cycle_drawn = False
        self._depth = 0
        self._pending = None
        self._stepped = set()
        if self.on_graph is not None:
            self.on_graph()
        self._check_setup()
        if self.sparse is not None:
            self._prepare_sparse_backward()
        self.audit.verify(context=BYPASS_HINT)  # every entry, against its base checksum (a pass of a few ms)
        if self._backward_seen:
            self._after_backward_without_step()
        self._forwards += 1

    def _prepare_sparse_backward(self) -> None:
        """Whether this forward's step reuses its mask, and so gets the sparse backward (`sparse_backward`)."""
        sparse = self.sparse
        reuse = self._reuses_mask()
        if reuse and self.reduce_statistics is None and distributed.world_size() == 1:
            self.tracker.skip_forward()  # μ only serves a draw (under DDP the ranks' reductions must stay paired)
        sparse.active = reuse and not self.sharded
        if sparse.active:
            sparse.begin(self.last_draw)
            # Summed sparsely where the gradients stay with StocTuning; dense where an optimizer or DDP needs them.
            sparse.sparse_sums = self.lean is not None and distributed.world_size() == 1

    def _on_sparse_gradient(self, position: int) -> None:
        """A tapped weight's masked gradient arrived (the weight's own gradient hook does not run for it)."""
        self._backward_seen = True
        self._gradient_order.setdefault(position, None)
        grad = self.candidates[position].param.grad
        self._completed[position] = (weakref.ref(grad), grad._version)

    def _after_backward_without_step(self) -> None:
        """A forward after a backward, with no optimizer step in between: gradient accumulation, or a step that
        was abandoned (skipped by a gradient scaler, or its gradients set to None)."""
        grads = [c.param.grad for c in self.candidates]
        if any(isinstance(g, ConsumedGrad) and not g.zeroed and not g.sparse for g in grads):
            raise RuntimeError(accumulation_error())
        dropped = all(g is None or (isinstance(g, ConsumedGrad) and not g.sparse) for g in grads)
        if dropped or self._gradients_reset(grads):
            # Abandoned: its statistics must not leak into the next draw.
            self._abandon_step()

    def _abandon_step(self) -> None:
        self.tracker.reset()
        if self.sparse is not None:
            self.sparse.reset()
        if self.lean is not None:
            self.lean.clear_gradients()
            self.lean.reset()
        self._pending = None
        self._backward_seen = False
        self._forwards = 0
        self._gradient_order.clear()
        self._completed.clear()

    def _check_setup(self) -> None:
        """Follow FSDP2's shards and refuse engines StocTuning cannot train under (FSDP1, DeepSpeed), which wrap the
        model after `get_peft_model`: once per engine."""
        if not self._setup_checked:
            if self.on_shard is not None:
                self.on_shard()
            else:
                replaced = shards.sharded_replacements(self.candidates)
                for candidate in self.candidates:
                    candidate.param = replaced.get(id(candidate.param), candidate.param)
                if replaced:
                    self.parameters_replaced()
            if distributed.check_supported(self.tracker.root, self.candidates) == "fsdp2":
                self.follow_shards()
            self._setup_checked = True

    # -- backward (lean) ---------------------------------------------------------------------------------------
    def _streams_now(self) -> bool:
        """Whether the running backward ends the step, so its gradients can be consumed as they complete."""
        if self.hold_gradients or self.sharded or distributed.world_size() > 1:
            return False
        synced = accelerate_syncs_gradients()
        if synced is False:
            self._accelerate_accumulates = True
            return False
        if synced and (self._accelerate_accumulates or self.driven_by_trainer):
            return True  # the last micro-batch of a step, by the word of the loop that runs the micro-batches
        # A plain loop: lean from its first step. A loop that accumulates without saying so is refused at its second
        # micro-batch, before anything changed (`_after_backward_without_step`); one that declared its micro-batches
        # (`stoc_accumulating()`) at a step is followed from the forwards per step seen there.
        return self._forwards >= self._forwards_per_step

    def _on_gradient(self, position: int, param: torch.Tensor) -> None:
        if not self.tracker.armed:
            return
        means = None
        self._backward_seen = True
        # The order gradients complete in: a draw made at the step (accumulation, DDP) visits the tensors
        # in it too, so it consumes the random stream as a streamed draw would — one process and several ranks then
        # draw the same entries.
        self._gradient_order.setdefault(position, None)
        if self.lean is not None and self._streams_now():
            means = self.tracker.means(self.candidates[position])
            self.lean.consume(position, param, means, self._new_stream)
        self._completed[position] = (weakref.ref(param.grad), param.grad._version)

    def _quantized_gradient(self, position: int, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The gradient of a quantized weight's handle, from its layer's inputs and output gradients (tokens first):
        drawn from a few rows at a time when this backward ends the step (a `ConsumedGrad` is left), else the dense
        gradient, held until the step as a float weight's is (gradient accumulation; the last micro-batch adds its
        gradient to the held one, which is then drawn from as a float weight's is)."""
        candidate = self.candidates[position]
        sparse = self.sparse
        if sparse is not None and sparse.active and sparse.sparse_sums:  # a reused mask: its entries' gradients only
            plan = sparse.plan_for(position, UseKind.LINEAR_INPUT).on_whole_inputs()
            return sparse.deliver(position, masked_values(plan, inputs, grads, None), candidate.param)
        held = candidate.param.grad is not None
        if held or self.lean is None or not self.tracker.armed or not self._streams_now():
            return grads.t() @ inputs
        return self.lean.consume_tiles(position, inputs, grads, self.tracker.means(candidate), self._new_stream)

    def _gradients_reset(self, grads: list) -> bool:
        """A gradient was dropped or zeroed since the backward that completed it (`zero_grad(set_to_none=False)`
        zeroes in place): the step was abandoned, as when a gradient scaler skips it, whatever the zero_grad mode.
        Only gradients changed since (their version counter moved) are read; a reduction across processes changes
        them without zeroing them."""
        for position, (ref, version) in self._completed.items():
            grad = grads[position]
            if grad is None:
                return True
            if (ref() is grad and grad._version == version) or isinstance(grad, ConsumedGrad):
                continue
            if not bool((grad.to_local() if hasattr(grad, "to_local") else grad).any()):
                return True
        return False

    # -- optimizer step ----------------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(step_seed(self.config.seed, self.stats.step))

    def _reuses_mask(self) -> bool:
        return self.last_draw is not None and self.stats.step % self.config.mask_interval != 0

    def _new_stream(self) -> StreamingDraw:
        budgeted = self.max_changed is not None
        device = self.candidates[0].param.device
        return StreamingDraw(
            [c.param for c in self.candidates],
            self.k,
            self.config.selection,
            self._generator(device),
            fixed=self.last_draw if self._reuses_mask() else None,
            changed=[self.patch.index.get(c.name) for c in self.candidates] if budgeted else None,
            max_new=max(0, self.max_changed - self.patch.count) if budgeted else None,
        )

    def _sync_statistics(self):
        sync = self.reduce_statistics if self.reduce_statistics is not None else distributed.default_sync()
        if sync is not None:
            sync(self.tracker)
        return sync

    def _draw(self) -> list[torch.Tensor]:
        sync = self._sync_statistics()
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
            if self._depth == 1:
                self._refuse_second_optimizer(optimizer)
            if self._pending is not None:
                self._release_gradients(optimizer)  # another optimizer holding other candidates
            else:
                # A second optimizer in the same step: gradients are already masked, only its decay needs confining.
                self.decay.apply(optimizer, self._drawn_by_id)
            return
        self._check_setup()
        self.audit.verify_touched(context=BYPASS_HINT)
        self._refuse_unconfinable(optimizer)
        self._stepped = self._held_candidates(optimizer)
        kind = sparse_optim.kind_of(optimizer)
        if self.lean is not None and kind is None:
            if self.sharded:
                raise distributed.UnsupportedDistributedSetup(
                    f"Under FSDP2, StocTuning applies the update of torch.optim SGD, Adam or AdamW to the drawn "
                    f"entries of each shard itself; it cannot do so for {type(optimizer).__name__}."
                )
            self._leave_lean(optimizer)
        if self.lean is not None:
            self._check_sparse_state(optimizer)
        if self._skipped_by_scaler(optimizer):
            self._skip(optimizer, reason=None)
            return
        if self.lean is not None:
            self._lean_step(optimizer, kind)
        else:
            self._refuse_underflowing_eps(optimizer)
            self._keep_for_undo(optimizer)
            self._dense_step(optimizer)

    def _skipped_by_scaler(self, optimizer) -> bool:
        """A fused optimizer stepped by GradScaler skips inside its kernel when an inf/NaN was found."""
        found_inf = getattr(optimizer, "found_inf", None)
        return isinstance(found_inf, torch.Tensor) and bool(found_inf.sum() > 0)

    def _skip(self, optimizer, reason: str | None) -> None:
        """Nothing changes in this step: no draw, no update, no step counted; μ starts afresh."""
        if reason is not None:
            warnings.warn(f"StocTuning: optimizer step {self.stats.step + 1} skipped: {reason}", stacklevel=4)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        for candidate in self.candidates:
            candidate.param.grad = None
        self._abandon_step()
        self._cycle_drawn = True

    def _changed_count(self) -> int:
        """Entries changed so far, over all processes under FSDP2."""
        return self._shard_sync.total(self.patch.count) if self.sharded else self.patch.count

    def _nonfinite_candidates(self) -> list[str]:
        """Candidates whose gradient or μ is not finite (their importance would be NaN or inf)."""
        grads = [(c, c.param.grad) for c in self.candidates if c.param.grad is not None]
        if not grads:
            return []
        norms = torch._foreach_norm([g for _, g in grads])
        bad = [c.name for (c, _), norm in zip(grads, norms) if not bool(torch.isfinite(norm))]
        return bad + [c.name for c in self.candidates if not finite_means(self.tracker.means(c))]

    def _dense_step(self, optimizer) -> None:
        given, self._given_draw = self._given_draw, None
        bad = [] if given is not None else self._nonfinite_candidates()
        if bad:
            self._skip(
                optimizer,
                reason=f"{self.tracker.nonfinite_reason(bad)}. No weight changed.",
            )
            return
        if given is not None:
            drawn = given
        else:
            reuse = self._reuses_mask()
            drawn = self.last_draw if reuse else self._draw()
            if not reuse:
                self.draws += 1
            self._drew_now = not reuse
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
        self.stats.grad_bytes = sum(
            c.param.grad.numel() * c.param.grad.element_size() for c in self.candidates if c.param.grad is not None
        )
        self.stats.step += 1
        self._cycle_drawn = True

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return  # an optimizer stepped inside another's step: finish when the outer one (and its broadcast) ends
        self.decay.restore()
        self.strict.restore()
        if self._pending is not None:
            self._lean_update(optimizer)
        kept, self._undo = self._undo, None
        if kept is None:
            # SGD, Adam, AdamW and the like with masked gradients, or StocTuning's own sparse update, move recorded
            # entries only: their checksum is taken anew, and the next forward checks every entry.
            self.audit.take_touched()
        else:
            self._verify_or_undo(optimizer, kept)
        self.stats.changed = self._changed_count()
        self.stats.optimizer_state_bytes = state_bytes(optimizer, self.candidates, self.state_key)
        if self.sparse is not None:
            self._after_sparse_step()
        if self._forwards:
            self._forwards_per_step = self._forwards
        self._forwards = 0
        self._steps_here += 1
        self._backward_seen = False
        self._completed.clear()
        if self.lean is not None:
            self.lean.reset()
        self.tracker.reset()

    def _after_sparse_step(self) -> None:
        """After a step that drew a fresh mask: tap the weights the draw found used only through their modules."""
        self.sparse.reset()
        if self._drew_now and not self.sharded:
            self.sparse.install([self.tracker.followed(c) for c in self.candidates])
        self._drew_now = False

    @property
    def state_key(self) -> str:
        return self._state_key
