"""Build a node's value on a set of windows (`WindowSpec`), for passes that need pixels around active blocks.

A convolution's output block needs an input window with halo; those halo pixels belong to neighbouring blocks,
which are either active (fresh in the gathered tensor) or not (recorded). Rather than recording every conv input,
the window is gathered where the value was last *computed* and the cheap per-pixel ops in between are re-applied
on the window:

    conv(silu(group_norm_recorded_stats(%x)))    where %x is a resnet's input
->  conv(zero_outside_image(silu(group_norm_recorded_stats(gather_windows(%x, cache[x], spec)))))

Only the leaves (here %x) are read from the cache. An elementwise op that joins two or more maps computed in the
region (a residual add: `%conv2 + %shortcut`) is a leaf itself: its recorded result is one tensor, where
re-applying it on the windows would read (and so record) each of its operands. Nearest upsampling is a pure
re-indexing, so it is folded into the gather's geometry (`Upsampled`) instead of being re-applied.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import KEY, LAYOUT, SPARSE, CacheRef, SpatialLayout, Upsampled, WindowSpec
from ..ir import ops as ir_ops
from . import ops

# Per-pixel ops that are cheap enough to recompute on halo pixels.
PULL_THROUGH_ALSO = {ir_ops.group_norm_recorded_stats, ops.aten.cat.default}  # besides elementwise ops


def _is_nchw(node: fx.Node) -> bool:
    layout = node.meta.get(LAYOUT)
    return isinstance(layout, SpatialLayout) and layout.kind == "map" and layout.dims == (2, 3)


def _joins_maps(node: fx.Node) -> bool:
    """An elementwise op over two or more full-size maps of the region (not broadcast ones, like a time embedding)."""
    shape = node.meta[LAYOUT].shape
    operands = [a for a in node.all_input_nodes
                if a.meta.get(SPARSE) and _is_nchw(a) and a.meta[LAYOUT].shape == shape]
    return node.target in ops.ELEMENTWISE and len(operands) >= 2 and KEY in node.meta


class WindowBuilder:
    """Builds window versions of nodes, memoised per (node, spec), inserted before `anchor`."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.memo: dict[tuple[fx.Node, WindowSpec], fx.Node] = {}

    def windows(self, node: fx.Node, spec: WindowSpec, anchor: fx.Node) -> fx.Node:
        """`node`'s value on the windows of `spec`, with zero outside the image."""
        value, recomputed = self._value(node, spec, anchor)
        if not recomputed:
            return value
        return self._insert(anchor, ir_ops.zero_outside_image, (value, node.meta[LAYOUT], spec), node)

    def _insert(self, anchor: fx.Node, target, args: tuple, like: fx.Node) -> fx.Node:
        with self.graph.inserting_before(anchor):
            new = self.graph.call_function(target, args)
        new.meta[LAYOUT] = like.meta[LAYOUT]
        new.meta[SPARSE] = True
        return new

    def _value(self, node: fx.Node, spec: WindowSpec, anchor: fx.Node) -> tuple[fx.Node, bool]:
        """The window node, and whether any op was re-applied on it (so pixels outside may be non-zero)."""
        key = (node, spec)
        if key in self.memo:
            return self.memo[key]
        if node.target is ir_ops.gather_active:
            full, layout = node.args
            result = self._insert(anchor, ir_ops.gather_windows, (full, None, layout, spec), node), False
        elif ((node.target in ops.ELEMENTWISE or node.target in PULL_THROUGH_ALSO) and node.meta.get(SPARSE)
              and _is_nchw(node) and not _joins_maps(node)):
            recomputed = True

            def window_arg(arg):
                if isinstance(arg, fx.Node) and arg.meta.get(SPARSE):
                    return self._value(arg, spec, anchor)[0]
                return arg

            args = fx.node.map_aggregate(node.args, window_arg)
            kwargs = fx.node.map_aggregate(node.kwargs, window_arg)
            with self.graph.inserting_before(anchor):
                new = self.graph.call_function(node.target, args, kwargs)
            new.meta.update(node.meta)
            new.meta.pop(KEY, None)  # a window copy of `node`, not `node`: it is never recorded
            result = new, recomputed
        elif node.target in ops.UPSAMPLE_NEAREST and node.meta.get(SPARSE):
            source = node.args[0]
            result = self._value(source, Upsampled(spec, source.meta[LAYOUT].res), anchor)
        else:
            layout = node.meta[LAYOUT]
            args = (node, CacheRef.of(node), layout, spec)
            result = self._insert(anchor, ir_ops.gather_windows, args, node), False
        self.memo[key] = result
        return result
