"""The step engine of one trainable adapter: what Stochastic Tuning follows between two optimizer steps (μ in the
forwards, gradients in the backward), and the step itself — draw → confine → update — through the strategy of its
memory mode (`dense.DenseStrategy`, `lean.LeanStrategy`, `sharded_step.ShardedStrategy` under FSDP2).

The optimizer-step hooks (`optimizer_hooks`) run `before_step` (draw, confine) and `after_step` (update) around every
step of an optimizer holding its candidates, so no training code has to change; `step.StocTuningStep` runs the same
three phases around an optimizer's step in a loop that shows them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..distributed import ranks as distributed
from ..distributed import shards
from ..distributed.sharded_step import ShardedStrategy, check_shardable
from ..sampling.selection import step_seed
from ..sampling.streaming import StreamingDraw
from ..tuner.candidates import Candidate
from ..tuner.originals import Originals
from . import opaque_hooks, optimizer_hooks, sparse_optim
from .audit import BYPASS_HINT, Audit
from .consumed_grad import ConsumedGrad, accumulation_error
from .dense import DenseStrategy
from .gradient_hooks import GradientHooks
from .gradient_stream import state_bytes
from .lean import LeanStrategy
from .optimizer_checks import OptimizerChecks, refuse_paused_step, skipped_by_scaler
from .sparse_backward import SparseBackward
from .step import StepStats, StocTuningStep
from .step_progress import StepProgress
from .tracking import ActivationTracker
from .user_warnings import warn_at_user


class StepEngine:
    """Stochastic Tuning for one trainable adapter: tracking, drawing and confining every optimizer step."""

    def __init__(
        self,
        root: nn.Module,
        candidates: list[Candidate],
        config,
        patch: Originals,
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
        self.state_key = state_key
        self.tracker = ActivationTracker(root, candidates, config.activation_stat)
        self.audit = Audit(candidates, patch)
        self.checks = OptimizerChecks(candidates, root)
        self.stats = StepStats(step=step, candidates=sum(c.numel for c in candidates), changed=patch.count)
        # How the step draws, confines and updates; `memory="auto"` starts lean and falls back to dense for optimizers
        # whose arithmetic it does not reproduce, FSDP2 makes it sharded.
        self.strategy = DenseStrategy(self) if config.memory == "dense" else LeanStrategy(self)
        self.gradient_hooks = GradientHooks(self)
        # mask_interval > 1: steps that reuse the mask compute only the masked entries' gradients (sparse_backward).
        self.sparse = SparseBackward(candidates) if config.mask_interval > 1 else None
        if self.sparse is not None:
            self.sparse.on_delivered = self.gradient_hooks.on_sparse_gradient
        self.last_draw: list[torch.Tensor] | None = None
        self.draws = 0  # number of fresh draws (a mask reused under mask_interval is not a fresh draw)
        # Called with the tracker before each draw. None: `distributed.default_sync()` all-reduces μ's sums across
        # ranks when torch.distributed runs with several processes (and checks the ranks drew alike).
        self.reduce_statistics = None
        self.on_shard = None  # set by the tuner: every adapter follows the shards FSDP2 replaced the parameters with
        self.on_graph = None  # set by the tuner: a forward with gradients is building a graph on the weights shown
        self._ids = {id(c.param) for c in candidates}
        self._owned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.explicit: weakref.WeakSet = weakref.WeakSet()  # optimizers a `StocTuningStep.step()` is stepping
        self._root_hooks = opaque_hooks.HookSet()
        self._setup_checked = False
        self.progress = StepProgress(len(candidates))
        self._cycle_drawn = False  # this step has drawn (or was skipped)
        self._depth = 0  # optimizer steps under way: a wrapper such as ZeroRedundancyOptimizer steps an inner one
        self._drew_now = False  # this step drew a fresh mask
        self._fresh = False  # the step being drawn gets a fresh mask (not one kept under mask_interval)

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        distributed.check_supported(self.tracker.root, self.candidates)
        optimizer_hooks.ensure_installed()
        self.tracker.attach()
        self.tracker.armed = True
        if not self._root_hooks:
            self._root_hooks.before(self.tracker.root, self._on_forward, opaque_hooks.nothing)
        if not self.gradient_hooks:
            self.gradient_hooks.attach()
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
        self.strategy.abandon()

    def refuse_paused_step(self) -> None:
        """An optimizer holding candidates steps while their adapter is not being trained: refused."""
        refuse_paused_step(self.candidates)

    def _detach(self) -> None:
        self.tracker.detach()
        self.tracker.armed = False
        self._root_hooks.remove()
        if self.sparse is not None:
            self.sparse.detach()
        self.gradient_hooks.detach()
        optimizer_hooks.ENGINES.discard(self)
        self.strategy.detach()

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

    def step_for(self, optimizer: torch.optim.Optimizer) -> StocTuningStep:
        """The step object of `optimizer` (the optimizer-step hooks run its two halves). Made afresh for each step:
        one kept here would keep every optimizer ever stepped alive with the model."""
        return StocTuningStep(self.tracker.root, optimizer, engine=self)

    @property
    def lean(self):
        """The gradient stream of the lean strategies; None in dense mode."""
        return self.strategy.gradients

    @property
    def lean_active(self) -> bool:
        return self.lean is not None

    @property
    def sharded(self) -> bool:
        return isinstance(self.strategy, ShardedStrategy)

    def masters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Float32 master values of low-precision candidates, by name: (sorted flat indices, values)."""
        return self.strategy.masters()

    # -- FSDP2 ---------------------------------------------------------------------------------------------------
    def parameters_replaced(self) -> None:
        """The candidates hold other parameters now (FSDP2's shards): the optimizers this engine serves are found by
        the new ones. (The ids of the replaced parameters, freed, may come back with the parameters of another
        model.)"""
        self._ids = {id(c.param) for c in self.candidates}
        self._owned = weakref.WeakKeyDictionary()
        self.checks.parameters_replaced()

    def follow_shards(self) -> None:
        """The candidates are FSDP2's dim-0 shards now: draw over the rows held here, update them in place."""
        check_shardable(self)
        self.strategy = ShardedStrategy(self)
        self.parameters_replaced()
        self.audit = Audit(self.candidates, self.patch)
        if self.reduce_statistics is None:
            self.reduce_statistics = distributed.RankSync(self.strategy.group)
        if self.gradient_hooks:  # the hooks of the parameters FSDP2 replaced never fire: hook the shards
            self.gradient_hooks.detach()
            self.gradient_hooks.attach()

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

    # -- forward -----------------------------------------------------------------------------------------------
    def _on_forward(self):
        # A forward with gradients starts a new step, also in eval mode (a model trained without dropout).
        if not torch.is_grad_enabled():
            return
        self._cycle_drawn = False
        self._depth = 0
        self.strategy.drop_pending()  # a step whose optimizer raised
        self.checks.stepped = set()
        if self.on_graph is not None:
            self.on_graph()
        self._check_setup()
        if self.sparse is not None:
            self._prepare_sparse_backward()
        self.audit.verify(context=BYPASS_HINT)  # every entry, against its base checksum (a pass of a few ms)
        if self.progress.backward_seen:
            self._after_backward_without_step()
        self.progress.forwards += 1

    def _prepare_sparse_backward(self) -> None:
        """Whether this forward's step reuses its mask, and so gets the sparse backward (`sparse_backward`)."""
        sparse = self.sparse
        reuse = self.reuses_mask()
        if reuse and self.reduce_statistics is None and distributed.world_size() == 1:
            self.tracker.skip_forward()  # μ only serves a draw (under DDP the ranks' reductions must stay paired)
        sparse.active = reuse and not self.sharded
        if sparse.active:
            sparse.begin(self.last_draw)
            # Summed sparsely where the gradients stay with StocTuning; dense where an optimizer or DDP needs them.
            sparse.sparse_sums = self.lean is not None and distributed.world_size() == 1

    def _after_backward_without_step(self) -> None:
        """A forward after a backward, with no optimizer step in between: gradient accumulation, or a step that
        was abandoned (skipped by a gradient scaler, or its gradients set to None)."""
        grads = [c.param.grad for c in self.candidates]
        if any(isinstance(g, ConsumedGrad) and not g.zeroed and not g.sparse for g in grads):
            raise RuntimeError(accumulation_error())
        dropped = all(g is None or (isinstance(g, ConsumedGrad) and not g.sparse) for g in grads)
        if dropped or self.progress.gradients_reset(grads):
            # Abandoned: its statistics must not leak into the next draw.
            self._abandon_step()

    def _abandon_step(self) -> None:
        self.tracker.reset()
        if self.sparse is not None:
            self.sparse.reset()
        self.strategy.abandon()
        self.progress.reset()

    # -- backward ----------------------------------------------------------------------------------------------
    # -- what the strategies draw with -------------------------------------------------------------------------
    def generator(self) -> torch.Generator:
        device = self.candidates[0].param.device
        return torch.Generator(device=device).manual_seed(step_seed(self.config.seed, self.stats.step))

    def reuses_mask(self) -> bool:
        return self.last_draw is not None and self.stats.step % self.config.mask_interval != 0

    def new_stream(self) -> StreamingDraw:
        budgeted = self.max_changed is not None
        return StreamingDraw(
            [c.param for c in self.candidates],
            self.k,
            self.config.selection,
            self.generator(),
            fixed=self.last_draw if self.reuses_mask() else None,
            changed=[self.patch.index.get(c.name) for c in self.candidates] if budgeted else None,
            max_new=max(0, self.max_changed - self.patch.count) if budgeted else None,
        )

    def sync_statistics(self):
        sync = self.reduce_statistics if self.reduce_statistics is not None else distributed.default_sync()
        if sync is not None:
            sync(self.tracker)
        return sync

    def skip(self, optimizer, reason: str | None) -> None:
        """Nothing changes in this step: no draw, no update, no step counted; μ starts afresh."""
        if reason is not None:
            warn_at_user(f"StocTuning: optimizer step {self.stats.step + 1} skipped: {reason}")
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        for candidate in self.candidates:
            candidate.param.grad = None
        self._abandon_step()
        self._cycle_drawn = True

    # -- the optimizer step: draw → confine → update -----------------------------------------------------------
    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer is about to step: draw, then confine its step to the drawn entries."""
        self._depth += 1
        if self._cycle_drawn:  # another optimizer in a step already drawn
            if self._depth == 1:
                self.checks.refuse_second_optimizer(optimizer)
            self.strategy.join(optimizer)
            return
        drawn = self.draw(optimizer)
        if drawn is not None:
            self.confine(drawn, optimizer)

    def draw(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
        """The flat indices of each candidate's drawn entries (the mask kept under `mask_interval`), or None when the
        step is skipped (gradients not finite, or skipped by a gradient scaler): then nothing changes."""
        self._check_setup()
        self.audit.verify_touched(context=BYPASS_HINT)
        self.checks.refuse_unconfinable(optimizer)
        self.checks.stepped = self.checks.held(optimizer)
        self._choose_strategy(optimizer)
        if skipped_by_scaler(optimizer):
            self.skip(optimizer, reason=None)
            return None
        self._fresh = not self.reuses_mask()  # (before the strategy's draw: the step count decides)
        return self.strategy.draw(optimizer)

    def _choose_strategy(self, optimizer) -> None:
        """The lean strategies reproduce torch.optim SGD, Adam and AdamW: another optimizer gets the dense one (or is
        refused where only a lean strategy can train)."""
        if self.lean is None:
            return
        if sparse_optim.kind_of(optimizer) is None:
            if self.sharded:
                raise distributed.UnsupportedDistributedSetup(
                    f"Under FSDP2, StocTuning applies the update of torch.optim SGD, Adam or AdamW to the drawn "
                    f"entries of each shard itself; it cannot do so for {type(optimizer).__name__}."
                )
            self.strategy = DenseStrategy(self, given=self.strategy.leave(optimizer))
            return
        self.strategy.check(optimizer)

    def confine(self, drawn: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Confine the optimizer's step to the drawn entries (how depends on the strategy); the step counts from
        here (a refusal while confining leaves the count as it was)."""
        self.strategy.confine(drawn, optimizer)
        self.draws += self._fresh
        self._drew_now = self._fresh
        self.last_draw = drawn
        if not self.sharded:
            self.stats.drawn = int(sum(d.numel() for d in drawn))
        self.stats.step += 1
        self._cycle_drawn = True

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer has stepped: the update of the drawn entries completed and checked."""
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return  # an optimizer stepped inside another's step: finish when the outer one (and its broadcast) ends
        self.update(optimizer)

    def update(self, optimizer: torch.optim.Optimizer) -> None:
        """Complete the update (the lean strategies apply it here), check it, and close the step."""
        self.strategy.update(optimizer)
        self.stats.changed = self.strategy.changed_count()
        self.stats.optimizer_state_bytes = state_bytes(optimizer, self.candidates, self.state_key)
        if self.sparse is not None:
            self.sparse.reset()
            if self._drew_now and not self.sharded:  # tap the weights the draw found used only through modules
                self.sparse.install([self.tracker.followed(c) for c in self.candidates])
        self._drew_now = False
        self.progress.stepped()
        self.strategy.finish()
        self.tracker.reset()
