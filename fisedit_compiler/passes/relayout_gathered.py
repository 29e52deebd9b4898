"""Relayout gathered: reshapes of gathered tensors get shapes computed from the active blocks at run time.

    %r : aten.reshape(%p, [2, 1024, 64])          (sparse: NHWC map -> token sequence)
->
    %r : relayout_gathered(%p, map[1, 2]@32x32, seq[1]@32x32)

A dense reshape's target shape names the full pixel count, which a gathered tensor does not have. Permutes and
(un)squeezes need no rewrite: they keep the batch dim first and the pixel dims' sizes, so they are valid on
gathered tensors as they are.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE
from ..ir import ops as ir_ops
from . import ops


def relayout_gathered(gm: fx.GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target not in ops.RESHAPES or not node.meta.get(SPARSE):
            continue
        source = node.args[0]
        node.target = ir_ops.relayout_gathered
        node.args = (source, source.meta[LAYOUT], node.meta[LAYOUT])
        node.kwargs = {}
        rewrites += 1
    return rewrites


def no_dense_reshape_of_blocks(gm: fx.GraphModule) -> list[str]:
    """Postcondition: no reshape with a dense target shape reads gathered blocks."""
    return [f"{n.name} reshapes gathered blocks to a dense shape" for n in gm.graph.nodes
            if n.target in ops.RESHAPES and n.meta.get(SPARSE)]
