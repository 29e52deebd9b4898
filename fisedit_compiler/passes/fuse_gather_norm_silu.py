"""Fuse gather, normalisation and activation: the window chain of a resnet's convolution becomes one kernel.

    %win : gather_windows(%x, cache[x], layout, spec)
    %gn : group_norm_recorded_stats(%win, groups, %w, %b, cache[stats])
    %act : aten.silu(%gn)
    %z : zero_outside_image(%act, layout, spec)
->
    %z : gather_windows_norm_silu([%x], [cache[x]], [layout], spec, groups, %w, %b, cache[stats])

This is the chain `sparse_conv` builds in front of every resnet convolution (see windows.py); a gather that other
window chains share (e.g. a residual's) stays for them. An identity dropout between SiLU and the convolution (a
resnet's second one, at inference) is looked through. Where a per-(batch item, channel) operand is added to the
windows before the GroupNorm (a resnet's time embedding, ``norm2(conv1(x) + temb)``), it moves into the affine map
(``scale * (x + t) + shift = scale * x + (shift + scale * t)``) and the op reads it as `offset`:

    %t : repeat_over_blocks(%temb, %win)
    %gn : group_norm_recorded_stats(aten.add(%win, %t), ...) ...
->
    %z : gather_windows_norm_silu([%x], [cache[x]], [layout], spec, groups, %w, %b, cache[stats], None, %temb)

In up blocks the GroupNorm reads a concatenation of gathers (the upsampled path's and the skip connection's
windows). With recorded statistics it is a per-channel affine map, so the operands are one fused gather: each
operand's pixels normalised with its channels' scale and shift and written side by side, the windows copied once:

    %gn : group_norm_recorded_stats(cat([gather_windows(%a, ...), gather_windows(%b, ...)], 1), ...) ...
->
    %z : gather_windows_norm_silu([%a, %b], [cache[a], cache[b]], [layout_a, layout_b], spec, ...)

(Where one operand is a full-size tensor computed in this call and the other a gathered one, their gathers read
different indices: each gets its own fused gather with its slice of the channels, ``(first, end, total)``, and the
finished windows are concatenated.)

Without it the concatenation, the time embedding's addition, the affine map and SiLU each ran over the windows
(9 copies of every pixel for pixel-wise blocks). The fused op reads each source pixel once, applies the
recorded-statistics GroupNorm as a per-channel affine map and SiLU in float32, and writes the windows with zeros
outside the image: one kernel per operand on CUDA (`kernels.gather_pixels_affine_silu`).
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, tensor_meta
from ..ir import ops as ir_ops
from . import ops


def _only_user(node: fx.Node, target) -> bool:
    return isinstance(node, fx.Node) and node.target is target and len(node.users) == 1


def fuse_gather_norm_silu(gm: fx.GraphModule) -> int:
    rewrites = 0
    for zero in list(gm.graph.nodes):
        if zero.target is not ir_ops.zero_outside_image:
            continue
        act, layout, spec = zero.args
        dropout = act if _is_identity_dropout(act) else None
        if dropout is not None:
            act = dropout.args[0]
        if not _only_user(act, ops.aten.silu.default):
            continue
        norm = act.args[0]
        if not _only_user(norm, ir_ops.group_norm_recorded_stats):
            continue
        windows = norm.args[0]
        _, groups, weight, bias, stats = norm.args
        added = _per_channel_addition(windows, spec)
        if added is not None:
            addition, windows, offset = added
        gathers = [windows] if _is_gather(windows, spec) else None
        if gathers is None and _is_channel_cat(windows, spec) and added is None:
            gathers = list(windows.args[0])
        if gathers is None:
            continue
        sources, refs, layouts = ([g.args[i] for g in gathers] for i in range(3))
        if len({ref is None for ref in refs}) == 1:  # the operands share one gather index: one fused gather
            zero.target = ir_ops.gather_windows_norm_silu  # in place: the node keeps its name and metadata
            zero.args = (sources, refs, layouts, spec, groups, weight, bias, stats, None, offset if added else None)
        else:
            # operands from recorded values and from full-size ones computed in this call read different indices:
            # a fused gather each, with its slice of the channels, and the finished windows concatenated
            parts, first, total = [], 0, sum(layout.rest_numel for layout in layouts)
            for gather, source, ref, part_layout in zip(gathers, sources, refs, layouts):
                end = first + part_layout.rest_numel
                with gm.graph.inserting_before(zero):
                    part = gm.graph.call_function(ir_ops.gather_windows_norm_silu, (
                        [source], [ref], [part_layout], spec, groups, weight, bias, stats, (first, end, total), None))
                part.meta.update(gather.meta)
                parts.append(part)
                first = end
            zero.target = ops.aten.cat.default  # in place, as above
            zero.args = (parts, 1)
        if dropout is not None:
            gm.graph.erase_node(dropout)
        gm.graph.erase_node(act)
        gm.graph.erase_node(norm)
        if added is not None:
            repeated = addition.args[1] if addition.args[0] is windows else addition.args[0]
            gm.graph.erase_node(addition)
            if repeated.target is ir_ops.repeat_over_blocks and not repeated.users:
                gm.graph.erase_node(repeated)
        if windows not in gathers:
            gm.graph.erase_node(windows)  # the concatenation
        for gather in gathers:
            if not gather.users:  # else other window chains (e.g. a skip connection's) still read the plain gather
                gm.graph.erase_node(gather)
        rewrites += 1
    return rewrites


def _is_identity_dropout(node) -> bool:
    """A dropout that passes its input through (p = 0, or not training), read by one node."""
    if not _only_user(node, ops.aten.dropout.default):
        return False
    p, train = (list(node.args[1:]) + [None, None])[:2]
    p, train = node.kwargs.get("p", p), node.kwargs.get("train", train)
    return p == 0 or train is False


def _per_channel_addition(node, spec) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``aten.add(gather, t)`` (either order), read by nothing else than the norm, where `t` is one value per (batch
    item or all, channel), lined up with the blocks by `repeat_over_blocks` or as it is: (the addition, the gather,
    the unrepeated `t`), else None."""
    if not _only_user(node, ops.aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    for windows, other in (node.args, node.args[::-1]):
        if not _is_gather(windows, spec) or not isinstance(other, fx.Node):
            continue
        operand = other.args[0] if other.target is ir_ops.repeat_over_blocks else other
        meta, dense = tensor_meta(operand), windows.args[2].shape  # the gathered map's dense shape
        if meta is None or operand.meta.get(LAYOUT) is not None or meta.dim() != len(dense):
            continue
        batch, channels, *pixels = meta.shape
        if batch in (1, dense[0]) and channels == dense[1] and all(p == 1 for p in pixels):
            return node, windows, operand
    return None


def _is_gather(node, spec) -> bool:
    return isinstance(node, fx.Node) and node.target is ir_ops.gather_windows and node.args[3] == spec


def _is_channel_cat(node, spec) -> bool:
    """A concatenation along the channels of gathers of `spec`'s windows, read by nothing else than the norm."""
    if not _only_user(node, ops.aten.cat.default):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1 and all(_is_gather(g, spec) and g.args[2].kind == "map" and g.args[2].dims == (2, 3)
                            for g in node.args[0])
