"""Warnings that point at the user's line: the first frame outside peft-stoc and the libraries that call it (PEFT,
transformers, torch, accelerate, TRL), wherever in a training step the warning is raised."""

from __future__ import annotations

import os
import sys
import warnings

from .. import compat

_CALLERS = ("peft_stoc", "peft", "transformers", "torch", "accelerate", "trl")


def warn_at_user(message: str) -> None:
    """`warnings.warn(message)` attributed to the user's line."""
    internal = tuple(
        os.path.dirname(module.__file__) + os.sep
        for name, module in list(sys.modules.items())
        if name in _CALLERS and getattr(module, "__file__", None)
    )
    frame, level = compat.caller_frame(1), 2  # level 2: the function calling `warn_at_user`
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
