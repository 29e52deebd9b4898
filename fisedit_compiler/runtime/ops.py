"""The lowerings of the IR ops (`ir.ops`): how each is turned into a self-contained program.

A variant is an IR graph: besides ATen ops it calls the ops of `ir.ops`, with static arguments (layouts, gather
geometries, cache references) that say *what* to read, not the values. An IR graph does not run by itself.
`runtime.program.bind` lowers it for one call state (a mask plan, flags) into a program, an ordinary graph whose
inputs are the model's inputs plus everything the call reads (recorded tensors, the plan's index tensors) and
whose outputs are the model's outputs plus everything it records. Each op's lowering, registered here with
`register_lowering(op)` into `LOWERINGS`, receives the `runtime.program.Binding` (`b`) and FX proxies for its node
arguments, and emits ATen ops and registered kernels (`torch.ops.fisedit`, `kernels.library`): decisions that
depend on the plan (a gather that is the identity, windows that lie inside the image, block counts) are taken
here, at bind time, so that a program has no Python-level control flow. Every IR op has exactly one lowering, whose
parameters are the op's after `b`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Callable

import torch

from ..ir import ActivePixels, CacheRef, ConvWindows, FullImage, SpatialLayout, WindowSpec, concatenated
from ..ir import ops as ir_ops
from ..kernels import library, reference
from ..kernels.library import INDEX_FIELDS

aten = torch.ops.aten
fisedit = torch.ops.fisedit

# IR op -> its lowering, `lowering(binding, *args, **kwargs)`.
LOWERINGS: dict[Callable, Callable] = {}


def register_lowering(op: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated function as the lowering of the IR op `op` (one of `ir.ops.IR_OPS`).
    Its parameters are the binding `b`, then the op's, by the same names."""
    if ir_ops.IR_OPS.get(getattr(op, "__name__", None)) is not op:
        raise TypeError(f"{op!r} is not an IR op (fisedit_compiler.ir.ops)")

    def register(lowering: Callable) -> Callable:
        if op in LOWERINGS:
            raise ValueError(f"IR op {op.__name__} has two lowerings")
        expected = list(inspect.signature(op).parameters)
        if list(inspect.signature(lowering).parameters)[1:] != expected:
            raise TypeError(f"the lowering {lowering.__name__} of {op.__name__} does not take "
                            f"(b, {', '.join(expected)})")
        LOWERINGS[op] = lowering
        return lowering

    return register


# --- record variant ---------------------------------------------------------------------------------------------


@register_lowering(ir_ops.record)
def lower_record(b, value, ref: CacheRef) -> None:
    """The value becomes a program output."""
    b.write(ref, value)


@register_lowering(ir_ops.group_norm_recording_stats)
def lower_group_norm_recording_stats(b, x, num_groups: int, weight, bias, eps: float, ref: CacheRef):
    """ATen's native GroupNorm, whose mean and rstd become program outputs."""
    n, c, *pixels = b.dense_shape(0)
    hw = 1
    for d in pixels:
        hw *= d
    # contiguous: aten.group_norm makes its input so (a VAE attention block's (N, C, tokens) is a transpose)
    out, mean, rstd = b.unpack(aten.native_group_norm.default(x.contiguous(), weight, bias, n, c, hw, num_groups, eps),
                               3)
    b.write(ref, (mean.reshape(n, num_groups), rstd.reshape(n, num_groups)))
    return out


# --- sparse variant ---------------------------------------------------------------------------------------------


def _gather(b, source, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec):
    """A gather of `spec`'s windows: from `source` and the recorded value at `ref`, or (`ref=None`) from `source`
    alone, a full-size tensor computed in this call. A joint sequence gathers its pixels and keeps its other tokens
    (`_joint_gather`)."""
    if layout.joint:
        return _joint_gather(b, source, ref, layout, spec)
    return _gather_operands(b, [source], [ref], [layout], spec)


def joint_pixels(x, layout: SpatialLayout):
    """The pixels of a joint sequence `x`, dense or gathered: a slice counted from the ends, so that it holds for any
    number of pixels."""
    before, after = layout.tokens
    return aten.slice.Tensor(x, layout.dims[0], before, -after if after else sys.maxsize)


def joint_parts(x, layout: SpatialLayout) -> tuple:
    """(tokens before, pixels, tokens after) of a joint sequence `x` (None for an empty part), as `joint_pixels`."""
    dim, (before, after) = layout.dims[0], layout.tokens
    return (aten.slice.Tensor(x, dim, 0, before) if before else None, joint_pixels(x, layout),
            aten.slice.Tensor(x, dim, -after, sys.maxsize) if after else None)


def pixels_of(layout: SpatialLayout) -> SpatialLayout:
    """The layout of a joint sequence's pixels alone."""
    shape = list(layout.shape)
    shape[layout.dims[0]] = layout.res[0] * layout.res[1]
    return dataclasses.replace(layout, shape=tuple(shape), tokens=(0, 0))


def _joint_gather(b, source, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec):
    """A joint sequence's gather: its pixels gathered (from the recorded value's pixels where it reads one), its
    other tokens those of `source`, which are always computed."""
    if b.index(spec, ref is not None).identity:  # (before reading a recorded value: the program need not take it)
        return source
    before, pixels, after = joint_parts(source, layout)
    recorded = pixels if ref is None else joint_pixels(b.recorded(ref), layout)
    gathered = _gather_from(b, [pixels], [recorded], [pixels_of(layout)], spec, from_gathered=ref is not None)
    return torch.cat([t for t in (before, gathered, after) if t is not None], dim=layout.dims[0])


def _gather_operands(b, sources: list, refs: list[CacheRef | None], layouts: list[SpatialLayout], spec: WindowSpec,
                     scale=None, shift=None):
    """`_gather` of the operands of a concatenation along their channels, concatenated (one operand: none). With
    `scale` and `shift` (over the concatenation's channels): GroupNorm's affine map and SiLU."""
    if len({ref is None for ref in refs}) != 1:
        raise ValueError("the operands of one gather read either all recorded values or none: they share its index")
    from_gathered = refs[0] is not None
    if b.index(spec, from_gathered).identity and scale is None and len(sources) == 1:
        # e.g. a resolution the cost model keeps dense; before reading a recorded value: the program need not take it
        return sources[0]
    recorded = [b.recorded(ref) for ref in refs] if from_gathered else list(sources)
    return _gather_from(b, sources, recorded, layouts, spec, from_gathered, scale, shift)


def _gather_from(b, sources: list, recorded: list, layouts: list[SpatialLayout], spec: WindowSpec,
                 from_gathered: bool, scale=None, shift=None):
    """`_gather_operands` with the recorded values given (`from_gathered`: `sources` are gathered and `recorded`
    full-size; else `recorded` are the full-size sources), once its caller has found that it is no identity."""
    index = b.index(spec, from_gathered)
    fused = scale is not None
    layout = concatenated(layouts)
    if from_gathered:
        fresh, fresh_windows = list(sources), b.num_blocks(layout.res)
    else:
        fresh, fresh_windows = [None] * len(sources), 0
    if b.inline_kernels:
        if from_gathered and index.empty[INDEX_FIELDS.index("fresh_at")]:
            fresh = [None] * len(sources)  # no fresh pixel in these windows (and no rows to select from)
        outs, first = [], 0
        for f, r, part in zip(fresh, recorded, layouts):
            end = first + part.rest_numel
            epilogue = (scale[:, first:end], shift[:, first:end]) if fused and len(layouts) > 1 else (scale, shift)
            outs.append(reference.gather_pixels_by_selection(f, r, index.as_gather_index(), part, fresh_windows,
                                                             *epilogue))
            first = end
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=layout.rest_dims[0])
    args = (index.tensors, index.windows, index.all_inside, *library.layout_args(layout), fresh_windows)
    if fused:
        return fisedit.gather_pixels_affine_silu.default(fresh, recorded, *args, scale, shift)
    if len(sources) > 1:
        raise ValueError("a plain gather reads one operand")
    return fisedit.gather_pixels.default(fresh[0], recorded[0], *args)


@register_lowering(ir_ops.gather_active)
def lower_gather_active(b, full, layout: SpatialLayout):
    """A gather of the active pixels from the full-size tensor alone."""
    return _gather(b, full, None, layout, ActivePixels(layout.res))


@register_lowering(ir_ops.gather_windows)
def lower_gather_windows(b, source, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec):
    """A gather of `spec`'s windows (nothing where the plan's index is the identity)."""
    return _gather(b, source, ref, layout, spec)


@register_lowering(ir_ops.scatter_into_recorded)
def lower_scatter_into_recorded(b, fresh, ref: CacheRef, layout: SpatialLayout):
    """A gather of the full image from the fresh blocks and the recorded tensor."""
    return _gather(b, fresh, ref, layout, FullImage(layout.res))


@register_lowering(ir_ops.gather_windows_norm_silu)
def lower_gather_windows_norm_silu(b, sources: list, refs: list[CacheRef | None], layouts: list[SpatialLayout],
                             spec: WindowSpec, num_groups: int, weight, bias, stats_ref: CacheRef,
                             channels: tuple[int, int, int] | None = None, offset=None):
    """A gather whose epilogue is GroupNorm's affine map from the recorded statistics (`offset` folded
    into its shift) and SiLU."""
    mean, rstd = b.recorded(stats_ref)
    width = sum(layout.rest_numel for layout in layouts)
    first, end, total = channels if channels is not None else (0, width, width)
    scale, shift = reference.group_norm_scale_shift(total, weight, bias, mean, rstd, num_groups)
    if offset is not None:
        shift = shift + scale * offset.reshape(-1, total).float()
    if (first, end) != (0, total):
        scale, shift = scale[:, first:end].contiguous(), shift[:, first:end].contiguous()
    return _gather_operands(b, sources, refs, layouts, spec, scale, shift)


@register_lowering(ir_ops.zero_outside_image)
def lower_zero_outside_image(b, windows, layout: SpatialLayout, spec: WindowSpec):
    """Nothing where every window lies inside the map; else a product with the plan's inside mask (in an eager
    program, whose plans may differ in this, `kernels.reference.zero_outside` decides at each call)."""
    if b.symbolic_counts:
        inside = b.plan_value(("inside or none", spec, layout),
                              lambda plan: None if plan.gather_index(spec, False).all_inside
                              else _inside_mask(plan, spec, layout))
        return b.call(reference.zero_outside, windows, inside)
    if b.index(spec, False).all_inside:
        return windows
    inside = b.plan_value(("inside", spec, layout), lambda plan: _inside_mask(plan, spec, layout))
    return windows * inside.type_as(windows)


def _inside_mask(plan, spec: WindowSpec, layout: SpatialLayout) -> torch.Tensor:
    """`spec`'s windows as a bool tensor broadcastable against them (size 1 in the non-pixel dims): inside the map."""
    index = plan.gather_index(spec, False)
    c = index.windows
    rest_one = SpatialLayout(layout.kind, layout.res, layout.dims,
                             tuple(1 if d in layout.rest_dims else s for d, s in enumerate(layout.shape)))
    inside = index.inside.reshape(1, -1, 1).expand(layout.shape[0], -1, 1)
    return reference.from_canonical(inside, rest_one, c.num_windows, c.height, c.width)


@register_lowering(ir_ops.conv_windows)
def lower_conv_windows(b, windows, weight, bias, stride: list[int], dilation: list[int], groups: int,
                 spec: ConvWindows):
    """By the device's measured algorithm for its channels and block size (`CostConstants.conv_algorithm`;
    see `kernels.reference.conv_windows`). Where each window is one kernel footprint (pixel-wise blocks) it is one
    matrix product with the flattened kernel, by the library the cost constants name for its size and dtype
    (`CostConstants.gemm_library`). im2col keeps a parameter's flattened kernel for the plan's lifetime (one edit)."""
    out_channels, in_channels, kh, kw = b.dense_shape(1)
    block = b.block(spec.output_res)
    window = spec.window_size(block)
    algorithm = b.conv_algorithm(in_channels, block, spec.output_res)
    method = reference.conv_method(algorithm, (kh, kw), (window, window), dilation, groups)
    if method == "im2col":
        if b.node.args[1].op == "get_attr":  # a parameter: flattened once per plan
            weight_value = b.constant(1)
            kernel = b.plan_value(("flat_kernel", b.node.args[1].target),
                                  lambda plan: reference.flat_kernel(weight_value.detach()))
        else:  # a graph input (dynamo lifts parameters): flattened per call
            kernel = reference.flat_kernel(weight)
        out = (block, block)
        dense_out = b.dense_value()
        # one row per output pixel of the blocks
        gemm = b.gemm_library(dense_out.shape[0], out_channels * in_channels * kh * kw, dense_out.dtype,
                              spec.output_res)
        return reference.im2col_conv(windows, kernel, bias, in_channels, (kh, kw), stride, out, gemm,
                                     functools.partial(_matmul_rows, b))
    # Gathered windows come channels-last strided (pixels outer, channels inner): "nchw" copies them first
    if method == "nchw":
        windows = windows.contiguous()
    return aten.conv2d.default(windows, weight, bias, list(stride), [0, 0], list(dilation), groups)


@register_lowering(ir_ops.linear_by_library)
def lower_linear_by_library(b, x, weight, bias, layout: SpatialLayout | None):
    """One GEMM (`kernels.reference.matmul_rows`) by the library the cost constants name for its rows (a
    gathered output's: the plan's) and dtype; on CPUs oneDNN, which runs 2-3x faster than MKL's SGEMM on AMD's."""
    out_features, in_features = b.dense_shape(1)
    dense_out = b.dense_value()
    rows = math.prod(dense_out.shape[:-1])
    if layout is not None:  # rows per pixel of the plan's blocks
        rows = rows // math.prod(layout.res)
    gemm = b.gemm_library(rows, out_features * in_features, dense_out.dtype, None if layout is None else layout.res)
    return _matmul_rows(b, x, weight, bias, gemm)


def _matmul_rows(b, rows, kernel, bias, gemm):
    """`kernels.reference.matmul_rows`, traced for a library known at bind time; in an eager program, whose plans
    may take another library for their number of rows (`Binding.gemm_library`), one kernel deciding at each call."""
    if isinstance(gemm, str):
        return reference.matmul_rows(rows, kernel, bias, gemm)
    return fisedit.matmul_rows.default(rows, kernel, bias, gemm)


@register_lowering(ir_ops.group_norm_recorded_stats)
def lower_group_norm_recorded_stats(b, x, num_groups: int, weight, bias, ref: CacheRef):
    """`kernels.reference.group_norm_affine` with the recorded mean and rstd, on an NCHW map or an (N, C,
    tokens) sequence."""
    layout = b.node.meta["fisedit_layout"]
    nchw = layout is not None and layout.kind == "map" and layout.dims == (2, 3)
    tokens = layout is not None and layout.kind == "seq" and layout.dims == (2,) and len(layout.shape) == 3
    if not (nchw or tokens):
        raise NotImplementedError(f"a sparse GroupNorm on a tensor that is neither NCHW nor (N, C, tokens): {layout}")
    mean, rstd = b.recorded(ref)
    return reference.group_norm_affine(x, weight, bias, mean, rstd, num_groups, layout.shape[0], layout.shape[1],
                                       len(layout.shape))


@register_lowering(ir_ops.repeat_over_blocks)
def lower_repeat_over_blocks(b, value, like):
    """`repeat_interleave` to the gathered tensor's rows (nothing for an operand of one batch item)."""
    shape = b.dense_shape(0)
    if not shape or shape[0] == 1:
        return value
    return value.repeat_interleave(like.shape[0] // shape[0], dim=0)


@register_lowering(ir_ops.relayout_gathered)
def lower_relayout_gathered(b, x, source: SpatialLayout, target: SpatialLayout):
    """Through the canonical (block-major) form, with the plan's block counts."""
    num_blocks, block = b.num_blocks(source.res), b.block(source.res)
    canonical = reference.to_canonical(x, source, source.shape[0], num_blocks)
    return reference.from_canonical(canonical, target, num_blocks, block, block)


@register_lowering(ir_ops.active_query_attention)
def lower_active_query_attention(b, query, key, value, key_ref: CacheRef, value_ref: CacheRef,
                           layout: SpatialLayout, scale: float | None = None):
    """The registered kernel (`fisedit.active_query_attention`), or inlined the reference's ATen ops, with
    the plan's active positions; the recorded keys and values are program inputs."""
    positions = b.index(ActivePixels(layout.res), False).field("recorded_index")
    kernel = reference.active_query_attention if b.inline_kernels else fisedit.active_query_attention.default
    return kernel(query, key, value, b.recorded(key_ref), b.recorded(value_ref), positions, scale)


@register_lowering(ir_ops.write_back)
def lower_write_back(b, fresh, ref: CacheRef, layout: SpatialLayout) -> None:
    """A registered in-place scatter (`fisedit.scatter_pixels_`) in programs bound with `write_back`;
    nothing in others."""
    if not b.write_back:
        return
    positions = b.index(ActivePixels(layout.res), False).field("recorded_index")
    recorded = b.recorded(ref)
    if layout.joint:  # the pixels (other tokens are always computed, never read from the record)
        recorded, fresh, layout = joint_pixels(recorded, layout), joint_pixels(fresh, layout), pixels_of(layout)
    fisedit.scatter_pixels_.default(recorded, fresh, *library.layout_args(layout), positions,
                                    b.num_blocks(layout.res))


# --- temporal reuse of deep levels (Policy.deep_reuse_interval) --------------------------------------------------


@register_lowering(ir_ops.keep_for_reuse)
def lower_keep_for_reuse(b, value, ref: CacheRef) -> None:
    """The value becomes a program output."""
    b.write(ref, value)


@register_lowering(ir_ops.reused)
def lower_reused(b, ref: CacheRef, layout: SpatialLayout):
    """A program input: the value the last full call kept."""
    return b.recorded(ref)


# --- cross-attention maps (record and control variants) --------------------------------------------------------


def _attention_probs(b, query, key, scale: float | None):
    scale = b.dense_shape(0)[-1] ** -0.5 if scale is None else scale
    return torch.softmax((query @ key.transpose(-1, -2)) * scale, dim=-1)


@register_lowering(ir_ops.cross_attention_recording_map)
def lower_cross_attention_recording_map(b, query, key, value, ref: CacheRef, scale: float | None = None):
    """In programs that record maps, softmax(QK^T)V written out and the map a program output; in
    others ATen's scaled dot-product attention."""
    if not b.record_attention_maps:
        return aten.scaled_dot_product_attention.default(query, key, value, scale=scale)
    probs = _attention_probs(b, query, key, scale)
    b.write(ref, probs)
    return probs @ value


@register_lowering(ir_ops.controlled_cross_attention)
def lower_controlled_cross_attention(b, query, key, value, ref: CacheRef, scale: float | None = None):
    """In programs bound with `control_maps`: softmax(QK^T)V written out, its map's columns gathered from the
    source map (a program input) by the token alignment (an input); the result a program output in programs that
    record maps. In others (a sparse variant's calls without control) ATen's scaled dot-product attention."""
    if not b.control_maps:
        return aten.scaled_dot_product_attention.default(query, key, value, scale=scale)
    probs = _controlled_probs(b, query, key, b.source(ref), scale)
    if b.record_attention_maps:
        b.write(ref, probs)
    return probs @ value


@register_lowering(ir_ops.controlled_active_cross_attention)
def lower_controlled_active_cross_attention(b, query, key, value, ref: CacheRef, layout: SpatialLayout | None,
                                            scale: float | None = None):
    """As `controlled_cross_attention`, the source map's rows taken at the plan's active pixels (the order the
    queries were gathered in); without `control_maps` the stock attention of the gathered queries."""
    if not b.control_maps:
        return aten.scaled_dot_product_attention.default(query, key, value, scale=scale)
    if layout is None or not layout.rows_of_pixels:
        raise NotImplementedError(
            f"{b.node.name}: a gathered cross-attention whose queries are not (batch, heads, pixels, head_dim) "
            f"(layout {layout}) cannot take the source's map rows: run its edits with Policy(controlled_steps=0)")
    positions = b.index(ActivePixels(layout.res), False).field("recorded_index")
    return _controlled_probs(b, query, key, b.source(ref).index_select(-2, positions), scale) @ value


def _controlled_probs(b, query, key, source_map, scale: float | None):
    """softmax(QK^T) with the columns of tokens the alignment maps to a source token taken from `source_map` (the
    source run's maps at the queries' pixels)."""
    probs = _attention_probs(b, query, key, scale)
    alignment = b.token_alignment()[:, None, None, :]  # (B, 1, 1, tokens)
    aligned = source_map.type_as(probs).gather(-1, alignment.clamp(min=0).expand_as(probs))
    return torch.where(alignment >= 0, aligned, probs)


# --- layout features (record and control variants) ------------------------------------------------------------


@register_lowering(ir_ops.layout_features)
def lower_layout_features(b, value, ref: CacheRef):
    """The source run's features (a program input) in programs that hold the layout; a program output in
    programs that record maps."""
    if b.hold_layout:
        value = b.source(ref).type_as(value)
    if b.record_attention_maps:
        b.write(ref, value)
    return value
