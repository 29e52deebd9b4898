"""The floors of the house (issue 40), read from the package's source with `ast`: short functions, a thin user API,
and no module-level mutable state besides registries. The import floors are `tests/test_layering.py`'s."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fisedit_compiler"
MAX_FUNCTION_LINES = 60
THIN = {"compiler.py": 250, "backend.py": 250}  # the two entry points: each holds an executor, nothing more

# Module-level containers that code fills at run time: registries, each filled by its registering function.
REGISTRIES = {
    ("ir/ops.py", "IR_OPS"), ("ir/ops.py", "WRITES"),  # @ir_op
    ("runtime/ops.py", "LOWERINGS"),  # @register_lowering
    ("passes/annotate_spatial_layout.py", "LAYOUT_RULES"),  # @layout_rule
    ("passes/annotate_spatial_layout.py", "FAMILY_RULES"),
    ("adapters/base.py", "_ADAPTERS"),  # register_adapter
    ("kernels/registry.py", "DIRECT_CALLS"),  # custom_op
}
# Module-level variables that functions rebind (`global`), each with why it is process state.
PROCESS_STATE = {
    ("environment.py", "_current"): "the environment variables, read once (environment.reread() reads them again)",
    ("runtime/memory.py", "_retained"): "mirrors glibc's malloc settings, which are process-wide",
}
MUTATING_METHODS = {"append", "add", "update", "setdefault", "pop", "popitem", "clear", "extend", "insert", "remove",
                    "discard", "__setitem__"}
STATE_TYPES = {"ContextVar", "WeakKeyDictionary", "WeakValueDictionary", "local"}  # per-run state, never at module level


def sources() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in sources() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "functions over 60 lines: split them\n" + "\n".join(long)


def test_the_entry_points_are_thin():
    for name, limit in THIN.items():
        lines = len((PACKAGE / name).read_text().splitlines())
        assert lines <= limit, f"{name} has {lines} lines (at most {limit}): its logic belongs below it"


def module_containers(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None))
                in {"dict", "list", "set", "defaultdict", "Counter", "OrderedDict", "deque"})
            if mutable:
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def mutated_names(tree: ast.Module) -> set[str]:
    """Names mutated anywhere in the module: `N[k] = v`, `del N[k]`, `N.append(...)` and the like."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            found |= {t.value.id for t in targets if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in MUTATING_METHODS and isinstance(node.func.value, ast.Name):
            found.add(node.func.value.id)
    return found


def test_module_level_state_is_registries_only():
    filled, rebound, per_run = [], [], []
    for name, tree in sources():
        for var in sorted(module_containers(tree) & mutated_names(tree)):
            if (name, var) not in REGISTRIES:
                filled.append(f"{name}: {var}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                rebound += [f"{name}: {var}" for var in node.names if (name, var) not in PROCESS_STATE]
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                func = node.value.func
                if getattr(func, "id", getattr(func, "attr", None)) in STATE_TYPES:
                    per_run.append(f"{name}:{node.lineno}")
    assert not filled, "module-level containers filled at run time (not a registry): " + ", ".join(filled)
    assert not rebound, "module-level variables rebound with `global`: " + ", ".join(rebound)
    assert not per_run, "per-run state at module level (give it an owner): " + ", ".join(per_run)


def test_the_checker_sees_a_module_level_cache(tmp_path, monkeypatch):
    """A dict at module level that a function fills is found; a constant table read only is not."""
    (tmp_path / "thing.py").write_text(
        "_SEEN = {}\nTABLE = {1: 2}\n\n\ndef f(k):\n    _SEEN[k] = TABLE[1]\n    return _SEEN\n")
    tree = ast.parse((tmp_path / "thing.py").read_text())
    assert module_containers(tree) & mutated_names(tree) == {"_SEEN"}
