"""Forward-hook bodies that `torch.compile` calls as they are, through one opaque custom op.

StocTuning's forward hooks keep Python state per forward (token scopes, caches keyed by tensor identity, the step's
counters) that dynamo cannot trace. While a model is being compiled, a hook hands the tensors it reads to the custom
op `peft_stoc::run_hook`; the compiled graph calls the op with the real tensors, and the op runs the hook's body
eagerly. The graph holds only the call: no graph break, and nothing the body reads becomes a guard, so arming the
statistics or switching adapters does not recompile.
"""

import copy
import itertools
import weakref
from collections.abc import Callable
from typing import Optional

import torch

# Weakly: a body lives as long as the hook that calls it, not as long as the process (it may hold a whole model).
_BODIES: "weakref.WeakValueDictionary[int, OpaqueBody]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()
# The op returns nothing: mutating this buffer is what keeps the compiler from dropping the call as dead code.
_SINK = torch.zeros(1)


@torch.library.custom_op("peft_stoc::run_hook", mutates_args=("sink",))
# The op's schema is read from these annotations at runtime: no postponed annotations in this module.
def _run_hook(key: int, tensors: list[Optional[torch.Tensor]], grad_enabled: bool, sink: torch.Tensor) -> None:  # noqa: UP045
    call = _BODIES.get(key)
    if call is not None:  # a hook removed since the graph was compiled: its module's hooks changed, dynamo recompiles
        # A compiled forward runs with gradients off; the body sees the grad mode of the forward it belongs to.
        with torch.set_grad_enabled(grad_enabled):
            call.body(*tensors)


@_run_hook.register_fake
def _(key, tensors, grad_enabled, sink) -> None:
    return None


class OpaqueBody:
    """`body(*tensors)`, called directly in eager mode and through `peft_stoc::run_hook` while compiling."""

    def __init__(self, body: Callable[..., None]):
        self.body = body
        self.key = next(_KEYS)
        _BODIES[self.key] = self

    def __deepcopy__(self, memo) -> "OpaqueBody":
        # A copy has a key of its own: releasing it must not release the original's body.
        return OpaqueBody(copy.deepcopy(self.body, memo))

    def __call__(self, *tensors: torch.Tensor | None) -> None:
        if torch.compiler.is_compiling():
            torch.ops.peft_stoc.run_hook(self.key, list(tensors), torch.is_grad_enabled(), _SINK)
        else:
            self.body(*tensors)

    def release(self) -> None:
        _BODIES.pop(self.key, None)


class HookSet:
    """Forward hooks on modules whose bodies run through `OpaqueBody`; `select` picks the tensors a body reads
    from the call (traceable code only: attribute lookups, isinstance and shape checks)."""

    def __init__(self):
        self._handles: list = []
        self._bodies: list[OpaqueBody] = []

    def __bool__(self) -> bool:
        return bool(self._handles)

    def before(self, module: torch.nn.Module, body: Callable[..., None], select, prepend: bool = False) -> None:
        """`body(*select(module, args, kwargs))` before `module`'s forward."""
        call = self._body(body)
        self._handles.append(
            module.register_forward_pre_hook(
                lambda m, args, kwargs: call(*select(m, args, kwargs)), with_kwargs=True, prepend=prepend
            )
        )

    def after(self, module: torch.nn.Module, body: Callable[..., None], select, always_call: bool = False) -> None:
        """`body(*select(module, args, kwargs, output))` after `module`'s forward."""
        call = self._body(body)
        self._handles.append(
            module.register_forward_hook(
                lambda m, args, kwargs, output: call(*select(m, args, kwargs, output)),
                with_kwargs=True,
                always_call=always_call,
            )
        )

    def _body(self, body: Callable[..., None]) -> OpaqueBody:
        call = OpaqueBody(body)
        self._bodies.append(call)
        return call

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for call in self._bodies:
            call.release()
        self._handles.clear()
        self._bodies.clear()


def nothing(*_) -> tuple:
    """A selector for bodies that read no tensor of the call."""
    return ()
