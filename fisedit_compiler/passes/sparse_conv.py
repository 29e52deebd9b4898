"""Sparse conv: a convolution on gathered blocks computes its output blocks from input windows with halo.

    %c : aten.conv2d(%x, %w, %b, [s, s], [p, p])                 (sparse, k x k kernel)
->
    %win : gather_windows(%x', cache[x'], layout, ConvWindows(...))   (see windows.py for %x')
    %c : conv_windows(%win, %w, %b, [s, s], [d, d], groups, ConvWindows(...))

Each window is ``(b - 1) * s + (k - 1) * d + 1`` pixels wide, so a padding-free convolution over the batch of
windows yields exactly the ``b x b`` output blocks, in the gathered layout of the output resolution
(`conv_windows` runs it as one matrix product when blocks are single pixels). Stride-2 downsampling convs and
convs after nearest upsampling (folded into the window geometry) take the same path. A 1x1 stride-1 conv reads
the gathered blocks as they are, its windows without halo (with pixel-wise blocks one matrix product: the
convolution library took as long for 1556 one-pixel images as for the whole 48x48 map).
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE, ConvWindows
from ..ir import ops as ir_ops
from . import ops
from .windows import WindowBuilder


def _pair(value) -> tuple[int, int]:
    return tuple(value) * (2 // len(value)) if isinstance(value, (list, tuple)) else (value, value)


def sparse_conv(gm: fx.GraphModule) -> int:
    builder = WindowBuilder(gm.graph)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.CONV or not node.meta.get(SPARSE):
            continue
        defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]
        x, weight, bias, stride, padding, dilation, groups = list(node.args) + defaults[len(node.args):]
        kernel = tuple(weight.meta["val"].shape[2:])
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        spec = ConvWindows(x.meta[LAYOUT].res, node.meta[LAYOUT].res, kernel, stride, padding, dilation)
        if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
            windows = x  # a pointwise conv: each gathered block is its own window
        else:
            windows = builder.windows(x, spec, node)
        node.target = ir_ops.conv_windows  # in place: the node keeps its meta, and so its stable key
        node.args = (windows, weight, bias, list(stride), list(dilation), groups, spec)
        node.kwargs = {}
        rewrites += 1
    return rewrites


def no_padded_conv_on_blocks(gm: fx.GraphModule) -> list[str]:
    """Postcondition: no ATen convolution is left on gathered blocks."""
    return [f"{n.name} is a convolution on gathered blocks" for n in gm.graph.nodes
            if n.target is ops.CONV and n.meta.get(SPARSE)]
