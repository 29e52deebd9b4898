"""Sparse upsample: nearest upsampling of a gathered tensor is a gather with an upsampling geometry.

    %up : aten.upsample_nearest2d(%x, None, [2.0, 2.0])              (sparse)
->
    %up : gather_windows(%x, cache[x], layout, Upsampled(ActivePixels(2x res), res))

Upsampling convs already read through the upsample (see `sparse_conv`); this pass handles any other reader.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE, ActivePixels
from . import ops
from .windows import WindowBuilder


def sparse_upsample(gm: fx.GraphModule) -> int:
    builder = WindowBuilder(gm.graph)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target not in ops.UPSAMPLE_NEAREST or not node.meta.get(SPARSE) or not node.users:
            continue
        gathered = builder.windows(node, ActivePixels(node.meta[LAYOUT].res), node)
        node.replace_all_uses_with(gathered)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites


def no_dense_upsample_of_blocks(gm: fx.GraphModule) -> list[str]:
    """Postcondition: no nearest upsampling of gathered blocks is left (with readers)."""
    return [f"{n.name} upsamples gathered blocks" for n in gm.graph.nodes
            if n.target in ops.UPSAMPLE_NEAREST and n.meta.get(SPARSE) and n.users]
