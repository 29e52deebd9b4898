"""Plain-PyTorch kernels of the sparse path: vectorised index operations, no Python loop over blocks.

These are the CPU implementation and the ground truth that the Triton kernels are tested against.

Every gather works in a *canonical* form ``(B, pixels, rest)``: batch first, then the pixels (of the windows, in
window-major, row-major order), then all remaining dims flattened. `to_canonical` and `from_canonical` convert a
tensor of a given `SpatialLayout` (dense, gathered or windowed) to and from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir import SpatialLayout
from ..runtime.mask_plan import GatherIndex


def _map_permutation(layout: SpatialLayout) -> list[int]:
    """Dims of ``(B, windows, *dense_dims[1:])`` in canonical order ``(B, windows, h, w, *rest)``."""
    dh, dw = layout.dims
    return [0, 1, dh + 1, dw + 1] + [d + 1 for d in layout.rest_dims]


def to_canonical(x: torch.Tensor, layout: SpatialLayout, batch: int, num_windows: int) -> torch.Tensor:
    """``x`` holds `num_windows` windows per batch item in `layout`'s form; returns ``(B, pixels, rest)``."""
    if layout.kind == "map":
        x = x.reshape(batch, num_windows, *x.shape[1:]).permute(_map_permutation(layout))
    else:
        x = x.movedim(layout.dims[0], 1)
    return x.reshape(batch, -1, layout.rest_numel)


def from_canonical(
    y: torch.Tensor, layout: SpatialLayout, num_windows: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of `to_canonical` for windows of ``height x width`` pixels."""
    batch = y.shape[0]
    if layout.kind == "seq":
        return y.reshape(batch, -1, *layout.rest_shape).movedim(1, layout.dims[0])
    y = y.reshape(batch, num_windows, height, width, *layout.rest_shape)
    inverse = [0] * y.dim()
    for position, dim in enumerate(_map_permutation(layout)):
        inverse[dim] = position
    y = y.permute(inverse)
    return y.reshape(batch * num_windows, *y.shape[2:])


def gather_pixels(
    fresh: torch.Tensor | None,
    recorded: torch.Tensor,
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
) -> torch.Tensor:
    """Gather the windows of `index` from two sources, in `layout`'s form.

    A pixel reads `fresh` (a gathered tensor with `fresh_windows` blocks per batch item) where
    `index.from_fresh`, else `recorded` (full size), and zero outside the image. With `fresh=None`, `recorded` is
    the only source: a full-size tensor computed in this call.
    """
    batch = recorded.shape[0]
    h, w = layout.res
    source = to_canonical(recorded, layout, batch, 1).index_select(1, index.recorded_index)
    if fresh is not None and fresh.numel() > 0:
        fresh_pixels = to_canonical(fresh, layout, batch, fresh_windows).index_select(1, index.fresh_index)
        source = torch.where(index.from_fresh[None, :, None], fresh_pixels, source)
    if not index.all_inside:
        source = source * index.inside[None, :, None].to(source.dtype)
    c = index.windows
    return from_canonical(source, layout, c.num_windows, c.height, c.width)


def group_norm_affine(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
) -> torch.Tensor:
    """GroupNorm with given statistics: a per-(batch item, channel) affine map, for NCHW tensors whose batch dim
    holds ``B * windows`` rows (gathered blocks or windows of each batch item in turn)."""
    batch, channels = mean.shape[0], x.shape[1]
    scale = rstd.to(x.dtype).repeat_interleave(channels // num_groups, dim=1)
    shift = -mean.to(x.dtype).repeat_interleave(channels // num_groups, dim=1) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    rows_per_item = x.shape[0] // batch if batch else 0
    view = (-1, channels) + (1,) * (x.dim() - 2)
    scale = scale.repeat_interleave(rows_per_item, dim=0).reshape(view)
    shift = shift.repeat_interleave(rows_per_item, dim=0).reshape(view)
    return x * scale + shift


def group_norm_with_stats(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm returning (output, mean, rstd), each statistic of shape (B, groups)."""
    n, c = x.shape[:2]
    hw = x.numel() // (n * c) if n * c else 0
    out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, num_groups, eps)
    return out, mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


def repeat_over_blocks(value: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat a per-batch-item tensor so that it lines up with ``rows = B * windows`` gathered rows."""
    if value.dim() == 0 or value.shape[0] in (1, rows):
        return value
    return value.repeat_interleave(rows // value.shape[0], dim=0)


def active_query_attention(
    query: torch.Tensor,
    key_fresh: torch.Tensor,
    value_fresh: torch.Tensor,
    key_recorded: torch.Tensor,
    value_recorded: torch.Tensor,
    positions: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of active queries against all keys: fresh keys/values at the active `positions` (along dim -2),
    recorded ones elsewhere. Layout ``(B, heads, tokens, head_dim)``."""
    keys = key_recorded.index_copy(-2, positions, key_fresh.to(key_recorded.dtype))
    values = value_recorded.index_copy(-2, positions, value_fresh.to(value_recorded.dtype))
    return F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), scale=scale)
