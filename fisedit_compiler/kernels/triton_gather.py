"""Triton kernels for the data movement of the sparse path: two-source gathers and their fused variant. Each
public function has the signature of its namesake in `reference` (the ground truth it
is tested against) and is reached through `kernels`' dispatch, never named by the runtime.

All pixel gathers run one kernel, `_gather_kernel`, on the canonical ``(B, pixels, rest)`` form: each output row
reads the fresh tensor, the recorded tensor or nothing (zero outside the image), with masked loads so that every
input byte is read at most once. A constexpr flag adds the fused epilogue: a per-(batch item, channel) affine map
and SiLU on every row (a recorded-statistics GroupNorm and its activation). The conversions between a layout and the
canonical form stay in PyTorch (`reference.to_canonical`, `from_canonical`); they are views for the usual
layouts, whose strides the kernel takes as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..ir import GatherIndex, SpatialLayout
from .reference import from_canonical, operand_layouts, to_canonical
from .triton_config import autotune

_GATHER_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_R": r}, num_warps=w)
    for p, r, w in [(64, 64, 4), (32, 128, 4), (16, 256, 4), (128, 32, 4), (128, 64, 8), (32, 256, 8)]
]


# The variants move different bytes per row, so each gets its own choice.
@autotune(
    _GATHER_CONFIGS, triton.Config({"BLOCK_P": 64, "BLOCK_R": 32}),
    key=["rest", "HAS_FRESH", "ALL_INSIDE", "AFFINE_SILU"],
)
@triton.jit
def _gather_kernel(
    out_ptr, fresh_ptr, recorded_ptr, scale_ptr, shift_ptr,
    from_fresh_ptr, fresh_index_ptr, recorded_index_ptr, inside_ptr,
    num_pixels, rest,
    fresh_stride_b, fresh_stride_p, fresh_stride_r,
    recorded_stride_b, recorded_stride_p, recorded_stride_r,
    out_stride_b, out_stride_p,
    HAS_FRESH: tl.constexpr, ALL_INSIDE: tl.constexpr, AFFINE_SILU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One (BLOCK_P pixels x BLOCK_R rest elements) tile of one batch item of the output."""
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    batch = tl.program_id(2).to(tl.int64)  # 64-bit offsets: a batch item's offset may pass 2**31 elements
    pixel_ok = pixels < num_pixels
    col_ok = cols < rest
    if ALL_INSIDE:
        inside = pixel_ok
    else:
        inside = tl.load(inside_ptr + pixels, mask=pixel_ok, other=0) != 0
    recorded_rows = inside
    if HAS_FRESH:
        from_fresh = tl.load(from_fresh_ptr + pixels, mask=pixel_ok, other=0) != 0
        recorded_rows = inside & ~from_fresh
        fresh_row = tl.load(fresh_index_ptr + pixels, mask=pixel_ok, other=0)
        fresh_value = tl.load(
            fresh_ptr + batch * fresh_stride_b + fresh_row[:, None] * fresh_stride_p + cols[None, :] * fresh_stride_r,
            mask=from_fresh[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
    recorded_row = tl.load(recorded_index_ptr + pixels, mask=pixel_ok, other=0)
    value = tl.load(
        recorded_ptr + batch * recorded_stride_b + recorded_row[:, None] * recorded_stride_p
        + cols[None, :] * recorded_stride_r,
        mask=recorded_rows[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    if HAS_FRESH:
        value = tl.where(from_fresh[:, None], fresh_value, value)
    if AFFINE_SILU:
        scale = tl.load(scale_ptr + batch * rest + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + batch * rest + cols, mask=col_ok, other=0.0)
        value = value * scale[None, :] + shift[None, :]
        value = value * tl.sigmoid(value)
        # Outside the image the window stands for the convolution's zero padding, which comes after the activation.
        value = tl.where(inside[:, None], value, 0.0)
    tl.store(
        out_ptr + batch * out_stride_b + pixels[:, None] * out_stride_p + cols[None, :],
        value.to(out_ptr.dtype.element_ty),
        mask=pixel_ok[:, None] & col_ok[None, :],
    )


def _gather_canonical(
    fresh: torch.Tensor | None,
    recorded: torch.Tensor,
    from_fresh: torch.Tensor | None,
    fresh_index: torch.Tensor | None,
    recorded_index: torch.Tensor,
    inside: torch.Tensor | None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch `_gather_kernel` on canonical ``(B, pixels, rest)`` sources; returns a contiguous canonical tensor,
    or writes `out` (with unit stride in its last dim, e.g. a slice of a larger one's) and returns it.

    Row ``i`` of the output reads ``fresh[:, fresh_index[i]]`` where `from_fresh`, else
    ``recorded[:, recorded_index[i]]`` where `inside` (None: everywhere), else zero. `fresh=None` (or empty)
    means a single source; `scale` and `shift` apply to every row.
    """
    has_fresh = fresh is not None and fresh.numel() > 0
    dtype = torch.promote_types(fresh.dtype, recorded.dtype) if has_fresh else recorded.dtype
    batch, rest, num_pixels = recorded.shape[0], recorded.shape[2], recorded_index.numel()
    if out is None:
        out = torch.empty(batch, num_pixels, rest, dtype=dtype, device=recorded.device)
    if out.numel() == 0:
        return out
    fresh_strides = fresh.stride() if has_fresh else (0, 0, 0)
    if scale is not None:  # read as (B, rest) rows of float32
        scale, shift = scale.float().contiguous(), shift.float().contiguous()
    # The kernel reads index vectors with unit stride.
    recorded_index, inside = (t if t is None else t.contiguous() for t in (recorded_index, inside))
    if has_fresh:
        from_fresh, fresh_index = from_fresh.contiguous(), fresh_index.contiguous()

    def grid(meta):
        return (triton.cdiv(num_pixels, meta["BLOCK_P"]), triton.cdiv(rest, meta["BLOCK_R"]), batch)

    _gather_kernel[grid](
        out, fresh if has_fresh else None, recorded, scale, shift,
        from_fresh if has_fresh else None, fresh_index if has_fresh else None, recorded_index, inside,
        num_pixels, rest,
        *fresh_strides, *recorded.stride(), out.stride(0), out.stride(1),
        HAS_FRESH=has_fresh, ALL_INSIDE=inside is None, AFFINE_SILU=scale is not None,
    )
    return out


def _gather_pixels(
    fresh: Sequence[torch.Tensor | None],
    recorded: Sequence[torch.Tensor],
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """`_gather_canonical` for tensors in `layout`'s form: of one operand, or of a concatenation's along its
    channels (`reference.operand_layouts`), one launch per operand writing its channels of the output."""
    parts = operand_layouts(layout, recorded)
    batch, c = recorded[0].shape[0], index.windows
    present = next((f for f in fresh if f is not None and f.numel() > 0), None)
    dtype = recorded[0].dtype if present is None else torch.promote_types(present.dtype, recorded[0].dtype)
    out = torch.empty(batch, index.recorded_index.numel(), layout.rest_numel, dtype=dtype,
                      device=recorded[0].device)
    first = 0
    for f, r, part in zip(fresh, recorded, parts):
        end = first + part.rest_numel
        epilogue = {} if scale is None else {"scale": scale[:, first:end], "shift": shift[:, first:end]}
        _gather_canonical(
            None if f is None else to_canonical(f, part, batch, fresh_windows), to_canonical(r, part, batch, 1),
            index.from_fresh, index.fresh_index, index.recorded_index, None if index.all_inside else index.inside,
            out=out[:, :, first:end], **epilogue,
        )
        first = end
    return from_canonical(out, layout, c.num_windows, c.height, c.width)


def gather_pixels(
    fresh: torch.Tensor | None,
    recorded: torch.Tensor,
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
) -> torch.Tensor:
    """Two-source gather; see `reference.gather_pixels`."""
    return _gather_pixels([fresh], [recorded], index, layout, fresh_windows)


def gather_pixels_affine_silu(
    fresh: Sequence[torch.Tensor | None],
    recorded: Sequence[torch.Tensor],
    index: GatherIndex,
    layout: SpatialLayout,
    fresh_windows: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """Two-source gather with GroupNorm affine and SiLU fused, of one operand or of a concatenation's; see
    `reference.gather_pixels_affine_silu`."""
    return _gather_pixels(fresh, recorded, index, layout, fresh_windows, scale, shift)
