"""No module of the package reaches a private name of anything but itself: other libraries' private APIs go through
`peft_stoc.compat` (with its version guards), and no module reads another class's private attributes."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peft_stoc"
EXEMPT = "compat"  # the one package that reaches other libraries' private names
OWN_MODULES = {"_peft_stoc_autoload"}  # the project's own import hook (a top-level module, private by name only)
ATTRIBUTE_FUNCTIONS = {"getattr", "hasattr", "setattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own(node: ast.expr) -> bool:
    """`self`, `cls` or `super()`: an object's own private names (and overrides extending a base's hook)."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _private_module(name: str) -> bool:
    return name not in OWN_MODULES and any(_private(part) for part in name.split("."))


def _findings(node: ast.AST) -> str | None:
    """The private access at `node`, as source text, or None."""
    if isinstance(node, ast.Attribute) and _private(node.attr) and not _own(node.value):
        return ast.unparse(node)  # x._name, torch.ops.aten._foreach_mul_, torch._foreach_norm
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ATTRIBUTE_FUNCTIONS
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _private(node.args[1].value)
        and not _own(node.args[0])
    ):
        return ast.unparse(node)  # getattr(x, "_name", ...)
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        module = node.module or ""
        if _private_module(module) or any(_private(alias.name) for alias in node.names):
            return ast.unparse(node)  # from a._b import c, from a import _c
    if isinstance(node, ast.ImportFrom) and any(_private(alias.name) for alias in node.names):
        return ast.unparse(node)  # from .x import _y
    if isinstance(node, ast.Import) and any(_private_module(alias.name) for alias in node.names):
        return ast.unparse(node)  # import a._b
    return None


def private_accesses(path: Path, shown: str) -> list[str]:
    """'shown:line: expression' for every private access in the module at `path`, in line order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        text = _findings(node)
        if text is not None:
            found.append((node.lineno, node.col_offset, f"{shown}:{node.lineno}: {text}"))
    return [line for *_, line in sorted(found)]


def test_the_scan_finds_each_kind_of_private_access(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch._dynamo\n"
        "from torch.distributed._composable_state import state\n"
        "from peft.utils import _get_submodules\n"
        "from .tracking import _warn_once\n"
        "from _peft_stoc_autoload import after_import\n"
        "x = module._parameters\n"
        "y = getattr(state, '_shared_state', {})\n"
        "z = torch.ops.aten._foreach_zero_.default\n"
        "ok = (self._a, cls._b, super()._c(), module.__dict__, getattr(self, '_d'), getattr(x, 'name'))\n"
    )
    found = [line.split(": ", 1)[1] for line in private_accesses(sample, "sample.py")]
    assert found == [
        "import torch._dynamo",
        "from torch.distributed._composable_state import state",
        "from peft.utils import _get_submodules",
        "from .tracking import _warn_once",
        "module._parameters",
        "getattr(state, '_shared_state', {})",
        "torch.ops.aten._foreach_zero_",
    ]


def test_no_module_reaches_private_names_outside_compat():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != EXEMPT)
    assert len(modules) > 40
    found = [line for path in modules for line in private_accesses(path, str(path.relative_to(PACKAGE.parent)))]
    assert found == [], "private names reached outside peft_stoc/compat:\n" + "\n".join(found)
