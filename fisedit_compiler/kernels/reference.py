"""Plain-PyTorch kernels of the sparse path: vectorised index operations, no Python loop over blocks.

These are the CPU implementation and the ground truth that the Triton kernels are tested against.

Every gather works in a *canonical* form ``(B, pixels, rest)``: batch first, then the pixels (of the windows, in
window-major, row-major order), then all remaining dims flattened. `to_canonical` and `from_canonical` convert a
tensor of a given `SpatialLayout` (dense, gathered or windowed) to and from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..ir import GatherIndex, SpatialLayout
from .onednn import onednn_linear


def _map_permutation(layout: SpatialLayout) -> list[int]:
    """Dims of ``(B, windows, *dense_dims[1:])`` in canonical order ``(B, windows, h, w, *rest)``."""
    dh, dw = layout.dims
    return [0, 1, dh + 1, dw + 1] + [d + 1 for d in layout.rest_dims]


def to_canonical(x: torch.Tensor, layout: SpatialLayout, batch: int, num_windows: int) -> torch.Tensor:
    """``x`` holds `num_windows` windows per batch item in `layout`'s form; returns ``(B, pixels, rest)``."""
    if layout.kind == "map":
        x = x.unflatten(0, (batch, num_windows)).permute(_map_permutation(layout))
    else:
        x = x.movedim(layout.dims[0], 1)
    return x.reshape(batch, -1, layout.rest_numel)


def from_canonical(
    y: torch.Tensor, layout: SpatialLayout, num_windows: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of `to_canonical` for windows of ``height x width`` pixels. (Shape arithmetic from the arguments
    only, so that it traces with FX proxies.)"""
    rest = layout.rest_shape
    y = y.unflatten(-1, rest) if rest else y.squeeze(-1)
    if layout.kind == "seq":
        return y.movedim(1, layout.dims[0])
    y = y.unflatten(1, (num_windows, height, width))
    permutation = _map_permutation(layout)
    inverse = [0] * len(permutation)
    for position, dim in enumerate(permutation):
        inverse[dim] = position
    return y.permute(inverse).flatten(0, 1)


def select_pixels(full: torch.Tensor, layout: SpatialLayout, positions: torch.Tensor) -> torch.Tensor:
    """The pixels at flat `positions` of a full-size tensor, in canonical form ``(B, len(positions), rest)``.

    A map is indexed in its own memory layout (e.g. NCHW) and only the selected pixels are transposed, so that a
    gather never copies a full-size tensor."""
    if _adjacent_pixel_dims(layout):
        dh = layout.dims[0]
        flat = full.flatten(dh, dh + 1)
        if dh == flat.dim() - 1:  # pixels innermost (NCHW): `gather` reads them 1.5-3x faster than `index_select`
            pixels = flat.gather(dh, positions.expand(*flat.shape[:dh], positions.numel()))
        else:
            pixels = flat.index_select(dh, positions)
        return pixels.movedim(dh, 1).reshape(full.shape[0], positions.numel(), layout.rest_numel).contiguous()
    return to_canonical(full, layout, full.shape[0], 1).index_select(1, positions)


def _adjacent_pixel_dims(layout: SpatialLayout) -> bool:
    """A map whose two pixel dims can be flattened into one (e.g. NCHW)."""
    return layout.kind == "map" and layout.dims[1] == layout.dims[0] + 1


def is_whole_map(index: GatherIndex, layout: SpatialLayout) -> bool:
    c = index.windows
    return (_adjacent_pixel_dims(layout) and c.num_windows == 1 and (c.height, c.width) == tuple(layout.res)
            and index.all_inside)


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
    if fresh is not None and is_whole_map(index, layout):
        return _scatter_into_copy(fresh, recorded, index, layout, fresh_windows)
    return _expand_sources(gather_sources(fresh, recorded, index, layout, fresh_windows), index, layout)


def _scatter_into_copy(fresh: torch.Tensor, recorded: torch.Tensor, index: GatherIndex, layout: SpatialLayout,
                       fresh_windows: int) -> torch.Tensor:
    """A region exit (one window over the whole map): the recorded map, contiguous, with the fresh pixels written
    over it."""
    full = recorded.to(dtype=fresh.dtype, memory_format=torch.contiguous_format, copy=True)
    if index.fresh_at.numel():  # (an empty gathered tensor has no canonical form to index)
        fresh_pixels = to_canonical(fresh, layout, recorded.shape[0], fresh_windows).index_select(1, index.fresh_from)
        fresh_pixels = fresh_pixels.reshape(*fresh_pixels.shape[:2], *layout.rest_shape)
        dh = layout.dims[0]
        full.flatten(dh, dh + 1).index_copy_(dh, index.fresh_at, fresh_pixels.movedim(1, dh))
    return full


def gather_sources(
    fresh: torch.Tensor | None,
    recorded: torch.Tensor,
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pixels that `index`'s windows read, each once (`GatherIndex`'s sources), in canonical form
    ``(B, sources, rest)``: every pixel of `fresh`, then `recorded`'s at `index.source_recorded`, then (where some
    window pixel lies outside the image) a zero pixel. Written into `out` when given (e.g. a slice of the rest
    elements of a larger one: the sources of a concatenation's operand)."""
    batch, rest = recorded.shape[0], layout.rest_numel
    dtype = recorded.dtype if fresh is None else fresh.dtype
    fresh_pixels = 0 if fresh is None else fresh.numel() // (batch * rest)
    recorded_pixels = index.source_recorded.numel()
    count = fresh_pixels + recorded_pixels
    sources = out if out is not None else recorded.new_empty((batch, source_count(index, fresh_pixels), rest),
                                                              dtype=dtype)
    if fresh_pixels:
        sources[:, :fresh_pixels] = to_canonical(fresh, layout, batch, fresh_windows)
    if recorded_pixels:
        sources[:, fresh_pixels:count] = select_pixels(recorded, layout, index.source_recorded)
    if not index.all_inside:
        sources[:, count].zero_()
    return sources


def zero_outside(windows: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """`windows` with their pixels outside the map zeroed (`inside`: bool, broadcastable against them), or as they
    are where `inside` is None (every window lies inside the map)."""
    return windows if inside is None else windows * inside.type_as(windows)


def source_count(index: GatherIndex, fresh_pixels: int) -> int:
    """How many source pixels `gather_sources` gives per batch item, with `fresh_pixels` fresh ones."""
    return fresh_pixels + index.source_recorded.numel() + (not index.all_inside)


def _expand_sources(sources: torch.Tensor, index: GatherIndex, layout: SpatialLayout) -> torch.Tensor:
    """The windows of `index` from its sources (`gather_sources`): one row copy per window pixel."""
    batch, count, rest = sources.shape
    rows = index.source_rows
    if batch > 1:  # rows of every batch item in the (B * sources, rest) matrix
        rows = (rows + torch.arange(batch, device=rows.device)[:, None] * count).flatten()
    windows = sources.reshape(batch * count, rest).index_select(0, rows).reshape(batch, -1, rest)
    c = index.windows
    return from_canonical(windows, layout, c.num_windows, c.height, c.width)


def gather_pixels_by_selection(
    fresh: torch.Tensor | None,
    recorded: torch.Tensor,
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """`gather_pixels` (with `scale` and `shift`: `gather_pixels_affine_silu`) as whole-tensor selections: every
    window pixel selects its recorded pixel, then its fresh one where it has one, then zero outside the image.

    The same values as the kernels above, in a form a compiler fuses into one pass with indirect loads (programs
    compiled with `Policy.program_backend` inline it instead of calling the registered operator). Shapes come from
    the arguments only (it traces with FX proxies); `fresh` is None or has fresh pixels."""
    batch, c = layout.shape[0], index.windows
    out = to_canonical(recorded, layout, batch, 1).index_select(1, index.recorded_index)
    if fresh is not None:
        fresh_pixels = to_canonical(fresh, layout, batch, fresh_windows).index_select(1, index.fresh_index)
        out = torch.where(index.from_fresh[None, :, None], fresh_pixels, out.type_as(fresh_pixels))
    if scale is not None:
        out = F.silu(out.float() * scale[:, None, :] + shift[:, None, :]).type_as(out)
    if not index.all_inside:
        out = torch.where(index.inside[None, :, None], out, 0)
    out = from_canonical(out, layout, c.num_windows, c.height, c.width)
    if fresh is not None and is_whole_map(index, layout):  # a region exit: a contiguous map, as above
        out = out.contiguous()
    return out


def scatter_pixels_(
    recorded: torch.Tensor, fresh: torch.Tensor, layout: SpatialLayout, positions: torch.Tensor, fresh_windows: int
) -> torch.Tensor:
    """Write the gathered `fresh` pixels into `recorded` at flat pixel `positions`, in place where `recorded`'s
    memory allows it; returns the updated tensor (a contiguous copy if `recorded` was a non-contiguous map)."""
    batch = recorded.shape[0]
    if fresh.numel() == 0:
        return recorded
    values = to_canonical(fresh, layout, batch, fresh_windows).reshape(batch, -1, *layout.rest_shape)
    values = values.to(recorded.dtype)  # the cache may store activations in a narrower dtype
    if layout.kind == "seq":
        recorded.index_copy_(layout.dims[0], positions, values.movedim(1, layout.dims[0]))
        return recorded
    if not _adjacent_pixel_dims(layout):
        raise NotImplementedError(f"write-back into a map whose pixel dims are not adjacent: {layout}")
    recorded = recorded.contiguous()  # (a no-op for the contiguous maps the record taps store)
    dh = layout.dims[0]
    flat = recorded.flatten(dh, dh + 1)  # a view: writes land in `recorded`
    values = values.movedim(1, dh)
    if dh == flat.dim() - 1:  # pixels innermost (NCHW): `scatter_` writes them faster than `index_copy_`
        flat.scatter_(dh, positions.expand(values.shape), values.contiguous())
    else:
        flat.index_copy_(dh, positions, values)
    return recorded


def flat_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in, kh, kw) kernel as the (out, kh * kw * in) matrix that multiplies channels-last windows."""
    return weight.permute(0, 2, 3, 1).flatten(1).contiguous()


def conv_windows(
    windows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    dilation: list[int],
    groups: int,
    flat_kernels: dict[int, torch.Tensor] | None = None,
    algorithm: str = "nchw",
    gemm: str = "blas",
) -> torch.Tensor:
    """A padding-free convolution of a batch of windows, by `algorithm` (`conv_method`). im2col multiplies the
    windows' kernel footprints, flattened, with the flattened kernel: where each window is exactly one footprint
    (pixel-wise blocks) that is one large GEMM instead of thousands of tiny convolutions, and flattening is free for
    the channels-last windows that gathers produce. The flattened kernel is kept in `flat_kernels` (keyed by the
    weight's id) when given, since for SD's widest layers making it moves more memory than a small mask's GEMM.
    `gemm` names the library of that product (`matmul_rows`)."""
    kh, kw = weight.shape[-2:]
    method = conv_method(algorithm, (kh, kw), tuple(windows.shape[-2:]), dilation, groups)
    if method == "im2col":
        kernel = flat_kernels.get(id(weight)) if flat_kernels is not None else None
        if kernel is None:
            kernel = flat_kernel(weight.detach())
            if flat_kernels is not None:
                flat_kernels[id(weight)] = kernel
        out_size = tuple((w - k) // s + 1 for w, k, s in zip(windows.shape[-2:], (kh, kw), stride))
        return im2col_conv(windows, kernel, bias, windows.shape[1], (kh, kw), stride, out_size, gemm)
    if method == "nchw":
        windows = windows.contiguous()
    return F.conv2d(windows, weight, bias, stride, 0, dilation, groups)


def conv_method(algorithm: str, kernel_size: tuple[int, int], window_size: tuple[int, int], dilation: list[int],
                groups: int) -> str:
    """How `conv_windows` runs: im2col wherever each window is one kernel footprint (one GEMM, nothing copied),
    else `algorithm` (`cost_model.CONV_ALGORITHMS`, the device's measured choice); "nchw" for what im2col does not
    cover (dilated or grouped convolutions)."""
    plain = groups == 1 and tuple(dilation) == (1, 1)
    if plain and tuple(window_size) == tuple(kernel_size):
        return "im2col"
    if tuple(kernel_size) == (1, 1):
        return "channels_last"  # a pointwise conv on larger blocks: the library, on the blocks as they come
    if algorithm == "im2col" and not plain:
        return "nchw"
    return algorithm


def im2col_conv(
    windows: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None,
    in_channels: int,
    kernel_size: tuple[int, int],
    stride: list[int],
    out_size: tuple[int, int],
    gemm: str = "blas",
    matmul: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """A padding-free, undilated convolution of (N, C, h, w) windows as one GEMM (by `gemm`, see `matmul_rows`):
    every output pixel's footprint (kh, kw, C) a row, times `kernel` (`flat_kernel`). The output is (N, out, oh, ow),
    channels-last strided. (Sizes come from the arguments, so that it traces with FX proxies; `matmul`, default
    `matmul_rows`, multiplies: a tracer may give a function that records the product as one call.)"""
    kh, kw = kernel_size
    oh, ow = out_size
    rows = windows.permute(0, 2, 3, 1).unfold(1, kh, stride[0]).unfold(2, kw, stride[1])  # N, oh, ow, C, kh, kw
    flat = rows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * in_channels)
    return (matmul or matmul_rows)(flat, kernel, bias, gemm).unflatten(0, (-1, oh, ow)).permute(0, 3, 1, 2)


def matmul_rows(rows: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, gemm: str = "blas"
                ) -> torch.Tensor:
    """``rows @ kernel.T + bias`` for (..., k) `rows` and an (out, k) `kernel`: by BLAS (`F.linear`), or by oneDNN
    (`gemm="onednn"`, CPU), the library that runs PyTorch's dense CPU convolutions, through its linear primitive
    (registered as `torch.ops.fisedit.onednn_linear`; `cost_model.GEMM_LIBRARIES` says why both exist)."""
    if gemm == "blas":
        return F.linear(rows, kernel, bias)
    if gemm != "onednn":
        raise ValueError(f"gemm={gemm!r}: expected 'blas' or 'onednn'")
    return onednn_linear(rows, kernel, bias)


def group_norm_affine(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    batch: int,
    channels: int,
    ndim: int,
) -> torch.Tensor:
    """GroupNorm with given (batch, groups) statistics: a per-(batch item, channel) affine map, for `ndim`-D NCHW
    tensors whose batch dim holds ``batch * windows`` rows (gathered blocks or windows of each batch item in turn).
    (Shapes come from the arguments only, so that it traces with FX proxies.)"""
    scale = rstd.type_as(x).repeat_interleave(channels // num_groups, dim=1)
    shift = -mean.type_as(x).repeat_interleave(channels // num_groups, dim=1) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    view = (batch, 1, channels) + (1,) * (ndim - 2)
    # one pass, one output: on windows (e.g. 9 per pixel for pixel-wise blocks) this map is the sparse call's
    # largest elementwise op
    return torch.addcmul(shift.reshape(view), x.unflatten(0, (batch, -1)), scale.reshape(view)).flatten(0, 1)


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


# --- fused kernels: the references of the Triton versions in `triton_gather` ------------------------------------


def group_norm_scale_shift(
    channels: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A GroupNorm with given (B, groups) statistics as a per-(batch item, channel) affine map
    ``x * scale + shift``; returns float32 `scale` and `shift` of shape (B, channels)."""
    per_group = channels // num_groups
    scale = rstd.float().repeat_interleave(per_group, dim=1)
    shift = -mean.float().repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def gather_pixels_affine_silu(
    fresh: Sequence[torch.Tensor | None],
    recorded: Sequence[torch.Tensor],
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """`gather_pixels`, then ``silu(x * scale + shift)`` per (batch item, channel): a recorded-statistics GroupNorm
    and its SiLU applied to a convolution's input windows, computed in float32 and rounded once.

    `fresh` and `recorded` hold the operands of a concatenation along the layout's one non-pixel dim (a map's
    channels; one pair: no concatenation), each as `gather_pixels` takes them; `layout` is the concatenation's.
    `scale` and `shift` are (B, C) with C the layout's non-pixel elements (a map's channels), e.g. from
    `group_norm_scale_shift`. Pixels outside the image are zero *after* the activation: they stand for the
    convolution's zero padding. The map runs on the sources, each pixel once, before they are copied into the
    windows (a pixel-wise block's 3x3 window reads a pixel up to 9 times); a concatenation's operands write their
    sources side by side, so that the windows are copied once.
    """
    parts = operand_layouts(layout, recorded)
    if any(f is not None for f in fresh) and is_whole_map(index, layout):
        full = [_scatter_into_copy(f, r, index, part, fresh_windows) for f, r, part in zip(fresh, recorded, parts)]
        full = full[0] if len(full) == 1 else torch.cat(full, dim=layout.rest_dims[0])
        canonical = _affine_silu_(to_canonical(full, layout, full.shape[0], 1).contiguous(), scale, shift)
        return from_canonical(canonical, layout, 1, *layout.res).contiguous()
    batch = recorded[0].shape[0]
    fresh_pixels = [0 if f is None else f.numel() // (batch * part.rest_numel) for f, part in zip(fresh, parts)]
    if any(p != fresh_pixels[0] for p in fresh_pixels[1:]):  # (no set: sizes may be symbolic)
        raise ValueError(f"concatenated operands with {fresh_pixels} fresh pixels: they share one gather index, "
                         "so they need the same blocks")
    dtype = next((f.dtype for f in fresh if f is not None), recorded[0].dtype)
    sources = recorded[0].new_empty((batch, source_count(index, fresh_pixels[0]), layout.rest_numel), dtype=dtype)
    first = 0
    for f, r, part in zip(fresh, recorded, parts):
        end = first + part.rest_numel
        gather_sources(f, r, index, part, fresh_windows, out=sources[:, :, first:end])
        first = end
    count = sources.shape[1] - (not index.all_inside)  # the zero pixel stays zero
    _affine_silu_(sources[:, :count], scale, shift)
    return _expand_sources(sources, index, layout)


def operand_layouts(layout: SpatialLayout, recorded: Sequence[torch.Tensor]) -> list[SpatialLayout]:
    """The layouts of a concatenation's operands, by the size of `recorded`'s (full-size) tensors in the
    concatenated non-pixel dim of `layout`."""
    if len(recorded) == 1:
        return [layout]
    dim = layout.rest_dims[0] if len(layout.rest_dims) == 1 else None
    parts = [layout.with_rest_size(r.shape[dim]) for r in recorded] if dim is not None else []
    if not parts or sum(p.rest_numel for p in parts) != layout.rest_numel:
        raise ValueError(f"operands of shapes {[tuple(r.shape) for r in recorded]} do not concatenate to "
                         f"{layout.shape} along its non-pixel dim")
    return parts


def _affine_silu_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x = silu(x * scale + shift)`` in place, for canonical ``(B, pixels, C)`` `x` and float32 (B, C) `scale` and
    `shift`: computed in float32, rounded once."""
    y = (x * scale[:, None, :]).add_(shift[:, None, :])  # float32, as scale and shift are
    x.copy_(F.silu(y, inplace=True))
    return x
