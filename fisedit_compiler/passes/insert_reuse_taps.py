"""Insert reuse taps: the full calls of temporal reuse hand their deep levels' outputs to the reuse calls.

    %m : aten.add(%a, %b)          @32x32 (deep)   ->   %m : aten.add(%a, %b)
    %up : aten.upsample_nearest2d(%m, ...) @64x64        %_ : keep_for_reuse(%m, cache[m:reused])
                                                         %up : aten.upsample_nearest2d(%m, ...)

Only with `Policy.deep_reuse_interval` > 1; see `passes.reuse_deep_levels` for the reuse calls' side.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, CacheRef
from ..ir import ops as ir_ops
from ..policy import Policy
from .reuse_deep_levels import deep_outputs


def insert_reuse_taps(gm: fx.GraphModule, policy: Policy) -> int:
    """The full variant: after every deep output, `keep_for_reuse` (a consumer without pixels)."""
    cut = deep_outputs(gm, policy)
    for node in cut:
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_function(ir_ops.keep_for_reuse, (node, CacheRef.of(node, "reused")))
        tap.meta[LAYOUT] = None
    return len(cut)
