"""From a model and a call's inputs to its graph variants: capture, then the pass pipelines (`passes/pipelines.py`).

`build_variants` is what an `Executor` (`runtime/executor.py`) is given to build the variants of each new input
signature: `CompiledUNet` captures the model through its adapter, the torch.compile backend a dynamo graph through
an adapter of the graph.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from .adapters import ModelAdapter
from .capture import capture
from .dump import GraphDump
from .ir import CONTROL_KINDS
from .passes.insert_record_taps import cache_refs
from .passes.manager import PassManager
from .passes.pipelines import control_passes, record_passes, sparse_passes
from .policy import Policy
from .runtime.executor import Variants


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph (node names and meta dicts copied) that shares `gm`'s parameters."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        values[node] = graph.node_copy(node, lambda n: values[n])
    graph._codegen = gm.graph._codegen  # pytree in/out handling; never mutated, so shared
    return fx.GraphModule(gm, graph)


def build_variants(adapter: ModelAdapter, inputs: dict[str, Any], policy: Policy, observers=()) -> Variants:
    """Capture the adapter's model for `inputs` and run the variants' pass pipelines. The sparse variant is built
    first: the others record exactly what it reads."""
    captured = capture(adapter, inputs)
    dump = GraphDump.for_inputs(policy, inputs)  # None unless Policy.dump_dir or $FISEDIT_DUMP_DIR is set
    if dump is not None:
        dump.captured(captured)
        observers = [*observers, dump]
    sparse, sparse_log = PassManager("sparse", sparse_passes(policy), observers)(copy_graph_module(captured))
    logs = {"sparse": sparse_log}
    refs = cache_refs(sparse)
    reuse = None
    if policy.deep_reuse_interval > 1:
        reuse, logs["reuse"] = PassManager("reuse", sparse_passes(policy, reuse_call=True), observers)(
            copy_graph_module(captured))
        refs |= cache_refs(reuse)
    # "reused": handed from call to call, never recorded; maps and layout features: recorded by the ops that
    # compute them, in the calls that record maps
    refs = {ref for ref in refs if ref.kind != "reused" and ref.kind not in CONTROL_KINDS}
    layout = adapter.layout_module
    record, logs["record"] = PassManager("record", record_passes(refs, layout), observers)(
        copy_graph_module(captured))
    control, logs["control"] = PassManager("control", control_passes(refs, layout), observers)(
        copy_graph_module(captured))
    if dump is not None:
        dump.finish()
    return Variants(captured, record, control, sparse, logs, reuse=reuse, backend=policy.program_backend)
