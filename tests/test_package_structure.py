"""The package's shape: no module imports another that imports it back, directly or in a loop."""

import ast
import inspect
import sysconfig
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peft_stoc"


def _target(parts: list[str], names: list[str]):
    """The package's module(s) an absolute import of `parts` (and, for `from … import`, `names`) reaches."""
    return {parts[1]} if len(parts) > 1 else {"__init__", *names}


def _imports() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):  # import peft_stoc[.x]
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE.name:
                        found |= _target(alias.name.split("."), [])
            elif isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE.name:
                found |= _target(node.module.split("."), [a.name for a in node.names])  # from peft_stoc[.x] ...
        graph[name] = found & modules
    return graph


def test_no_import_cycles_between_modules_of_the_package():
    graph = _imports()
    assert "__init__" in graph["cli"], "absolute imports of the package are part of the graph"
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


def _functions(value):
    """The plain functions behind a class attribute (a method, classmethod, staticmethod or property)."""
    if isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if f is not None]
    return [value] if inspect.isfunction(value) else []


def test_no_peft_model_method_is_monkey_patched(tmp_path):
    """Every method of PEFT's model classes, once peft_stoc was imported and a StocTuning model made, saved and
    loaded, is code from PEFT's own files or the standard library's decorators (a wrapper keeps the name and module
    of what it wraps, not its code)."""
    import peft
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.peft_model import PeftModel

    from tests.helpers import tiny_model, train_stoc

    train_stoc(k=20, steps=1).save_pretrained(tmp_path)
    PeftModel.from_pretrained(tiny_model(), tmp_path).print_trainable_parameters()

    homes = [Path(peft.__file__).resolve().parent, Path(sysconfig.get_paths()["stdlib"]).resolve()]
    foreign, checked = [], 0
    for cls in {PeftModel, *MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()}:
        for name, value in vars(cls).items():
            for function in _functions(value):
                checked += 1
                if not any(home in Path(function.__code__.co_filename).resolve().parents for home in homes):
                    foreign.append(f"{cls.__name__}.{name} ({function.__code__.co_filename})")
    assert checked > 50
    assert foreign == []


def test_only_stoc_tuning_models_get_the_stoc_tuning_class():
    import copy

    import torch
    from peft import LoraConfig, PeftModelForSequenceClassification, get_peft_model

    from peft_stoc import StocTuningConfig
    from peft_stoc.integration.peft_model import StocTuningPeftModel
    from tests.helpers import tiny_model

    lora = get_peft_model(tiny_model(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert type(lora) is PeftModelForSequenceClassification
    stoc = get_peft_model(tiny_model(), StocTuningConfig(k=10, task_type="SEQ_CLS"))
    assert isinstance(stoc, PeftModelForSequenceClassification) and isinstance(stoc, StocTuningPeftModel)
    assert type(stoc).__mro__[1:3] == (StocTuningPeftModel, PeftModelForSequenceClassification)
    # A copy (TRL's reference model is one) keeps the class, and with it the overrides.
    twin = copy.deepcopy(stoc)
    assert type(twin) is type(stoc)
    inputs = torch.tensor([[1, 2, 3, 4]])
    stoc.eval(), twin.eval()
    assert torch.equal(stoc(input_ids=inputs).logits, twin(input_ids=inputs).logits)
