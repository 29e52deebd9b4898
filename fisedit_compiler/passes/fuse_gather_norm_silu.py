"""Fuse gather, normalisation and activation: the window chain of a resnet's convolution becomes one kernel.

    %win : gather_windows(%x, cache[x], layout, spec)
    %gn : group_norm_recorded_stats(%win, groups, %w, %b, cache[stats])
    %act : aten.silu(%gn)
    %z : zero_outside_image(%act, layout, spec)
->
    %z : gather_windows_norm_silu(%x, cache[x], layout, spec, groups, %w, %b, cache[stats])

This is the chain `sparse_conv` builds in front of every resnet convolution (see windows.py); a gather that other
window chains share (e.g. a residual's) stays for them. The fused op reads each window pixel once, applies the
recorded-statistics GroupNorm as a per-channel affine map and SiLU in float32, and writes the window with zeros
outside the image: one kernel instead of four on CUDA (`kernels.gather_pixels_affine_silu`).
"""

from __future__ import annotations

import torch.fx as fx

from ..runtime import ops as runtime_ops
from . import ops


def _only_user(node: fx.Node, target) -> bool:
    return isinstance(node, fx.Node) and node.target is target and len(node.users) == 1


def fuse_gather_norm_silu(gm: fx.GraphModule) -> int:
    rewrites = 0
    for zero in list(gm.graph.nodes):
        if zero.target is not runtime_ops.zero_outside_image:
            continue
        act, layout, spec = zero.args
        if not _only_user(act, ops.aten.silu.default):
            continue
        norm = act.args[0]
        if not _only_user(norm, runtime_ops.group_norm_recorded_stats):
            continue
        windows = norm.args[0]
        if not isinstance(windows, fx.Node) or windows.target is not runtime_ops.gather_windows:
            continue
        if windows.args[3] != spec:
            continue
        source, ref, _, _ = windows.args
        _, groups, weight, bias, stats = norm.args
        zero.target = runtime_ops.gather_windows_norm_silu  # in place: the node keeps its name and metadata
        zero.args = (source, ref, layout, spec, groups, weight, bias, stats)
        gm.graph.erase_node(act)
        gm.graph.erase_node(norm)
        if not windows.users:  # else other window chains (e.g. a skip connection's) still read the plain gather
            gm.graph.erase_node(windows)
        rewrites += 1
    return rewrites
