"""Gather geometries and index types of the sparse variant: what the passes put in graphs, the mask plan builds per
mask and the kernels read.

A gather geometry is a `WindowSpec`: a set of equally sized windows over a feature map, each pixel of which names
a source pixel (or lies outside the image and reads zero). The same mechanism serves every data movement of the
sparse variant:

- `ActivePixels(res)`: the active blocks themselves (the gathered form);
- `FullImage(res)`: one window covering the map (materialising a full-size tensor);
- `ConvWindows(...)`: for each output block of a convolution, its input windows with halo;
- `Upsampled(inner, ...)`: the pixels of `inner` mapped back through nearest-neighbour upsampling.

A geometry's `coords` reads the active blocks of a plan (`BlockPlan`: `runtime.mask_plan.MaskPlan`); `GatherIndex`
is what the plan makes of it, the flat index tensors a gather kernel takes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from .graph import graph_constant

Resolution = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """The active b x b blocks of one resolution. Gathered pixels are ordered block-major, row-major inside."""

    res: Resolution
    block: int
    blocks: torch.Tensor  # (num_blocks, 2) block-grid coordinates (row, col), row-major order
    pixel_to_gathered: torch.Tensor  # (H*W,) position of each pixel among the gathered ones, -1 if inactive
    repeated: int = 0  # trailing blocks that repeat the last one (`Policy.block_count_steps`), in `num_blocks`

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def num_pixels(self) -> int:
        return self.num_blocks * self.block * self.block

    @property
    def active_fraction(self) -> float:
        """The share of the map's pixels that the blocks cover (repeated blocks counted once)."""
        h, w = self.res
        return (self.num_blocks - self.repeated) * self.block * self.block / (h * w)


@dataclasses.dataclass(frozen=True)
class WindowCoords:
    """Source pixel coordinates for `num_windows` windows of `height x width` pixels, window-major."""

    num_windows: int
    height: int
    width: int
    rows: torch.Tensor  # (num_windows * height * width,) long
    cols: torch.Tensor
    inside: torch.Tensor  # bool: the pixel lies inside the source map (else it reads zero)


class BlockPlan(Protocol):
    """What a geometry reads of a mask plan (`runtime.mask_plan.MaskPlan`): its device and active blocks."""

    device: torch.device

    def layout(self, res: Resolution) -> BlockLayout: ...


class WindowSpec:
    """A gather geometry; see the module docstring. Subclasses are frozen dataclasses, hashable as cache keys."""

    source_res: Resolution

    def coords(self, plan: BlockPlan) -> WindowCoords:
        raise NotImplementedError


def block_windows(blocks: torch.Tensor, step: int, offset: int, size: int, res: Resolution) -> WindowCoords:
    """Windows of `size` pixels starting at `block * step + offset` for every block, clipped to `res` as `inside`."""
    ar = torch.arange(size, device=blocks.device)
    rows = (blocks[:, 0, None, None] * step + offset + ar[None, :, None]).expand(-1, size, size)
    cols = (blocks[:, 1, None, None] * step + offset + ar[None, None, :]).expand(-1, size, size)
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    inside = (rows >= 0) & (rows < res[0]) & (cols >= 0) & (cols < res[1])
    return WindowCoords(int(blocks.shape[0]), size, size, rows, cols, inside)


@graph_constant
@dataclasses.dataclass(frozen=True)
class ActivePixels(WindowSpec):
    source_res: Resolution

    def coords(self, plan: BlockPlan) -> WindowCoords:
        layout = plan.layout(self.source_res)
        return block_windows(layout.blocks, layout.block, 0, layout.block, self.source_res)


@graph_constant
@dataclasses.dataclass(frozen=True)
class FullImage(WindowSpec):
    source_res: Resolution

    def coords(self, plan: BlockPlan) -> WindowCoords:
        h, w = self.source_res
        rows = torch.arange(h, device=plan.device).repeat_interleave(w)
        cols = torch.arange(w, device=plan.device).repeat(h)
        return WindowCoords(1, h, w, rows, cols, torch.ones_like(rows, dtype=torch.bool))


@graph_constant
@dataclasses.dataclass(frozen=True)
class ConvWindows(WindowSpec):
    """Input windows, with halo, of a convolution whose output runs on the active blocks of `output_res`."""

    source_res: Resolution
    output_res: Resolution
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def __post_init__(self) -> None:
        if len({self.kernel[0] - self.kernel[1], self.stride[0] - self.stride[1], self.padding[0] - self.padding[1],
                self.dilation[0] - self.dilation[1]}) != 1 or self.kernel[0] != self.kernel[1]:
            raise ValueError(f"sparse convolutions need square kernels, strides, paddings and dilations: {self}")

    def window_size(self, block: int) -> int:
        return (block - 1) * self.stride[0] + (self.kernel[0] - 1) * self.dilation[0] + 1

    def coords(self, plan: BlockPlan) -> WindowCoords:
        layout = plan.layout(self.output_res)
        step = layout.block * self.stride[0]
        return block_windows(layout.blocks, step, -self.padding[0], self.window_size(layout.block), self.source_res)


@graph_constant
@dataclasses.dataclass(frozen=True)
class Upsampled(WindowSpec):
    """The pixels of `inner` (at the upsampled resolution) read through nearest upsampling from `source_res`."""

    inner: WindowSpec
    source_res: Resolution

    def coords(self, plan: BlockPlan) -> WindowCoords:
        c = self.inner.coords(plan)
        (h_in, w_in), (h_out, w_out) = self.source_res, self.inner.source_res
        # PyTorch's "nearest": src = floor(dst * in / out), exact in integers for the sizes U-Nets use.
        rows = torch.div(c.rows.clamp(min=0) * h_in, h_out, rounding_mode="floor")
        cols = torch.div(c.cols.clamp(min=0) * w_in, w_out, rounding_mode="floor")
        return dataclasses.replace(c, rows=rows, cols=cols)


@dataclasses.dataclass(frozen=True)
class GatherIndex:
    """Where each pixel of a `WindowSpec` comes from: `fresh[fresh_index]` where `from_fresh`, else
    `recorded[recorded_index]` where `inside`, else zero. Indices are flat pixel positions.

    The same as *sources*: the pixels the windows read, each once (all fresh pixels, in the gathered order, then the
    recorded pixels at `source_recorded`, then one zero pixel where some window pixel lies outside the image), and
    for each window pixel its row among them (`source_rows`). Overlapping windows (a 3x3 convolution's windows
    around pixel-wise blocks read each pixel up to 9 times) then cost one gather of the sources, any per-pixel map
    on them (a recorded-statistics GroupNorm and SiLU), and one row copy per window pixel."""

    windows: WindowCoords
    from_fresh: torch.Tensor | None  # None when the source is a full-size tensor
    fresh_index: torch.Tensor | None
    recorded_index: torch.Tensor
    inside: torch.Tensor
    all_inside: bool
    identity: bool = False  # the windows are the source's own pixels in its own order: a gather is a no-op
    # Window pixels `fresh_at` read `fresh[fresh_from]` (None when the source is a full-size tensor).
    fresh_at: torch.Tensor | None = None
    fresh_from: torch.Tensor | None = None
    source_recorded: torch.Tensor | None = None  # (recorded sources,) flat pixel positions, ascending
    source_rows: torch.Tensor | None = None  # (window pixels,) each one's row among the sources
