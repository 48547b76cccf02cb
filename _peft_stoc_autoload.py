"""Registers peft-stoc with PEFT as soon as PEFT is imported.

PEFT has no plugin entry point, so a saved StocTuning adapter could only be loaded in processes that imported
`peft_stoc` first. The `peft_stoc_autoload.pth` file installed next to this module imports it at interpreter start.
Every Python process of the environment pays for that import, so it imports nothing (not even `importlib.abc`) and
only puts a finder on `sys.meta_path`, which watches for `peft` and steps aside once it has seen it.
"""

import sys

_pending: dict = {}


class _Loader:
    """Runs the real loader, then the callbacks waiting for the module."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # The module is complete; importlib would clear this flag right after we return.
        module.__spec__._initializing = False
        _fire(self._name)

    def __getattr__(self, attribute):
        return getattr(self._loader, attribute)


class _Finder:
    """A `sys.meta_path` finder that finds nothing itself: it wraps the loader of a watched module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_FINDER = _Finder()


def _fire(name: str) -> None:
    for callback in _pending.pop(name, []):
        try:
            callback()
        except Exception as error:  # never break the import of the watched module
            import warnings

            warnings.warn(f"peft-stoc could not register itself after importing {name}: {error}", stacklevel=2)
    if not _pending and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def after_import(name: str, callback) -> None:
    """Call `callback()` once module `name` is imported (right away if it already is).

    A module that is still initialising can no longer be watched: the callback is then not called.
    """
    module = sys.modules.get(name)
    if module is not None:
        if not getattr(getattr(module, "__spec__", None), "_initializing", False):
            callback()
        return
    _pending.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _import_peft_stoc() -> None:
    try:
        import peft_stoc  # noqa: F401
    except ModuleNotFoundError as error:  # the package was uninstalled and left this module behind
        if error.name != "peft_stoc":
            raise


after_import("peft", _import_peft_stoc)
