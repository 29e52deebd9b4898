"""Annotate spatial layout: tag every tensor node with where its pixels are (an analysis; the graph is unchanged).

    %sample : [2, 4, 32, 32]                       -> map[2, 3]@32x32
    %conv2d : aten.conv2d(%sample, ...)            -> map[2, 3]@32x32
    %permute : aten.permute(%gn, [0, 2, 3, 1])     -> map[1, 2]@32x32
    %reshape : aten.reshape(%permute, [2, 1024, 32]) -> seq[1]@32x32
    %linear_1 : aten.linear(%time_proj, ...)       -> None (no pixels)

Layouts start at the inputs that carry pixels (the model adapter's `InputLayout`s, which `capture` puts on the
placeholders: the latents, ControlNet residuals, ...) and propagate forward through the ops whose effect on
pixels is known: each op family of `passes.ops` has a layout rule (`layout_rule`, `LAYOUT_RULES`), so a new family
(say, a DiT's token-sequence ops) is one rule. A node with a spatial input that no rule covers, or whose rule refuses
it, gets an `UnknownLayout` naming the reason; `find_sparse_regions` turns that into an error if the node sits at a
sparse resolution.

Diffusion transformers add three things, each a rule: a constant that varies along the pixels (a learned
positional embedding added to the tokens) takes the layout of the tokens it is added to; text tokens concatenated
with image tokens along the sequence make a *joint* sequence (`SpatialLayout.tokens`), which slices split again
into image tokens (pixels) and text tokens (none); and unpatchifying (an einsum permutation, then a reshape that
merges each pixel dim with its patch dim) ends at a finer map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Container

import torch.fx as fx

from ..ir import INPUT, LAYOUT, SpatialLayout, latent_input, reads_input, tensor_meta
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
    patches: list[int] = []  # per pixel dim, the patch size merged into it (1: none)
    for gi, gj in groups:
        pixel_dims = [d for d in gi if d in layout.dims]
        if 0 in gi and (len(gi) != 1 or gj != [0]):
            return "reshape merges the batch dim with other dims"
        if not pixel_dims:
            continue
        if layout.joint and (len(gi) != 1 or len(gj) != 1):
            return "reshape of a joint sequence's pixel dim"
        if layout.kind == "map" and gi == list(layout.dims) and len(gj) == 1:
            return SpatialLayout("seq", layout.res, (gj[0],), shape)
        if layout.kind == "seq" and len(gi) == 1 and [shape[d] for d in gj] == [h, w]:
            return SpatialLayout("map", layout.res, tuple(gj), shape)
        if len(gi) == 1 and len(gj) == 1:
            new_dims.append(gj[0])
            patches.append(1)
            continue
        first_pixel = gi.index(pixel_dims[0])
        if layout.kind == "map" and len(pixel_dims) == 1 and len(gj) == 1 \
                and all(layout.shape[d] == 1 for d in gi[:first_pixel]):
            # a pixel dim merged with the dims after it: each pixel unfolds into a patch of a finer map (unpatchify)
            new_dims.append(gj[0])
            patches.append(shape[gj[0]] // layout.shape[gi[0]])
            continue
        return f"reshape {list(layout.shape)} -> {list(shape)} mixes pixel dims with other dims"
    if len(new_dims) != len(layout.dims):
        return "reshape loses the pixel dims"
    if patches != [1] * len(patches):
        if len(patches) != 2:
            return "reshape unfolds the pixels of a sequence"
        return SpatialLayout("map", (h * patches[0], w * patches[1]), tuple(new_dims), shape)
    return dataclasses.replace(layout, dims=tuple(new_dims), shape=shape)


def _broadcast_layout(layouts: list[SpatialLayout], shape: tuple[int, ...]) -> SpatialLayout | str:
    aligned = {
        (lay.kind, lay.res, tuple(d + len(shape) - len(lay.shape) for d in lay.dims), lay.tokens) for lay in layouts
    }
    if len(aligned) != 1:
        return "operands have different pixel layouts"
    kind, res, dims, tokens = aligned.pop()
    return SpatialLayout(kind, res, dims, shape, tokens)


def _pixel_constant(operand: fx.Node, layout: SpatialLayout) -> str | None:
    """An operand without pixels of an elementwise op with `layout` that varies along the pixel dims: a constant
    per pixel (a learned positional embedding, rotary embeddings computed from token ids), which then takes the
    layout (one batch item: it broadcasts), or why it cannot."""
    meta = tensor_meta(operand)
    if meta is None or all(meta.shape[d - len(layout.shape) + meta.dim()] == 1 for d in layout.dims
                           if d - len(layout.shape) + meta.dim() >= 0):
        return None
    if meta.dim() != len(layout.shape) or meta.shape[0] != 1 or any(meta.shape[d] != layout.shape[d]
                                                                     for d in layout.dims):
        return f"operand {operand.name} without pixels varies along the pixel dims"
    if reads_input(operand, lambda i: i.layout is not None):  # else: from parameters and inputs without pixels
        return f"operand {operand.name} varies along the pixel dims, but no rule gives it pixels"
    operand.meta[LAYOUT] = dataclasses.replace(layout, shape=tuple(meta.shape))
    return None


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# --- the rules, by op family --------------------------------------------------------------------------------------

# A layout rule: `rule(node, first, inputs, shape)` -> the layout of `node`'s output, None if its output has no
# pixels (a joint sequence's text tokens), or why it has no layout (a str, the reason of its `UnknownLayout`).
# `first` is the layout of its first argument with pixels, `inputs` its input nodes with pixels, `shape` its
# output's (None where that is not one tensor: see `TUPLE_OUTPUTS`).
LayoutRule = Callable[[fx.Node, SpatialLayout, list[fx.Node], "tuple[int, ...] | None"], "SpatialLayout | str"]

# op target -> its rule
LAYOUT_RULES: dict[object, LayoutRule] = {}
# open families, which can say whether they hold a target but not list their targets (`ops.ELEMENTWISE`), and their
# rules; for targets that `LAYOUT_RULES` does not hold
FAMILY_RULES: list[tuple[Container, LayoutRule]] = []

# Ops whose value need not be one tensor (a tuple of tensors, an element of one): their rules may get no shape.
TUPLE_OUTPUTS = {ops.GETITEM, ops.aten.chunk.default, ops.aten.split.Tensor, ops.aten.split_with_sizes.default,
                 ops.aten.unbind.int}


def layout_rule(*families: object) -> Callable[[LayoutRule], LayoutRule]:
    """Decorator: the decorated function is the layout rule of these ops. Each of `families` is an op target, a
    collection of targets (a set, a dict's keys), or an open family (`ops.ELEMENTWISE`: only ``in`` works). A target
    has one rule of its own, which comes before an open family's."""

    def register(rule: LayoutRule) -> LayoutRule:
        for family in families:
            if isinstance(family, Container) and not isinstance(family, Collection) and not callable(family):
                FAMILY_RULES.append((family, rule))
                continue
            for target in family if isinstance(family, Collection) else [family]:
                if target in LAYOUT_RULES:
                    raise ValueError(f"{rule.__name__}: {target} has a layout rule, {LAYOUT_RULES[target].__name__}")
                LAYOUT_RULES[target] = rule
        return rule

    return register


def rule_for(target: object) -> LayoutRule | None:
    """The layout rule of the op `target`, or None."""
    if target in LAYOUT_RULES:
        return LAYOUT_RULES[target]
    return next((rule for family, rule in FAMILY_RULES if target in family), None)


def joint_split_part(node: fx.Node) -> tuple[int, int, int] | None:
    """(dim, start, end) of the part `node` takes of a split of a joint sequence along its pixel dim (a getitem of
    `split_with_sizes`), in dense positions; None for any other node."""
    split = node.args[0] if node.target is ops.GETITEM else None
    if not isinstance(split, fx.Node) or split.target is not ops.aten.split_with_sizes.default:
        return None
    layout = split.meta.get(LAYOUT)
    if not isinstance(layout, SpatialLayout) or not layout.joint:
        return None
    sizes, dim = split.args[1], _normalize_dim(split.args[2] if len(split.args) > 2 else 0, len(layout.shape))
    if dim != layout.dims[0]:
        return None
    start = sum(sizes[:node.args[1]])
    return dim, start, start + sizes[node.args[1]]


def _joint_part(first: SpatialLayout, start: int, end: int, shape) -> SpatialLayout | str | None:
    """The layout of positions [start, end) of a joint sequence's pixel dim: its pixels, or tokens without."""
    size, (before, after) = first.shape[first.dims[0]], first.tokens
    if (start, end) == (before, size - after):
        return SpatialLayout("seq", first.res, first.dims, shape)
    if (start, end) in ((0, before), (size - after, size)):
        return None
    return "part of a joint sequence that is neither its pixels nor its other tokens"


@layout_rule(ops.GETITEM)
def _element(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str | None:
    """An element of a tuple output (chunk, split): the tuple's layout; of a joint sequence split along its pixel
    dim, the part's (`_joint_part`)."""
    part = joint_split_part(node)
    if part is not None:
        return _joint_part(first, part[1], part[2], shape)
    return first if shape is None else dataclasses.replace(first, shape=shape)


@layout_rule(ops.ELEMENTWISE)
def _elementwise(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Elementwise ops: the operands' common layout, broadcast. An operand without pixels that varies along them
    is a constant per pixel (`_pixel_constant`)."""
    layout = _broadcast_layout([a.meta[LAYOUT] for a in inputs], shape)
    if isinstance(layout, str):
        return layout
    for operand in node.all_input_nodes:
        if operand not in inputs and (reason := _pixel_constant(operand, layout)) is not None:
            return reason
    return layout


@layout_rule(ops.CONV, ops.UPSAMPLE_NEAREST)
def _nchw(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Convolutions and upsampling: NCHW in, NCHW out at the output's resolution."""
    if first.kind != "map" or first.dims != (2, 3):
        return f"{node.target} expects NCHW input"
    return SpatialLayout("map", (shape[2], shape[3]), (2, 3), shape)


@layout_rule(ops.GROUP_NORM)
def _group_norm(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """GroupNorm: over an NCHW map, or over (N, C, H*W), a VAE attention block's token sequence."""
    if first.kind == "seq" and first.dims == (2,) and len(first.shape) == 3:
        return first
    return _nchw(node, first, inputs, shape)


@layout_rule(ops.PER_PIXEL_DIM_ARG)
def _per_pixel(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Ops over non-pixel dims only (linear, layer_norm, softmax, chunk, split, cat): the layout passes through."""
    target = node.target
    arg_index = ops.PER_PIXEL_DIM_ARG[target]
    if target is ops.aten.cat.default:
        if any(not isinstance(t, fx.Node) or not isinstance(t.meta.get(LAYOUT), SpatialLayout) for t in node.args[0]):
            return _joint_sequence(node, first, shape)
    if arg_index is not None:
        dim = node.args[arg_index] if len(node.args) > arg_index else node.kwargs.get("dim", 0)
        dim = _normalize_dim(dim, len(first.shape))
        if target is ops.aten.split_with_sizes.default and first.joint and dim == first.dims[0]:
            return first  # into a joint sequence's parts: each element's layout is its part's (`_element`)
        if dim == 0 or dim in first.dims:
            return f"{target} along the batch or a pixel dim"
    elif target in (ops.aten.layer_norm.default, ops.aten.rms_norm.default):
        if len(node.args[1]) > len(first.shape) - 1 - max(first.dims):
            return f"{target} over pixel dims"
    elif max(first.dims) == len(first.shape) - 1:
        return f"{target} over a pixel dim"
    return first if shape is None else dataclasses.replace(first, shape=shape)


def _joint_sequence(node: fx.Node, first: SpatialLayout, shape) -> SpatialLayout | str:
    """A cat of image tokens with tokens without pixels along the sequence: a joint sequence."""
    tensors = node.args[0]
    dim = _normalize_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(first.shape))
    spatial = [i for i, t in enumerate(tensors) if isinstance(t.meta.get(LAYOUT), SpatialLayout)]
    if first.kind != "seq" or first.joint or dim != first.dims[0] or len(spatial) != 1:
        return "cat of tensors with and without pixels, other than image tokens with text tokens along the sequence"
    sizes = [tensor_meta(t).shape[dim] for t in tensors]
    tokens = (sum(sizes[:spatial[0]]), sum(sizes[spatial[0] + 1:]))
    return SpatialLayout("seq", first.res, first.dims, shape, tokens)


def slice_args(node: fx.Node) -> tuple:
    """(dim, start, end, step) of an `aten.slice.Tensor` node, with the op's defaults filled in."""
    return tuple((list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4])


@layout_rule(ops.SLICE)
def _slice(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str | None:
    """A slice along a non-pixel dim keeps the layout; along a joint sequence's pixel dim it takes either the image
    tokens (the pixels) or the tokens before or after them (no pixels)."""
    dim, start, end, step = slice_args(node)
    dim = _normalize_dim(dim, len(first.shape))
    if dim == 0:
        return "slice of the batch dim"
    if dim not in first.dims:
        return dataclasses.replace(first, shape=shape)
    size = first.shape[dim]
    start, end = _normalize_dim(start or 0, size), min(size, _normalize_dim(end, size) if end is not None else size)
    if not first.joint or step != 1:
        return "slice of pixels"
    return _joint_part(first, start, end, shape)


@layout_rule(ops.REDUCTIONS)
def _reduction(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """A reduction over dims other than the batch and the pixel dims (a norm written out): per pixel."""
    ndim = len(first.shape)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    reduced = {_normalize_dim(d, ndim) for d in ([dims] if isinstance(dims, int) else dims or range(ndim))}
    if 0 in reduced or reduced & set(first.dims):
        return f"{node.target} over the batch or a pixel dim"
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    new_dims = first.dims if keepdim else tuple(d - sum(r < d for r in reduced) for d in first.dims)
    return dataclasses.replace(first, dims=new_dims, shape=shape)


@layout_rule(ops.STACK)
def _stack(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """A stack of tensors with one layout along a new dim after the batch: the pixel dims move past it."""
    tensors = node.args[0]
    if len(inputs) != len(tensors) or len({t.meta[LAYOUT] for t in tensors}) != 1:
        return "stack of tensors with different layouts"
    dim = _normalize_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
    if dim == 0:
        return "stack along the batch dim"
    return dataclasses.replace(first, dims=tuple(d + (d >= dim) for d in first.dims), shape=shape)


@layout_rule(ops.EINSUM)
def _einsum(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """An einsum that permutes the dims of one operand (``nhwpqc->nchpwq``, a DiT's unpatchify): the pixel dims
    move with it. The einsum is computed at full size (`find_sparse_regions`), so any order of the other dims is
    fine."""
    equation, operands = node.args[0], node.args[1]
    inputs_spec, _, output_spec = equation.replace(" ", "").partition("->")
    if len(operands) != 1 or "..." in equation or "," in inputs_spec or sorted(inputs_spec) != sorted(output_spec) \
            or len(set(inputs_spec)) != len(inputs_spec):
        return f"einsum {equation!r} is not a permutation of one operand"
    perm = [inputs_spec.index(c) for c in output_spec]
    if perm[0] != 0:
        return "einsum moves the batch dim"
    new_dims = tuple(perm.index(d) for d in first.dims)
    if first.kind == "map" and new_dims[0] > new_dims[1]:
        return "einsum swaps the pixel rows and columns"
    return dataclasses.replace(first, dims=new_dims, shape=shape)


@layout_rule(ops.SDPA)
def _attention(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Attention: the queries' layout."""
    return dataclasses.replace(first, shape=shape)


@layout_rule(ops.RESHAPES)
def _reshape(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Reshapes that keep the pixel dims apart from the others, or flatten a map into a sequence (and back)."""
    return _reshape_layout(first, shape)


@layout_rule(ops.PERMUTES)
def _permute(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Permutes and transposes that keep the batch first, a map's rows before its columns and the order of the
    other dims."""
    ndim = len(first.shape)
    if node.target is ops.aten.transpose.int:
        a, b = (_normalize_dim(d, ndim) for d in node.args[1:3])
        perm = list(range(ndim))
        perm[a], perm[b] = b, a
    else:
        perm = [_normalize_dim(d, ndim) for d in node.args[1]]
    if perm[0] != 0:
        return "permute moves the batch dim"
    new_dims = tuple(perm.index(d) for d in first.dims)
    if first.kind == "map" and new_dims[0] > new_dims[1]:
        return "permute swaps the pixel rows and columns"
    rest = [d for d in perm if d not in first.dims and d != 0]
    if rest != sorted(rest):
        return "permute reorders non-pixel dims"
    return dataclasses.replace(first, dims=new_dims, shape=shape)


@layout_rule(ops.UNSQUEEZES)
def _unsqueeze(node: fx.Node, first: SpatialLayout, inputs: list[fx.Node], shape) -> SpatialLayout | str:
    """Unsqueeze and squeeze of a dim other than the batch and the pixel dims."""
    unsqueeze = node.target is ops.aten.unsqueeze.default
    dim = _normalize_dim(node.args[1], len(shape) if unsqueeze else len(first.shape))
    if dim == 0:
        return "unsqueeze/squeeze at the batch dim"
    if unsqueeze:
        new_dims = tuple(d + (d >= dim) for d in first.dims)
    else:
        if dim in first.dims or first.shape[dim] != 1:
            return "squeeze of a pixel dim"
        new_dims = tuple(d - (d > dim) for d in first.dims)
    return dataclasses.replace(first, dims=new_dims, shape=shape)


# --- the pass -----------------------------------------------------------------------------------------------------


def infer_layout(node: fx.Node, shape: tuple[int, ...] | None) -> SpatialLayout | UnknownLayout | None:
    """The layout of `node`'s output, from its inputs' layouts (already annotated), by its op's rule."""
    inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get(LAYOUT), (SpatialLayout, UnknownLayout))]
    if not inputs:
        return None
    unknown = [a.meta[LAYOUT] for a in inputs if isinstance(a.meta[LAYOUT], UnknownLayout)]
    if unknown:
        return UnknownLayout(f"input {inputs[0].name} has an unknown layout", unknown[0].res)
    first: SpatialLayout = node.args[0].meta[LAYOUT] if isinstance(node.args[0], fx.Node) and isinstance(
        node.args[0].meta.get(LAYOUT), SpatialLayout) else inputs[0].meta[LAYOUT]
    if shape is None and node.target not in TUPLE_OUTPUTS:
        return UnknownLayout(f"{node.target} returns a non-tensor value", first.res)
    rule = rule_for(node.target)
    if rule is None:
        return UnknownLayout(f"no layout rule for {node.target}", first.res)
    result = rule(node, first, inputs, shape)
    return result if result is None or isinstance(result, SpatialLayout) else UnknownLayout(result, first.res)


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


def every_node_annotated(gm: fx.GraphModule) -> list[str]:
    """Postcondition: every node has a layout entry (None for values without pixels)."""
    return [f"{n.name} has no layout" for n in gm.graph.nodes if LAYOUT not in n.meta]
