"""Annotate spatial layout: tag every tensor node with where its pixels are (an analysis; the graph is unchanged).

    %sample : [2, 4, 32, 32]                       -> map[2, 3]@32x32
    %conv2d : aten.conv2d(%sample, ...)            -> map[2, 3]@32x32
    %permute : aten.permute(%gn, [0, 2, 3, 1])     -> map[1, 2]@32x32
    %reshape : aten.reshape(%permute, [2, 1024, 32]) -> seq[1]@32x32
    %linear_1 : aten.linear(%time_proj, ...)       -> None (no pixels)

Layouts start at the inputs that carry pixels (the model adapter's `InputLayout`s, which `capture` puts on the
placeholders: the latents, ControlNet residuals, ...) and propagate forward through the ops whose effect on
pixels is known (`passes.ops`). A node with a spatial input that no rule covers gets an `UnknownLayout` naming the reason;
`find_sparse_regions` turns that into an error if the node sits at a sparse resolution.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..ir import INPUT, LAYOUT, SpatialLayout, latent_input, tensor_meta
from . import ops


@dataclasses.dataclass(frozen=True)
class UnknownLayout:
    """A node whose input has pixels but whose own pixel layout no rule explains."""

    reason: str
    res: tuple[int, int]


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up dims of a reshape: each group of source dims has the same element count as a group of target
    dims. Size-1 dims form their own groups where possible."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= src[i]
            else:
                j += 1
                gj.append(j)
                pj *= dst[j]
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    if groups:  # trailing size-1 dims join the last group
        groups[-1][0].extend(range(i, len(src)))
        groups[-1][1].extend(range(j, len(dst)))
    return groups


def _reshape_layout(layout: SpatialLayout, shape: tuple[int, ...]) -> SpatialLayout | str:
    groups = _reshape_groups(layout.shape, shape)
    h, w = layout.res
    new_dims: list[int] = []
    for gi, gj in groups:
        pixel_dims = [d for d in gi if d in layout.dims]
        if 0 in gi and (len(gi) != 1 or gj != [0]):
            return "reshape merges the batch dim with other dims"
        if not pixel_dims:
            continue
        if layout.kind == "map" and gi == list(layout.dims) and len(gj) == 1:
            return SpatialLayout("seq", layout.res, (gj[0],), shape)
        if layout.kind == "seq" and len(gi) == 1 and [shape[d] for d in gj] == [h, w]:
            return SpatialLayout("map", layout.res, tuple(gj), shape)
        if len(gi) == 1 and len(gj) == 1:
            new_dims.append(gj[0])
            continue
        return f"reshape {list(layout.shape)} -> {list(shape)} mixes pixel dims with other dims"
    if len(new_dims) != len(layout.dims):
        return "reshape loses the pixel dims"
    return SpatialLayout(layout.kind, layout.res, tuple(new_dims), shape)


def _broadcast_layout(layouts: list[SpatialLayout], shape: tuple[int, ...]) -> SpatialLayout | str:
    aligned = {
        (lay.kind, lay.res, tuple(d + len(shape) - len(lay.shape) for d in lay.dims)) for lay in layouts
    }
    if len(aligned) != 1:
        return "operands have different pixel layouts"
    kind, res, dims = aligned.pop()
    return SpatialLayout(kind, res, dims, shape)


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def infer_layout(node: fx.Node, shape: tuple[int, ...] | None) -> SpatialLayout | UnknownLayout | None:
    """The layout of `node`'s output, from its inputs' layouts (already annotated)."""
    inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get(LAYOUT), (SpatialLayout, UnknownLayout))]
    if not inputs:
        return None
    unknown = [a.meta[LAYOUT] for a in inputs if isinstance(a.meta[LAYOUT], UnknownLayout)]
    if unknown:
        return UnknownLayout(f"input {inputs[0].name} has an unknown layout", unknown[0].res)
    first: SpatialLayout = node.args[0].meta[LAYOUT] if isinstance(node.args[0], fx.Node) and isinstance(
        node.args[0].meta.get(LAYOUT), SpatialLayout) else inputs[0].meta[LAYOUT]
    target = node.target

    def unknown_(reason: str) -> UnknownLayout:
        return UnknownLayout(reason, first.res)

    if target is ops.GETITEM:
        return first if shape is None else dataclasses.replace(first, shape=shape)
    if shape is None and target not in (ops.aten.chunk.default, ops.aten.split.Tensor,
                                        ops.aten.split_with_sizes.default):
        return unknown_(f"{target} returns a non-tensor value")
    if target in ops.ELEMENTWISE:
        result = _broadcast_layout([a.meta[LAYOUT] for a in inputs], shape)
        return result if isinstance(result, SpatialLayout) else unknown_(result)
    if target is ops.GROUP_NORM and first.kind == "seq" and first.dims == (2,) and len(first.shape) == 3:
        return first  # (N, C, H*W): a VAE attention block's GroupNorm over its token sequence
    if target is ops.CONV or target in ops.UPSAMPLE_NEAREST or target is ops.GROUP_NORM:
        if first.kind != "map" or first.dims != (2, 3):
            return unknown_(f"{target} expects NCHW input")
        return SpatialLayout("map", (shape[2], shape[3]), (2, 3), shape)
    if target in ops.PER_PIXEL_DIM_ARG:
        arg_index = ops.PER_PIXEL_DIM_ARG[target]
        if target is ops.aten.cat.default:
            if any(not isinstance(t, fx.Node) or not isinstance(t.meta.get(LAYOUT), SpatialLayout)
                   for t in node.args[0]):
                return unknown_("cat of tensors with and without pixels")
        if arg_index is not None:
            dim = node.args[arg_index] if len(node.args) > arg_index else node.kwargs.get("dim", 0)
            dim = _normalize_dim(dim, len(first.shape))
            if dim == 0 or dim in first.dims:
                return unknown_(f"{target} along the batch or a pixel dim")
        elif target is ops.aten.layer_norm.default:
            if len(node.args[1]) > len(first.shape) - 1 - max(first.dims):
                return unknown_("layer_norm over pixel dims")
        elif max(first.dims) == len(first.shape) - 1:
            return unknown_(f"{target} over a pixel dim")
        return first if shape is None else dataclasses.replace(first, shape=shape)
    if target is ops.SDPA:
        return dataclasses.replace(first, shape=shape)
    if target in ops.RESHAPES:
        result = _reshape_layout(first, shape)
        return result if isinstance(result, SpatialLayout) else unknown_(result)
    if target in ops.PERMUTES:
        ndim = len(first.shape)
        if target is ops.aten.transpose.int:
            a, b = (_normalize_dim(d, ndim) for d in node.args[1:3])
            perm = list(range(ndim))
            perm[a], perm[b] = b, a
        else:
            perm = [_normalize_dim(d, ndim) for d in node.args[1]]
        if perm[0] != 0:
            return unknown_("permute moves the batch dim")
        new_dims = tuple(perm.index(d) for d in first.dims)
        if first.kind == "map" and new_dims[0] > new_dims[1]:
            return unknown_("permute swaps the pixel rows and columns")
        rest = [d for d in perm if d not in first.dims and d != 0]
        if rest != sorted(rest):
            return unknown_("permute reorders non-pixel dims")
        return SpatialLayout(first.kind, first.res, new_dims, shape)
    if target in ops.UNSQUEEZES:
        dim = _normalize_dim(node.args[1], len(shape) if target is ops.aten.unsqueeze.default else len(first.shape))
        if dim == 0:
            return unknown_("unsqueeze/squeeze at the batch dim")
        if target is ops.aten.unsqueeze.default:
            new_dims = tuple(d + (d >= dim) for d in first.dims)
        else:
            if dim in first.dims or first.shape[dim] != 1:
                return unknown_("squeeze of a pixel dim")
            new_dims = tuple(d - (d > dim) for d in first.dims)
        return SpatialLayout(first.kind, first.res, new_dims, shape)
    return unknown_(f"no layout rule for {target}")


def annotate_spatial_layout(gm: fx.GraphModule) -> int:
    """Set `node.meta[LAYOUT]` on every node; returns the number of nodes with pixels."""
    latent_input(gm)  # raises if the capture named no latents
    spatial = 0
    for node in gm.graph.nodes:
        meta = tensor_meta(node)
        shape = tuple(meta.shape) if meta is not None else None
        layout: SpatialLayout | UnknownLayout | None
        if node.op == "placeholder":
            layout = node.meta[INPUT].layout if INPUT in node.meta else None
        elif node.op == "call_function":
            layout = infer_layout(node, shape)
        else:
            layout = None
        node.meta[LAYOUT] = layout
        spatial += layout is not None
    return spatial


def resolution_of(node: fx.Node) -> tuple[int, int] | None:
    """The resolution of a node with pixels (known or not), else None."""
    layout = node.meta.get(LAYOUT)
    return layout.res if layout is not None else None


def every_node_annotated(gm: fx.GraphModule) -> list[str]:
    """Postcondition: every node has a layout entry (None for values without pixels)."""
    return [f"{n.name} has no layout" for n in gm.graph.nodes if LAYOUT not in n.meta]
