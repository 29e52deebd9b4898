"""Insert cache write-back: after each cached node the sparse variant computes, store its fresh blocks.

    %x : aten.add(%a, %b)                 (sparse; other nodes read cache[x])
->
    %x : aten.add(%a, %b)
    %_ : write_back(%x, cache[x], layout)

Only calls that ask for it write (`CallContext.write_back`): then the cache holds the edit run's activations and
becomes the source of the next, continuous edit without a new dense run.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import ACTIVATION_KINDS, LAYOUT
from ..ir import ops as ir_ops
from .insert_record_taps import cache_refs, nodes_by_key


def insert_cache_write_back(gm: fx.GraphModule) -> int:
    by_key = nodes_by_key(gm)
    rewrites = 0
    for ref in sorted(cache_refs(gm), key=lambda r: r.key):
        if ref.kind not in ACTIVATION_KINDS:
            continue
        node = by_key[ref.key]
        with gm.graph.inserting_after(node):
            gm.graph.call_function(ir_ops.write_back, (node, ref, node.meta[LAYOUT]))
        rewrites += 1
    return rewrites
