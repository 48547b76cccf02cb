"""Hooks that a tensor holds without keeping their owner alive.

A hook registered on a parameter is held by autograd's C++ side, which the garbage collector cannot see through:
a hook that referenced its engine strongly would close a cycle (parameter → hook → engine → parameter) that is never
collected, and a dropped model would keep its weights, and any process group its wrapper holds, until the process
exits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable


def weak_call(method: Callable, *bound) -> Callable:
    """`method(*bound, *args)` while `method`'s object lives; nothing once it is gone."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        owner_method = ref()
        return None if owner_method is None else owner_method(*bound, *args)

    return call
