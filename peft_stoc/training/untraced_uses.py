"""Uses of a candidate the forward hooks could not follow (a part of `tracking.ActivationTracker`): a parameter that
got a gradient although none of its traced modules ran, a tied table whose head was read around its module, and
modules whose inputs are not traced. Such uses get μ = 1 (importance |weight * gradient|), with one warning per model
that points at the user's line.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..tuner.candidates import Candidate, UseKind
from .user_warnings import warn_at_user


class UntracedUses:
    """Finds, once per step, the candidates this step's forwards used around the modules traced for them."""

    def _bypassed(self, candidate: Candidate) -> bool:
        """The parameter got a gradient this step, yet none of the modules we trace ran: it was used around them."""
        traced = [use for use in candidate.uses if use.kind is not UseKind.CONSTANT]
        if not traced or not self._forwards:
            return False
        if any((acc := self._sums.get(id(use.module))) is not None and acc.total is not None for use in traced):
            return False
        if any(id(use.module) in self._untraced for use in traced):
            return False
        grad = candidate.param.grad
        if grad is not None and hasattr(grad, "to_local"):
            grad = grad.to_local()  # an FSDP2 shard's gradient: this process's rows
        return grad is not None and bool(grad.any())

    def _fallbacks(self) -> set[int]:
        """Parameters (by id) used around their modules this step; one warning names them and the tensors read through
        modules whose use could not be followed (row lookups, a projection through a fused head), with their share of
        the candidate entries."""
        if self._bypassed_now is None:
            bypassed = [c for c in self.candidates if self._bypassed(c)]
            self._bypassed_now = {id(c.param) for c in bypassed}
            unfollowed = bypassed + [
                c
                for c in self.candidates
                if id(c.param) not in self._bypassed_now and any(id(use.module) in self._untraced for use in c.uses)
            ]
            names = {
                self._named_share(c, [u for u in c.uses if u.kind is not UseKind.CONSTANT and u.traced])
                for c in unfollowed
            }
            warn_once(self.root, names, UNTRACED_USES)
        return self._bypassed_now

    def _named_share(self, candidate: Candidate, uses: list) -> str:
        """`candidate`'s name, its share of the candidate entries and the modules it belongs to, for a warning."""
        share = candidate.numel / (sum(c.numel for c in self.candidates) or 1)
        modules = ", ".join(_describe(u.module_name, u.module) for u in uses)
        return f"{candidate.name} ({_share(share)} of the candidate entries, in {modules})"

    def _heads_read_around(self, candidate: Candidate) -> set[int]:
        """Head modules (by id) of a tied table whose weight this step's forwards read without calling them.

        The table's rows were gathered as embeddings, the head never ran, yet rows that no real token gathered have a
        gradient: the head's projection reached them some other way. Found once the gradient is complete (lean memory
        asks for μ then), with one warning naming the tensor."""
        found = self._bypassed_heads.get(id(candidate.param))
        if found is not None:
            return found
        found = set()
        rows = [u for u in candidate.uses if u.kind is UseKind.EMBEDDING_ROW and id(u.module) not in self._untraced]
        idle = [
            u
            for u in candidate.uses
            if u.kind is UseKind.LINEAR_INPUT and id(u.module) not in self._sums and id(u.module) not in self._untraced
        ]
        grad = candidate.param.grad
        if grad is not None and hasattr(grad, "to_local"):
            grad = grad.to_local()
        counts = [self._sums.get(id(u.module)) for u in rows]
        if (
            self._forwards
            and idle
            and counts
            and all(acc is not None and acc.total is not None for acc in counts)
            and type(grad) is torch.Tensor
            and grad.dim() == 2
            and grad.shape[0] == counts[0].total.numel()
        ):
            gathered = sum(acc.total.to(grad.device) for acc in counts) > 0
            if bool(grad[~gathered].any()):
                found = {id(u.module) for u in idle}
                warn_once(self.root, {self._named_share(candidate, idle)}, UNTRACED_USES)
        self._bypassed_heads[id(candidate.param)] = found
        return found

    def followed(self, candidate: Candidate) -> bool:
        """Whether this step's forwards used `candidate` only through the modules traced for it (no use around them,
        no head read without its module)."""
        if any(id(use.module) in self._untraced for use in candidate.uses):
            return False
        return id(candidate.param) not in self._fallbacks() and not self._heads_read_around(candidate)


def _share(fraction: float) -> str:
    return f"{fraction:.2%}" if fraction >= 0.0001 else "<0.01%"


def _describe(name: str, module: nn.Module) -> str:
    return f"{name} ({type(module).__name__})"


def untraced_types(candidates: list[Candidate]) -> set[str]:
    """The modules of `candidates` whose inputs are not traced, described for a warning."""
    return {_describe(use.module_name, use.module) for c in candidates for use in c.uses if not use.traced}


UNTRACED_TYPES = (
    "StocTuning does not trace the inputs of {names}; their parameters get an activation statistic of 1, so their "
    "importance is |weight * gradient|."
)
UNTRACED_USES = (
    "StocTuning could not follow how the forward pass used these tensors: {names}. They were read without calling "
    "their module, or their rows were gathered in a way StocTuning does not recognise; for that use they get an "
    "activation statistic of 1, so their importance is |weight * gradient|."
)

_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> module names already warned about


def warn_once(model: nn.Module, names: set[str], message: str) -> None:
    """Warn about `names` once per model, pointing at the user's line rather than into PEFT or transformers."""
    warned = _WARNED.setdefault(model, set())
    new = sorted(set(names) - warned)
    if new:
        warned.update(new)
        warn_at_user(message.format(names=", ".join(new)))
