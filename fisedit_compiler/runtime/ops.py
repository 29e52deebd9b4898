"""Graph-callable ops of the record and sparse variants.

Passes insert calls to these functions as `call_function` nodes. Their static arguments (layouts, gather
geometries, cache references) are fixed at compile time; what varies per call (recorded tensors, the mask's index
plan) they read from `context.current()`. Each forwards the numerical work to `kernels`.
"""

from __future__ import annotations

import torch

from ..ir import ActivePixels, CacheRef, FullImage, SpatialLayout, WindowSpec
from .. import kernels
from . import context

# --- record variant ---------------------------------------------------------------------------------------------


def record(value: torch.Tensor, ref: CacheRef) -> None:
    """Save a node's output for later sparse calls."""
    context.current().step[ref] = value.detach()


def group_norm_recording_stats(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    ref: CacheRef,
) -> torch.Tensor:
    """GroupNorm that also saves its per-(batch item, group) mean and rstd."""
    out, mean, rstd = kernels.group_norm_with_stats(x, num_groups, weight, bias, eps)
    context.current().step[ref] = (mean.detach(), rstd.detach())
    return out


# --- sparse variant ---------------------------------------------------------------------------------------------


def _gather_sources(
    source: torch.Tensor, ref: CacheRef | None, layout: SpatialLayout
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """A gather kernel's (fresh, recorded, fresh_windows): `source` is a gathered tensor whose inactive pixels are
    recorded at `ref`, or (`ref=None`) a full-size tensor computed in this call, the only source."""
    if ref is None:
        return None, source, 0
    ctx = context.current()
    return source, ctx.step[ref], ctx.plan.layout(layout.res).num_blocks


def _gather(source: torch.Tensor, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec) -> torch.Tensor:
    index = context.current().plan.gather_index(spec, ref is not None)
    if index.identity:  # e.g. a resolution the cost model keeps dense: one block covering the map
        return source
    fresh, recorded, fresh_windows = _gather_sources(source, ref, layout)
    return kernels.gather_pixels(fresh, recorded, index, layout, fresh_windows)


def gather_active(full: torch.Tensor, layout: SpatialLayout) -> torch.Tensor:
    """Region entry: the active blocks of a full-size tensor computed in this call."""
    return _gather(full, None, layout, ActivePixels(layout.res))


def gather_windows(
    source: torch.Tensor, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec
) -> torch.Tensor:
    """Windows (e.g. conv inputs with halo) of a gathered tensor whose inactive pixels are recorded at `ref`;
    with `ref=None`, of a full-size tensor."""
    return _gather(source, ref, layout, spec)


def conv_windows(
    windows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """A convolution over a batch of input windows (with halo) without padding: one output block per window.
    Weights flattened for pixel-wise blocks are kept for the mask plan's lifetime (one edit)."""
    plan = context.current().plan
    return kernels.conv_windows(windows, weight, bias, stride, dilation, groups, plan.flat_kernels)


def scatter_into_recorded(fresh: torch.Tensor, ref: CacheRef, layout: SpatialLayout) -> torch.Tensor:
    """Region exit: the full-size tensor, fresh on the active blocks and recorded elsewhere."""
    return _gather(fresh, ref, layout, FullImage(layout.res))


def gather_windows_norm_silu(
    source: torch.Tensor,
    ref: CacheRef | None,
    layout: SpatialLayout,
    spec: WindowSpec,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats_ref: CacheRef,
) -> torch.Tensor:
    """`gather_windows`, GroupNorm with the source run's statistics and SiLU in one kernel, zero outside the image
    (the following convolution's padding)."""
    ctx = context.current()
    mean, rstd = ctx.step[stats_ref]
    scale, shift = kernels.group_norm_scale_shift(layout.rest_numel, weight, bias, mean, rstd, num_groups)
    index = ctx.plan.gather_index(spec, ref is not None)
    fresh, recorded, fresh_windows = _gather_sources(source, ref, layout)
    return kernels.gather_pixels_affine_silu(fresh, recorded, index, layout, fresh_windows, scale, shift)


def zero_outside_image(windows: torch.Tensor, layout: SpatialLayout, spec: WindowSpec) -> torch.Tensor:
    """Zero window pixels that lie outside the map (a convolution's zero padding), after ops that made them
    non-zero."""
    index = context.current().plan.gather_index(spec, False)
    if index.all_inside:
        return windows
    c = index.windows
    inside = index.inside.to(windows.dtype).reshape(1, -1, 1).expand(layout.shape[0], -1, 1)
    return windows * kernels.from_canonical(inside, layout_with_rest(layout, ()), c.num_windows, c.height, c.width)


def layout_with_rest(layout: SpatialLayout, rest: tuple[int, ...]) -> SpatialLayout:
    """`layout` with its non-pixel dims replaced by size-1 dims of `rest` (for broadcastable masks)."""
    shape = list(layout.shape)
    for d in layout.rest_dims:
        shape[d] = 1
    return SpatialLayout(layout.kind, layout.res, layout.dims, tuple(shape))


def group_norm_recorded_stats(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, ref: CacheRef
) -> torch.Tensor:
    """GroupNorm with the source run's statistics: a per-channel affine map that runs on gathered blocks."""
    mean, rstd = context.current().step[ref]
    return kernels.group_norm_affine(x, weight, bias, mean, rstd, num_groups)


def repeat_over_blocks(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Line a per-batch-item operand up with a gathered map tensor, whose batch dim holds B x blocks rows."""
    return kernels.repeat_over_blocks(value, like.shape[0])


def relayout_gathered(x: torch.Tensor, source: SpatialLayout, target: SpatialLayout) -> torch.Tensor:
    """A reshape of a gathered tensor: `source` and `target` are the dense layouts before and after."""
    layout = context.current().plan.layout(source.res)
    canonical = kernels.to_canonical(x, source, source.shape[0], layout.num_blocks)
    return kernels.from_canonical(canonical, target, layout.num_blocks, layout.block, layout.block)


def active_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_ref: CacheRef,
    value_ref: CacheRef,
    layout: SpatialLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """Self-attention of active queries against every token: fresh keys/values for active tokens, recorded ones
    for the rest. `layout` is the keys' (B, heads, tokens, head_dim) layout."""
    ctx = context.current()
    index = ctx.plan.gather_index(ActivePixels(layout.res), False)
    return kernels.active_query_attention(
        query, key, value, ctx.step[key_ref], ctx.step[value_ref], index.recorded_index, scale
    )


# --- cross-attention maps (record and control variants) --------------------------------------------------------


def _attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float | None) -> torch.Tensor:
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((query @ key.transpose(-1, -2)) * scale, dim=-1)


def cross_attention_recording_map(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ref: CacheRef, scale: float | None = None
) -> torch.Tensor:
    """Cross-attention that saves its attention map (B, heads, pixels, tokens) in steps that record maps.

    In those steps it computes softmax(QK^T)V explicitly, exactly as `controlled_cross_attention` does, so that a
    control run of the same prompt reproduces the source run bit for bit."""
    ctx = context.current()
    if not ctx.record_attention_maps:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
    probs = _attention_probs(query, key, scale)
    ctx.step[ref] = probs.detach()
    return probs @ value


def controlled_cross_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ref: CacheRef, scale: float | None = None
) -> torch.Tensor:
    """Prompt-to-Prompt cross-attention control: for every token the edited prompt shares with the source prompt
    (`context.token_alignment[b, j]` = the source token, or -1 for a new token) the source run's attention map
    column replaces the fresh one."""
    ctx = context.current()
    probs = _attention_probs(query, key, scale)
    source_probs = ctx.source.get(ref) if ctx.source is not None else None
    if source_probs is None:
        raise RuntimeError(
            "this step has no recorded cross-attention maps to control with: record the source run with "
            "record(attention_maps=k) for at least as many steps as run under control"
        )
    alignment = ctx.token_alignment.to(probs.device)[:, None, None, :]  # (B, 1, 1, tokens)
    aligned = source_probs.to(probs.dtype).gather(-1, alignment.clamp(min=0).expand(*probs.shape[:-1], -1))
    probs = torch.where(alignment >= 0, aligned, probs)
    if ctx.record_attention_maps:
        ctx.step[ref] = probs.detach()
    return probs @ value


def write_back(fresh: torch.Tensor, ref: CacheRef, layout: SpatialLayout) -> None:
    """In steps that write back, store a gathered node's fresh active pixels into its recorded tensor, so the
    cache holds this run's activations (continuous editing). Safe mid-step: recorded values are only read at
    inactive pixels, which this never touches."""
    ctx = context.current()
    if not ctx.write_back:
        return
    layout_plan = ctx.plan.layout(layout.res)
    positions = ctx.plan.gather_index(ActivePixels(layout.res), False).recorded_index
    ctx.step[ref] = kernels.scatter_pixels_(ctx.step[ref], fresh, layout, positions, layout_plan.num_blocks)
