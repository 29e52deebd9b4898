"""Cached GroupNorm: sparse GroupNorm becomes a per-channel affine map with the source run's statistics.

    %gn : aten.group_norm(%x, 8, %w, %b, 1e-05)                       (sparse)
->
    %gn : group_norm_recorded_stats(%x, 8, %w, %b, cache[gn:stats])

GroupNorm's mean and variance span the whole map, which a gathered tensor does not have; reusing the recorded
ones (the paper's approximate normalisation, `Policy.norm_stats="recorded"`) makes it local. With
`norm_stats="fresh"`, `find_sparse_regions` keeps GroupNorm dense instead and this pass finds nothing to do.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import SPARSE, CacheRef
from ..ir import ops as ir_ops
from . import ops


def cached_group_norm(gm: fx.GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.GROUP_NORM or not node.meta.get(SPARSE):
            continue
        x, num_groups, weight, bias = (list(node.args) + [None, None])[:4]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                ir_ops.group_norm_recorded_stats,
                (x, num_groups, weight, bias, CacheRef.of(node, "group_norm_stats")),
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites


def no_sparse_group_norm(gm: fx.GraphModule) -> list[str]:
    """Postcondition: no GroupNorm computes statistics over gathered blocks."""
    return [f"{n.name} is a GroupNorm on gathered blocks" for n in gm.graph.nodes
            if n.target is ops.GROUP_NORM and n.meta.get(SPARSE)]
