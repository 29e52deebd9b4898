"""Pass infrastructure: a pass is a named function over an `fx.GraphModule`; the manager runs a declared sequence,
checks each pass's requirements, lints the graph after each, and reports what each pass did."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch.fx as fx

log = logging.getLogger("fisedit_compiler.passes")


@dataclasses.dataclass(frozen=True)
class FxPass:
    """A graph pass. `requires` names passes that must have run before it (in this pipeline); `postcondition`
    lists what the graph still has that the pass should have removed (checked after the pass: empty = holds)."""

    name: str
    run: Callable[[fx.GraphModule], int]
    requires: tuple[str, ...] = ()
    postcondition: Callable[[fx.GraphModule], list[str]] | None = None


@dataclasses.dataclass
class PassRecord:
    """One pass's run, as reported by the manager and written by graph dumps."""

    variant: str
    name: str
    rewrites: int
    seconds: float
    nodes_before: int
    nodes_after: int
    ops_before: Counter
    ops_after: Counter


def op_counts(gm: fx.GraphModule) -> Counter:
    """Count call_function nodes by target name (``aten.conv2d.default``, ``gather_windows``, ...)."""
    return Counter(target_name(n.target) for n in gm.graph.nodes if n.op == "call_function")


def target_name(target: object) -> str:
    if hasattr(target, "_schema") or hasattr(target, "_overloadname"):
        return str(target)
    return getattr(target, "__name__", str(target))


class PassError(RuntimeError):
    """A pass failed or left an invalid graph. Passes raise subclasses for problems with the user's model (they
    propagate as they are); anything else a pass raises is wrapped in a PassError that names the pass."""


class PassManager:
    """Runs the passes that make graph variant `variant`, in order. `observers` are called as
    ``observer(record, graph_module)`` after each pass (graph dumps use this)."""

    def __init__(self, variant: str, passes: Sequence[FxPass], observers: Sequence[Callable] = ()):
        self.variant = variant
        self.passes = list(passes)
        self.observers = list(observers)

    def __call__(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, list[PassRecord]]:
        done: set[str] = set()
        records = []
        for p in self.passes:
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise PassError(f"pass {p.name!r} requires {missing} to run before it")
            before, nodes_before = op_counts(gm), len(gm.graph.nodes)
            start = time.perf_counter()
            try:
                rewrites = p.run(gm)
                gm.graph.lint()
            except PassError:
                raise
            except Exception as e:
                raise PassError(f"pass {p.name!r} failed: {e}") from e
            problems = p.postcondition(gm) if p.postcondition is not None else []
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise PassError(f"pass {p.name!r} left its postcondition unmet: {'; '.join(problems[:3])}{more}")
            gm.recompile()
            record = PassRecord(
                self.variant, p.name, rewrites, time.perf_counter() - start, nodes_before, len(gm.graph.nodes), before,
                op_counts(gm),
            )
            log.debug("%s/%s: %d rewrites in %.3fs", self.variant, p.name, rewrites, record.seconds)
            records.append(record)
            for observer in self.observers:
                observer(record, gm)
            done.add(p.name)
        return gm, records
