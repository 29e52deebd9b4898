"""The ops that passes put into graph variants, and how each is lowered into a self-contained program.

A variant is an IR graph: besides ATen ops it calls the functions below with static arguments (layouts, gather
geometries, cache references) that say *what* to read, not the values. An IR graph does not run by itself.
`runtime.program.bind` lowers it for one call state (a mask plan, flags) into a program, an ordinary graph whose
inputs are the model's inputs plus everything the call reads (recorded tensors, the plan's index tensors) and
whose outputs are the model's outputs plus everything it records. Each op's lowering (`LOWERINGS`) receives the
`runtime.program.Binding` (`b`) and FX proxies for its node arguments, and emits ATen ops and registered kernels
(`torch.ops.fisedit`, `kernels.library`): decisions that depend on the plan (a gather that is the identity, windows that lie inside the
image, block counts) are taken here, at bind time, so that a program has no Python-level control flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..ir import ActivePixels, CacheRef, ConvWindows, FullImage, SpatialLayout, WindowSpec, concatenated
from ..kernels import library, reference
from ..kernels.library import INDEX_FIELDS

aten = torch.ops.aten
fisedit = torch.ops.fisedit

# IR op -> its lowering, `lowering(binding, *args, **kwargs)`.
LOWERINGS: dict[Callable, Callable] = {}


def ir_op(lowering: Callable) -> Callable:
    """Declare an IR op by its lowering; the op itself (what graphs call) only refuses to run unbound."""
    name = lowering.__name__

    def op(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} is an op of a fisedit IR graph, which does not run by itself: call the compiled model, or bind "
            "the variant into a program with fisedit_compiler.runtime.program.bind"
        )

    op.__name__ = op.__qualname__ = name
    op.__module__ = lowering.__module__
    op.__doc__ = lowering.__doc__
    LOWERINGS[op] = lowering
    return op


# --- record variant ---------------------------------------------------------------------------------------------


@ir_op
def record(b, value, ref: CacheRef) -> None:
    """Save a node's output for later sparse calls (a program output)."""
    b.write(ref, value)


@ir_op
def group_norm_recording_stats(b, x, num_groups: int, weight, bias, eps: float, ref: CacheRef):
    """GroupNorm that also saves its per-(batch item, group) mean and rstd."""
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
    alone, a full-size tensor computed in this call."""
    return _gather_operands(b, [source], [ref], [layout], spec)


def _gather_operands(b, sources: list, refs: list[CacheRef | None], layouts: list[SpatialLayout], spec: WindowSpec,
                     scale=None, shift=None):
    """`_gather` of the operands of a concatenation along their channels, concatenated (one operand: none). With
    `scale` and `shift` (over the concatenation's channels): GroupNorm's affine map and SiLU."""
    if len({ref is None for ref in refs}) != 1:
        raise ValueError("the operands of one gather read either all recorded values or none: they share its index")
    from_gathered = refs[0] is not None
    index = b.index(spec, from_gathered)
    fused = scale is not None
    if index.identity and not fused and len(sources) == 1:  # e.g. a resolution the cost model keeps dense
        return sources[0]
    layout = concatenated(layouts)
    if from_gathered:
        fresh, recorded, fresh_windows = list(sources), [b.recorded(ref) for ref in refs], b.num_blocks(layout.res)
    else:
        fresh, recorded, fresh_windows = [None] * len(sources), list(sources), 0
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


@ir_op
def gather_active(b, full, layout: SpatialLayout):
    """Region entry: the active blocks of a full-size tensor computed in this call."""
    return _gather(b, full, None, layout, ActivePixels(layout.res))


@ir_op
def gather_windows(b, source, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec):
    """Windows (e.g. conv inputs with halo) of a gathered tensor whose inactive pixels are recorded at `ref`;
    with `ref=None`, of a full-size tensor."""
    return _gather(b, source, ref, layout, spec)


@ir_op
def scatter_into_recorded(b, fresh, ref: CacheRef, layout: SpatialLayout):
    """Region exit: the full-size tensor, fresh on the active blocks and recorded elsewhere."""
    return _gather(b, fresh, ref, layout, FullImage(layout.res))


@ir_op
def gather_windows_norm_silu(b, sources: list, refs: list[CacheRef | None], layouts: list[SpatialLayout],
                             spec: WindowSpec, num_groups: int, weight, bias, stats_ref: CacheRef,
                             channels: tuple[int, int, int] | None = None, offset=None):
    """`gather_windows` of `sources` (with `refs` and `layouts`: the operands of a concatenation along the
    channels, or one), GroupNorm with the source run's statistics and SiLU in one kernel, zero outside the image
    (the following convolution's padding). `channels` (first, end, total): the operands hold that slice of the
    normalised channels (None: all of them). `offset`: a (B or 1, C, 1, 1) value added to the windows before the
    GroupNorm (a resnet's time embedding), folded into its shift."""
    mean, rstd = b.recorded(stats_ref)
    width = sum(layout.rest_numel for layout in layouts)
    first, end, total = channels if channels is not None else (0, width, width)
    scale, shift = reference.group_norm_scale_shift(total, weight, bias, mean, rstd, num_groups)
    if offset is not None:
        shift = shift + scale * offset.reshape(-1, total).float()
    if (first, end) != (0, total):
        scale, shift = scale[:, first:end].contiguous(), shift[:, first:end].contiguous()
    return _gather_operands(b, sources, refs, layouts, spec, scale, shift)


@ir_op
def zero_outside_image(b, windows, layout: SpatialLayout, spec: WindowSpec):
    """Zero window pixels that lie outside the map (a convolution's zero padding), after ops that made them
    non-zero."""
    index = b.index(spec, False)
    if index.all_inside:
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


@ir_op
def conv_windows(b, windows, weight, bias, stride: list[int], dilation: list[int], groups: int,
                 spec: ConvWindows):
    """A convolution over a batch of input windows (with halo) without padding: one output block per window, by
    the device's measured algorithm for its channels and block size (`CostConstants.conv_algorithm`; see
    `kernels.reference.conv_windows`). Where each window is one kernel footprint (pixel-wise blocks) it is one
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
        rows = dense_out.shape[0] * b.num_blocks(spec.output_res) * block * block  # one per output pixel
        gemm = b.gemm_library(rows, out_channels * in_channels * kh * kw, dense_out.dtype)
        return reference.im2col_conv(windows, kernel, bias, in_channels, (kh, kw), stride, out, gemm)
    # Gathered windows come channels-last strided (pixels outer, channels inner): "nchw" copies them first
    if method == "nchw":
        windows = windows.contiguous()
    return aten.conv2d.default(windows, weight, bias, list(stride), [0, 0], list(dilation), groups)


@ir_op
def linear_by_library(b, x, weight, bias, layout: SpatialLayout | None):
    """A linear layer as one GEMM by the library the cost constants name for its size and dtype
    (`CostConstants.gemm_library`; on CPUs oneDNN, which runs 2-3x faster than MKL's SGEMM on AMD's). `layout` is
    the output's where it is gathered: its rows are then those of the active pixels, a plan's block counts."""
    out_features, in_features = b.dense_shape(1)
    dense_out = b.dense_value()
    rows = math.prod(dense_out.shape[:-1])
    if layout is not None:
        rows = rows // math.prod(layout.res) * b.num_blocks(layout.res) * b.block(layout.res) ** 2
    gemm = b.gemm_library(rows, out_features * in_features, dense_out.dtype)
    return reference.matmul_rows(x, weight, bias, gemm)


@ir_op
def group_norm_recorded_stats(b, x, num_groups: int, weight, bias, ref: CacheRef):
    """GroupNorm with the source run's statistics: a per-channel affine map that runs on gathered blocks."""
    layout = b.node.meta["fisedit_layout"]
    nchw = layout is not None and layout.kind == "map" and layout.dims == (2, 3)
    tokens = layout is not None and layout.kind == "seq" and layout.dims == (2,) and len(layout.shape) == 3
    if not (nchw or tokens):
        raise NotImplementedError(f"a sparse GroupNorm on a tensor that is neither NCHW nor (N, C, tokens): {layout}")
    mean, rstd = b.recorded(ref)
    return reference.group_norm_affine(x, weight, bias, mean, rstd, num_groups, layout.shape[0], layout.shape[1],
                                       len(layout.shape))


@ir_op
def repeat_over_blocks(b, value, like):
    """Line a per-batch-item operand up with a gathered map tensor, whose batch dim holds B x blocks rows."""
    shape = b.dense_shape(0)
    if not shape or shape[0] == 1:
        return value
    return value.repeat_interleave(like.shape[0] // shape[0], dim=0)


@ir_op
def relayout_gathered(b, x, source: SpatialLayout, target: SpatialLayout):
    """A reshape of a gathered tensor: `source` and `target` are the dense layouts before and after."""
    num_blocks, block = b.num_blocks(source.res), b.block(source.res)
    canonical = reference.to_canonical(x, source, source.shape[0], num_blocks)
    return reference.from_canonical(canonical, target, num_blocks, block, block)


@ir_op
def active_query_attention(b, query, key, value, key_ref: CacheRef, value_ref: CacheRef,
                           layout: SpatialLayout, scale: float | None = None):
    """Self-attention of active queries against every token: fresh keys/values for active tokens, recorded ones
    for the rest. `layout` is the keys' (B, heads, tokens, head_dim) layout."""
    positions = b.index(ActivePixels(layout.res), False).field("recorded_index")
    kernel = reference.active_query_attention if b.inline_kernels else fisedit.active_query_attention.default
    return kernel(query, key, value, b.recorded(key_ref), b.recorded(value_ref), positions, scale)


@ir_op
def write_back(b, fresh, ref: CacheRef, layout: SpatialLayout) -> None:
    """In programs that write back, store a gathered node's fresh active pixels into its recorded tensor (an input
    the program updates in place), so the cache holds this run's activations (continuous editing). Safe mid-step:
    recorded values are only read at inactive pixels, which this never touches."""
    if not b.write_back:
        return
    positions = b.index(ActivePixels(layout.res), False).field("recorded_index")
    fisedit.scatter_pixels_.default(b.recorded(ref), fresh, *library.layout_args(layout), positions,
                                    b.num_blocks(layout.res))


# --- temporal reuse of deep levels (Policy.deep_reuse_interval) --------------------------------------------------


@ir_op
def keep_for_reuse(b, value, ref: CacheRef) -> None:
    """Full sparse calls: hand a deep level's output (full size) to the reuse calls that follow (a program
    output, which the run's mode keeps)."""
    b.write(ref, value)


# IR ops that a graph calls for what they store, not for a value: dead-code elimination keeps them.
WRITES = {keep_for_reuse}


@ir_op
def reused(b, ref: CacheRef, layout: SpatialLayout):
    """Reuse calls: a deep level's output as the last full call computed it, in place of computing the level.
    `layout`: the replaced node's."""
    return b.recorded(ref)


# --- cross-attention maps (record and control variants) --------------------------------------------------------


def _attention_probs(b, query, key, scale: float | None):
    scale = b.dense_shape(0)[-1] ** -0.5 if scale is None else scale
    return torch.softmax((query @ key.transpose(-1, -2)) * scale, dim=-1)


@ir_op
def cross_attention_recording_map(b, query, key, value, ref: CacheRef, scale: float | None = None):
    """Cross-attention that saves its attention map (B, heads, pixels, tokens) in programs that record maps.

    Those compute softmax(QK^T)V explicitly, exactly as `controlled_cross_attention` does, so that a control run of
    the same prompt reproduces the source run bit for bit."""
    if not b.record_attention_maps:
        return aten.scaled_dot_product_attention.default(query, key, value, scale=scale)
    probs = _attention_probs(b, query, key, scale)
    b.write(ref, probs)
    return probs @ value


@ir_op
def controlled_cross_attention(b, query, key, value, ref: CacheRef, scale: float | None = None):
    """Prompt-to-Prompt cross-attention control: for every token the edited prompt shares with the source prompt
    (the token alignment input: for each token the source token, or -1 for a new token) the source run's attention
    map column replaces the fresh one."""
    probs = _attention_probs(b, query, key, scale)
    batch, heads, pixels, _ = b.dense_shape(0)
    tokens = b.dense_shape(1)[-2]
    alignment = b.token_alignment()[:, None, None, :]  # (B, 1, 1, tokens)
    aligned = b.source(ref).type_as(probs).gather(-1, alignment.clamp(min=0).expand(batch, heads, pixels, tokens))
    probs = torch.where(alignment >= 0, aligned, probs)
    if b.record_attention_maps:
        b.write(ref, probs)
    return probs @ value


# --- layout features (record and control variants) ------------------------------------------------------------


@ir_op
def layout_features(b, value, ref: CacheRef):
    """The model's layout features (a U-Net's mid block output: where the objects are). Programs that hold the
    layout (control calls of a swap edit, `ControlMode.hold_layout`) return the source run's instead of `value`;
    programs that record cross-attention maps record what they return, beside the maps."""
    if b.hold_layout:
        value = b.source(ref).type_as(value)
    if b.record_attention_maps:
        b.write(ref, value)
    return value
