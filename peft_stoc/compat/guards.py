"""The guards of `peft_stoc.compat`: the supported versions, `Guard` (one private name and the condition that it is
there as expected) and `IncompatibleLibrary`, the error a failed guard raises."""

from __future__ import annotations

import platform
from collections.abc import Callable

# The versions peft-stoc was written against (pyproject.toml's requirements).
SUPPORTED = {
    "python": ">=3.10",
    "torch": ">=2.5,<3",
    "accelerate": ">=1.0",
    "peft": ">=0.21,<0.22",
    "transformers": ">=4.56",
    "bitsandbytes": ">=0.50,<0.51",
}


def installed_version(library: str) -> str:
    """The installed version of `library` ('python' for the interpreter)."""
    if library == "python":
        return platform.python_version()
    from importlib import metadata

    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


class IncompatibleLibrary(RuntimeError):
    """A private name peft-stoc relies on is missing, or not as expected, in the installed version of a library."""

    def __init__(self, guard: Guard):
        self.guard = guard
        library, supported = guard.library, SUPPORTED[guard.library]
        advice = (
            f"use Python {supported}"
            if library == "python"
            else f"install a version in that range (pip install '{library}{supported}')"
        )
        super().__init__(
            f"peft-stoc needs {guard.private} from {library} to {guard.purpose}, and {library} "
            f"{installed_version(library)} does not have it as expected. peft-stoc supports {library} {supported}: "
            f"{advice}."
        )


class Guard:
    """One private name of another library: what it is, what peft-stoc needs it for, and the condition that it is
    there as expected (a callable, true when it is). `ensure` checks the condition once, then only reads `passed`."""

    def __init__(self, library: str, private: str, purpose: str, condition: Callable[[], object], accessors):
        self.library = library
        self.private = private
        self.purpose = purpose
        self.condition = condition
        self.accessors = tuple(accessors)
        self.passed = False

    def check(self) -> bool:
        """Whether the condition holds (any error while checking it counts as not)."""
        return self._failure() is None

    def ensure(self) -> None:
        """Raise `IncompatibleLibrary` unless the condition holds; checked once."""
        if self.passed:
            return
        failure = self._failure()
        if failure is not None:
            # chained to the error the check met, if any, for whoever debugs a new version of the library
            raise IncompatibleLibrary(self) from (failure if isinstance(failure, Exception) else None)
        self.passed = True

    def _failure(self) -> Exception | bool | None:
        """None when the condition holds; else the error checking it raised, or False."""
        try:
            return None if self.condition() else False
        except Exception as error:
            return error

    def __repr__(self) -> str:
        return f"Guard({self.library}: {self.private})"


GUARDS: dict[str, Guard] = {}  # name -> guard; each guard lists the accessors it covers


def declare(name: str, library: str, private: str, purpose: str, condition, *accessors: str) -> Guard:
    guard = GUARDS[name] = Guard(library, private, purpose, condition, accessors or (name,))
    return guard


def first_module(*names: str):
    """The first of `names` that imports (a private module moved between versions)."""
    import importlib

    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return importlib.import_module(names[-1])


def sets_in_init(cls, attribute: str) -> bool:
    """Whether `cls` has `attribute`, or its `__init__` assigns it (an instance attribute)."""
    return hasattr(cls, attribute) or attribute in cls.__init__.__code__.co_names
