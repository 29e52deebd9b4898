"""Insert record taps: the record variant saves, per step, exactly what the sparse variant reads.

    %x : aten.add(%a, %b)                                %x : aten.add(%a, %b)
    %gn : aten.group_norm(%x, 8, %w, %b, 1e-05)    ->    %_ : record(%x, cache[x])
                                                         %gn : group_norm_recording_stats(%x, 8, %w, %b, 1e-05,
                                                                                          cache[gn:stats])

Values are unchanged, so the record variant equals the eager U-Net (exactness contract 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from ..ir import KEY, CacheRef
from ..ir import ops as ir_ops
from . import ops


def cache_refs(gm: fx.GraphModule) -> set[CacheRef]:
    """Every `CacheRef` that a graph's nodes read."""
    refs: set[CacheRef] = set()
    for node in gm.graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: refs.add(a) if isinstance(a, CacheRef) else a)
    return refs


def nodes_by_key(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The nodes with a stable key (`ir.cache_key`), by key; a key held by two nodes is an error of a pass."""
    by_key: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        key = node.meta.get(KEY)
        if key is None:
            continue
        if key in by_key:
            raise ValueError(f"nodes {by_key[key].name!r} and {node.name!r} have the same stable key {key!r}")
        by_key[key] = node
    return by_key


def insert_record_taps(gm: fx.GraphModule, refs: Iterable[CacheRef]) -> int:
    by_key = nodes_by_key(gm)
    rewrites = 0
    for ref in sorted(refs, key=lambda r: (r.key, r.kind)):
        node = by_key.get(ref.key)
        if node is None:
            raise KeyError(f"the sparse variant reads {ref}, but the captured graph has no node {ref.key!r}")
        if ref.kind == "group_norm_stats":
            if node.target is not ops.GROUP_NORM:
                raise TypeError(f"{ref} refers to {node.target}, not a GroupNorm")
            x, num_groups, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
            node.target = ir_ops.group_norm_recording_stats
            node.args = (x, num_groups, weight, bias, eps, ref)
            node.kwargs = {}
        else:
            with gm.graph.inserting_after(node):
                gm.graph.call_function(ir_ops.record, (node, ref))
        rewrites += 1
    return rewrites
