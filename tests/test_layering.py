"""Imports run downward: each room of the package imports only the rooms below it (docs/design.md, "Rooms").

A room is a top-level module or sub-package of `fisedit_compiler` (`ir`, `kernels`, `runtime`, `passes`, ...).
Every import in the package's source is read with `ast`, function-level (lazy) imports included: a lazy import
still ties the importing room to the imported one, it only hides the circle from the interpreter.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "fisedit_compiler"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# The allowed directions, bottom to top: room -> the rooms it may import (besides itself).
COMPILER = {"capture", "build", "compiler", "backend", "dynamo_graph", "dump", "macs"}  # capture, variants, user API
TOP = {"__init__", "editing", "inspect_cmd", "models", "report", "service"}  # API, sessions, tools, models
ENTRY = {"cli", "app", "serve"}  # the command line, the web app, the HTTP API (the demo: examples/demo.py)
BELOW_COMPILER = {"environment", "ir", "policy", "inputs", "cost_model", "kernels", "runtime", "adapters", "passes"}
ALLOWED: dict[str, set[str]] = {
    "environment": set(),  # the environment variables, read once; every room may read them
    "ir": {"environment"},  # graph annotations, the op vocabulary, gather geometries and index types
    "policy": {"environment", "ir"},  # the user's knobs
    "inputs": {"environment", "ir", "policy"},  # validation of masks and prompts at the API boundary
    "cost_model": {"environment", "ir", "policy"},  # formulas and constants: no kernel, no plan
    "kernels": {"environment", "ir", "policy"},
    "runtime": {"environment", "ir", "policy", "cost_model", "kernels"},
    # calibration: measures kernels; top-only
    "tuning": {"environment", "ir", "policy", "cost_model", "kernels", "runtime"},
    "adapters": {"environment", "ir", "policy"},  # what a model family declares
    # IR ops from ir.ops; their lowerings are the runtime's
    "passes": {"environment", "ir", "policy", "cost_model", "adapters"},
    **{room: BELOW_COMPILER | COMPILER for room in COMPILER},
    **{room: BELOW_COMPILER | COMPILER | TOP | {"tuning"} for room in TOP},
    # The embedded model's data, trainer and evaluator may import anything but the entry points, which alone (with
    # training's own quality code) import it.
    "training": BELOW_COMPILER | COMPILER | TOP | {"tuning"},
    **{room: BELOW_COMPILER | COMPILER | TOP | {"tuning", "training"} | ENTRY for room in ENTRY},
}
ROWS = [{"environment"}, {"ir"}, {"policy"}, {"inputs"}, {"cost_model"}, {"kernels"}, {"adapters"}, {"runtime"},
        {"tuning"}, {"passes"}, COMPILER, TOP, {"training"}, ENTRY]  # bottom to top; rooms of one row may import each other

# Upward imports that exist today and are to go, each with its reason. A new one fails the test; so does one of
# these once it is gone (then delete its line).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def room_of(module: str) -> str:
    """`fisedit_compiler.runtime.ops` -> "runtime"; the package itself -> "__init__"."""
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(module: str) -> bool:
    """Whether `module` (dotted, in this package) is a module or package (not a name defined in one)."""
    path = ROOT.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """The package modules `path` imports, with line numbers, lazy imports included."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # `from . import kernels` imports a module; `from .ir import KEY` a name of one.
            submodules = [f"{target}.{alias.name}" for alias in node.names if is_module(f"{target}.{alias.name}")]
            found += [(m, node.lineno) for m in submodules or [target]]
    return found


def import_edges() -> list[tuple[str, str, str]]:
    """(importing module, imported module, "path:line") for every import between modules of the package."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        for target, line in imports_of(path):
            edges.append((module_name(path), target, f"{path.relative_to(ROOT.parent)}:{line}"))
    return edges


def upward(edges: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [(src, dst, where) for src, dst, where in edges
            if room_of(src) != room_of(dst) and room_of(dst) not in ALLOWED[room_of(src)]]


def test_every_room_has_a_row_in_the_table():
    rooms = {room_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert rooms <= set(ALLOWED), f"rooms missing from ALLOWED: {sorted(rooms - set(ALLOWED))}"


def test_the_table_runs_one_way():
    """Rooms of different rows never allow each other; nothing below the top may import tuning or training."""
    row = {room: i for i, rooms in enumerate(ROWS) for room in rooms}
    assert set(row) == set(ALLOWED)
    mutual = sorted((a, b) for a, allowed in ALLOWED.items() for b in allowed if a in ALLOWED[b] and row[a] != row[b])
    assert not mutual, f"rooms of different rows that may import each other: {mutual}"
    assert all(row[b] <= row[a] for a, allowed in ALLOWED.items() for b in allowed)
    assert {room for room, allowed in ALLOWED.items() if "tuning" in allowed} == TOP | ENTRY | {"training"}
    assert {room for room, allowed in ALLOWED.items() if "training" in allowed} == ENTRY


def test_imports_run_downward():
    found = upward(import_edges())
    new = [f"{where}: {src} imports {dst} ({room_of(src)} -> {room_of(dst)})"
           for src, dst, where in found if (src, dst) not in KNOWN_UPWARD]
    assert not new, "upward imports (see ALLOWED in tests/test_layering.py):\n" + "\n".join(new)
    gone = set(KNOWN_UPWARD) - {(src, dst) for src, dst, _ in found}
    assert not gone, f"no longer imported upward, delete from KNOWN_UPWARD: {sorted(gone)}"


def test_no_import_circle_between_modules():
    """No module reaches itself through imports (lazy ones included)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in import_edges():
        if src != dst:
            graph.setdefault(src, set()).add(dst)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            for dst in sorted(graph.get(module, ())):
                visit(dst, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_kernels_and_the_cost_model_import_no_runtime():
    """The circle this test was written against: kernels -> runtime.mask_plan -> cost_model -> kernels."""
    edges = import_edges()
    for src, dst, where in edges:
        if room_of(src) in {"kernels", "cost_model", "ir"}:
            assert room_of(dst) not in {"runtime", "tuning"}, f"{where}: {src} imports {dst}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """A lazy `from ..runtime import ops` in a kernel module is found, with its line."""
    kernels = tmp_path / PACKAGE / "kernels"
    kernels.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "runtime").mkdir()
    (tmp_path / PACKAGE / "runtime" / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "runtime" / "ops.py").write_text("")
    (kernels / "__init__.py").write_text("from . import fast\n")
    (kernels / "fast.py").write_text("import torch\n\n\ndef f():\n    from ..runtime import ops\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path / PACKAGE)
    found = upward(import_edges())
    assert [(src, dst, where) for src, dst, where in found] == [
        (f"{PACKAGE}.kernels.fast", f"{PACKAGE}.runtime.ops", f"{PACKAGE}/kernels/fast.py:5")
    ]
