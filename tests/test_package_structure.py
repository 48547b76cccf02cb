"""The package's shape: no module imports another that imports it back, directly or in a loop."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peft_stoc"


def _imports() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[name] = found & modules
    return graph


def test_no_import_cycles_between_modules_of_the_package():
    graph = _imports()
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join(path + [nxt]))
                elif nxt not in path:
                    stack.append((nxt, path + [nxt]))
    assert cycles == []
