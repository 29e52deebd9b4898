"""Insert region boundaries: gathers where data enters a sparse region, scatters where it leaves.

    %h : aten.conv2d(%x_dense, ...)         (dense, at a sparse resolution)
    %y : aten.silu(%h)                      (sparse)
    %z : aten.conv2d(%y, ...)               (dense: its output is at a dense resolution)
->
    %h : aten.conv2d(%x_dense, ...)
    %h_gathered : gather_active(%h, layout)
    %y : aten.silu(%h_gathered)
    %y_full : scatter_into_recorded(%y, cache[y], layout)
    %z : aten.conv2d(%y_full, ...)

Inside a region every spatial value is gathered; a full-size tensor appears only where a dense node (or the
graph's output, or a sparse node's FULL_INPUTS) reads a sparse value: it is the recorded tensor of that node with
the fresh active blocks written over it.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE, CacheRef, SpatialLayout
from ..ir import ops as ir_ops
from .find_sparse_regions import FULL_INPUTS


def _spatial(node: fx.Node) -> bool:
    return isinstance(node.meta.get(LAYOUT), SpatialLayout)


def insert_region_boundaries(gm: fx.GraphModule) -> int:
    graph = gm.graph
    gathers: dict[fx.Node, fx.Node] = {}
    scatters: dict[fx.Node, fx.Node] = {}

    def boundary(source: fx.Node, cache: dict, op, args: tuple) -> fx.Node:
        if source not in cache:
            with graph.inserting_after(source):
                node = graph.call_function(op, (source, *args))
            node.meta[LAYOUT] = source.meta[LAYOUT]
            node.meta[SPARSE] = op is ir_ops.gather_active  # a gather's output is gathered, a scatter's full
            cache[source] = node
        return cache[source]

    for node in list(graph.nodes):
        sparse = node.meta.get(SPARSE, False)
        needs_full = node.meta.get(FULL_INPUTS, set()) if sparse else set()
        for source in list(node.all_input_nodes):
            if not _spatial(source):
                continue
            source_sparse = source.meta.get(SPARSE, False)
            layout = source.meta[LAYOUT]
            if sparse and not source_sparse:
                new = boundary(source, gathers, ir_ops.gather_active, (layout,))
            elif source_sparse and (not sparse or source in needs_full):
                new = boundary(source, scatters, ir_ops.scatter_into_recorded, (CacheRef.of(source), layout))
            else:
                continue
            node.replace_input_with(source, new)
    return len(gathers) + len(scatters)


def regions_entered_and_left_through_boundaries(gm: fx.GraphModule) -> list[str]:
    """Postcondition: sparse values are read by sparse nodes and scatters only, dense pixels by dense nodes and
    gathers only, except that a sparse node may read a scatter's full-size output (its FULL_INPUTS)."""
    problems = []
    for node in gm.graph.nodes:
        sparse = node.meta.get(SPARSE, False)
        for source in node.all_input_nodes:
            if not _spatial(source) or source.meta.get(SPARSE, False) == sparse:
                continue
            if sparse and node.target is not ir_ops.gather_active \
                    and source.target is not ir_ops.scatter_into_recorded:
                problems.append(f"sparse {node.name} reads dense {source.name} without a gather")
            elif not sparse and node.target is not ir_ops.scatter_into_recorded:
                problems.append(f"dense {node.name} reads sparse {source.name} without a scatter")
    return problems
