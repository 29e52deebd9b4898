"""Sparse conv: a convolution on gathered blocks computes its output blocks from input windows with halo.

    %c : aten.conv2d(%x, %w, %b, [s, s], [p, p])                 (sparse, k x k kernel)
->
    %win : gather_windows(%x', cache[x'], layout, ConvWindows(...))   (see windows.py for %x')
    %c : conv_windows(%win, %w, %b, [s, s], [d, d], groups, ConvWindows(...))

Each window is ``(b - 1) * s + (k - 1) * d + 1`` pixels wide, so a padding-free convolution over the batch of
windows yields exactly the ``b x b`` output blocks, in the gathered layout of the output resolution
(`conv_windows` runs it as one matrix product when blocks are single pixels). Stride-2 downsampling convs and
convs after nearest upsampling (folded into the window geometry) take the same path; a 1x1 stride-1 conv runs on
the gathered blocks as they are.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE, ConvWindows
from ..runtime import ops as runtime_ops
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
        if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
            continue  # a pointwise conv: gathered blocks in, gathered blocks out
        spec = ConvWindows(x.meta[LAYOUT].res, node.meta[LAYOUT].res, kernel, stride, padding, dilation)
        windows = builder.windows(x, spec, node)
        node.target = runtime_ops.conv_windows  # in place: the node keeps its meta, and so its stable key
        node.args = (windows, weight, bias, list(stride), list(dilation), groups, spec)
        node.kwargs = {}
        rewrites += 1
    return rewrites


def no_padded_conv_on_blocks(gm: fx.GraphModule) -> list[str]:
    """Postcondition: the only convolutions left on gathered blocks are pointwise (1x1, stride 1, no padding)."""
    problems = []
    for n in gm.graph.nodes:
        if n.target is ops.CONV and n.meta.get(SPARSE):
            args = list(n.args) + [None, None, None, [1, 1], [0, 0]][len(n.args):]
            if tuple(args[1].meta["val"].shape[2:]) != (1, 1) or _pair(args[3]) != (1, 1) or _pair(args[4]) != (0, 0):
                problems.append(f"{n.name} is a padded or strided conv on gathered blocks")
    return problems
