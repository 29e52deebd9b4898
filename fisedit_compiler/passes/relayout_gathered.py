"""Relayout gathered: reshapes of gathered tensors get shapes computed from the active blocks at run time.

    %r : aten.reshape(%p, [2, 1024, 64])          (sparse: NHWC map -> token sequence)
->
    %r : relayout_gathered(%p, map[1, 2]@32x32, seq[1]@32x32)

A dense reshape's target shape names the full pixel count, which a gathered tensor does not have. Permutes and
(un)squeezes need no rewrite: they keep the batch dim first and the pixel dims' sizes, so they are valid on
gathered tensors as they are. A joint sequence (image and text tokens) keeps its pixel dim apart in every reshape
(`annotate_spatial_layout`), so its reshapes take -1 there, and its slices count the text tokens from the end they
are at:

    %img : aten.slice(%joint, 1, 0, 1024)       (1024 image tokens, then 77 text tokens)
->
    %img : aten.slice(%joint, 1, 0, -77)
"""

from __future__ import annotations

import sys

import torch.fx as fx

from ..ir import LAYOUT, SPARSE, SpatialLayout
from ..ir import ops as ir_ops
from . import ops
from .annotate_spatial_layout import joint_split_part, slice_args


def _joint_slice_bounds(layout: SpatialLayout, start: int | None, end: int | None) -> tuple[int, int]:
    """(start, end) of a slice of a joint sequence's pixel dim, counted so that they hold for any pixel count:
    text tokens after the pixels from the end."""
    size, after = layout.shape[layout.dims[0]], layout.tokens[1]
    start = start % size if start else 0
    end = size if end is None or end >= size else end % size

    def from_the_end(i: int, is_end: bool) -> int:
        if after and i >= size - after and not (is_end and i == size):
            return i - size
        return sys.maxsize if is_end and i == size else i

    return from_the_end(start, False), from_the_end(end, True)


def relayout_gathered(gm: fx.GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not node.meta.get(SPARSE) or not isinstance(node.args[0], fx.Node):
            continue
        joint = node.args[0].meta[LAYOUT]
        if node.target is ops.SLICE and isinstance(joint, SpatialLayout) and joint.joint:
            if node.args[1] % len(joint.shape) == joint.dims[0]:
                _, start, end, _ = slice_args(node)
                node.args = (node.args[0], node.args[1], *_joint_slice_bounds(joint, start, end))
                rewrites += 1
            continue
        if (part := joint_split_part(node)) is not None:  # a part of a split: the same slice of its input
            dim, start, end = part
            source = node.args[0].args[0]
            node.target, node.args = ops.SLICE, (source, dim, *_joint_slice_bounds(joint, start, end))
            rewrites += 1
            continue
        if node.target not in ops.RESHAPES:
            continue
        source = node.args[0]
        if source.meta[LAYOUT].joint:  # the pixel dim alone, in both
            shape = list(node.meta[LAYOUT].shape)
            shape[node.meta[LAYOUT].dims[0]] = -1
            node.target, node.args, node.kwargs = ops.aten.reshape.default, (source, shape), {}
            rewrites += 1
            continue
        node.target = ir_ops.relayout_gathered
        node.args = (source, source.meta[LAYOUT], node.meta[LAYOUT])
        node.kwargs = {}
        rewrites += 1
    return rewrites


def no_dense_reshape_of_blocks(gm: fx.GraphModule) -> list[str]:
    """Postcondition: no reshape with a dense target shape reads gathered blocks."""
    return [f"{n.name} reshapes gathered blocks to a dense shape" for n in gm.graph.nodes
            if n.target in ops.RESHAPES and n.meta.get(SPARSE)
            and not (n.meta[LAYOUT].joint and n.args[1][n.meta[LAYOUT].dims[0]] == -1)]
