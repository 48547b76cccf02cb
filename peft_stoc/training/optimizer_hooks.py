"""torch's global optimizer-step hooks, which reach every `torch.optim.Optimizer` — plain loops, transformers
`Trainer`, accelerate's wrapped optimizers — and run the two halves of the `StocTuningStep` of each engine that owns
its parameters around its step (installed when the first adapter starts training).
"""

from __future__ import annotations

import weakref

import torch

from .. import compat
from ..distributed import ranks as distributed

ENGINES: weakref.WeakSet = weakref.WeakSet()  # engines of adapters being trained
PAUSED: weakref.WeakSet = weakref.WeakSet()  # engines of adapters not trained right now (disabled, inactive)
_HOOK_HANDLES: list = []


def ensure_installed() -> None:
    if _HOOK_HANDLES:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _HOOK_HANDLES.append(register_optimizer_step_pre_hook(_before_any_step))
    _HOOK_HANDLES.append(register_optimizer_step_post_hook(_after_any_step))


def _steps_of(optimizer) -> list:
    """The steps of the running engines that own the optimizer's parameters, unless a `StocTuningStep.step()` is
    stepping it already."""
    return [e.step_for(optimizer) for e in list(ENGINES) if e.owns(optimizer) and optimizer not in e.explicit]


def _before_any_step(optimizer, args, kwargs):
    steps = _steps_of(optimizer)
    if not steps and not any(optimizer in e.explicit for e in list(ENGINES)):
        # (with an adapter in training, its own checks cover the parameters it does not train)
        for engine in list(PAUSED):
            if engine.owns(optimizer):
                engine.refuse_paused_step()
    for step in steps:
        step.begin()


def _after_any_step(optimizer, args, kwargs):
    for step in _steps_of(optimizer):
        step.end()


_WATCHED_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()


def watch_checkpoints(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, with the way out, optimizer state dicts that cannot hold the sparse state (see `_refuse_in_dcp`)."""
    if optimizer not in _WATCHED_OPTIMIZERS:
        _WATCHED_OPTIMIZERS.add(optimizer)
        optimizer.register_state_dict_post_hook(_refuse_in_dcp)


def _refuse_in_dcp(optimizer, state_dict):
    # torch.distributed.checkpoint maps every key of `optimizer.state_dict()["state"]` to a parameter name and fails
    # with a bare KeyError on the sparse state's string key; a sharded checkpoint could not place it anyway (it
    # belongs to no single parameter, and under FSDP2 each rank holds the part of its rows).
    keys = [key for key in state_dict["state"] if isinstance(key, str) and key.startswith("peft_stoc")]
    frame = compat.caller_frame(1)
    while keys and frame is not None:
        if frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
            raise distributed.UnsupportedDistributedSetup(
                f"StocTuning keeps its sparse optimizer state (the moments of the changed entries) under the key "
                f"{keys[0]!r} of `optimizer.state`, which belongs to no single parameter: "
                "torch.distributed.checkpoint's optimizer state dicts (`get_optimizer_state_dict`, which "
                "accelerate's `save_state` and Trainer's checkpoints use under FSDP) cannot hold it. Save the "
                "adapter with `save_pretrained` (Trainer: `save_only_model=True` or `save_strategy='no'`); to "
                "resume with the optimizer state, save each process's `optimizer.state_dict()` and the model's "
                "`state_dict()` with `torch.save` and load them on as many processes (docs/distributed.md, Saving)."
            )
        frame = frame.f_back
    return None
