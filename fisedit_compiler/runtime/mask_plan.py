"""From an edit mask to the index tensors that sparse calls gather and scatter with.

Everything mask-dependent is computed here, once per mask (EEdit's token index preprocessing), never per step:
the active blocks at every resolution and, per gather geometry, where each gathered pixel comes from.

A gather geometry is a `WindowSpec`: a set of equally sized windows over a feature map, each pixel of which names
a source pixel (or lies outside the image and reads zero). The same mechanism serves every data movement of the
sparse variant:

- `ActivePixels(res)`: the active blocks themselves (the gathered form);
- `FullImage(res)`: one window covering the map (materialising a full-size tensor);
- `ConvWindows(...)`: for each output block of a convolution, its input window with halo;
- `Upsampled(inner, ...)`: the pixels of `inner` mapped back through nearest-neighbour upsampling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..cost_model import CostConstants, choose_block_size, load_constants
from ..ir import graph_constant
from ..policy import Policy

Resolution = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """The active b x b blocks of one resolution. Gathered pixels are ordered block-major, row-major inside."""

    res: Resolution
    block: int
    blocks: torch.Tensor  # (num_blocks, 2) block-grid coordinates (row, col), row-major order
    pixel_to_gathered: torch.Tensor  # (H*W,) position of each pixel among the gathered ones, -1 if inactive

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def num_pixels(self) -> int:
        return self.num_blocks * self.block * self.block

    @property
    def active_fraction(self) -> float:
        h, w = self.res
        return self.num_pixels / (h * w)


@dataclasses.dataclass(frozen=True)
class WindowCoords:
    """Source pixel coordinates for `num_windows` windows of `height x width` pixels, window-major."""

    num_windows: int
    height: int
    width: int
    rows: torch.Tensor  # (num_windows * height * width,) long
    cols: torch.Tensor
    inside: torch.Tensor  # bool: the pixel lies inside the source map (else it reads zero)


class WindowSpec:
    """A gather geometry; see the module docstring. Subclasses are frozen dataclasses, hashable as cache keys."""

    source_res: Resolution

    def coords(self, plan: MaskPlan) -> WindowCoords:
        raise NotImplementedError


def _block_windows(blocks: torch.Tensor, step: int, offset: int, size: int, res: Resolution) -> WindowCoords:
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

    def coords(self, plan: MaskPlan) -> WindowCoords:
        layout = plan.layout(self.source_res)
        return _block_windows(layout.blocks, layout.block, 0, layout.block, self.source_res)


@graph_constant
@dataclasses.dataclass(frozen=True)
class FullImage(WindowSpec):
    source_res: Resolution

    def coords(self, plan: MaskPlan) -> WindowCoords:
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

    def coords(self, plan: MaskPlan) -> WindowCoords:
        layout = plan.layout(self.output_res)
        step = layout.block * self.stride[0]
        return _block_windows(layout.blocks, step, -self.padding[0], self.window_size(layout.block), self.source_res)


@graph_constant
@dataclasses.dataclass(frozen=True)
class Upsampled(WindowSpec):
    """The pixels of `inner` (at the upsampled resolution) read through nearest upsampling from `source_res`."""

    inner: WindowSpec
    source_res: Resolution

    def coords(self, plan: MaskPlan) -> WindowCoords:
        c = self.inner.coords(plan)
        (h_in, w_in), (h_out, w_out) = self.source_res, self.inner.source_res
        # PyTorch's "nearest": src = floor(dst * in / out), exact in integers for the sizes U-Nets use.
        rows = torch.div(c.rows.clamp(min=0) * h_in, h_out, rounding_mode="floor")
        cols = torch.div(c.cols.clamp(min=0) * w_in, w_out, rounding_mode="floor")
        return dataclasses.replace(c, rows=rows, cols=cols)


@dataclasses.dataclass(frozen=True)
class GatherIndex:
    """Where each pixel of a `WindowSpec` comes from: `fresh[fresh_index]` where `from_fresh`, else
    `recorded[recorded_index]` where `inside`, else zero. Indices are flat pixel positions."""

    windows: WindowCoords
    from_fresh: torch.Tensor | None  # None when the source is a full-size tensor
    fresh_index: torch.Tensor | None
    recorded_index: torch.Tensor
    inside: torch.Tensor
    all_inside: bool
    identity: bool = False  # the windows are the source's own pixels in its own order: a gather is a no-op
    # The same, compacted: window pixels `fresh_at` read `fresh[fresh_from]`, window pixels `recorded_at` read
    # `recorded[recorded_from]`, the rest is zero. (None when the source is a full-size tensor.)
    fresh_at: torch.Tensor | None = None
    fresh_from: torch.Tensor | None = None
    recorded_at: torch.Tensor | None = None
    recorded_from: torch.Tensor | None = None


class MaskPlan:
    """The active blocks and gather indices of one edit mask, built lazily per resolution and per geometry.

    `mask` is a bool tensor at latent resolution, `(H, W)` or `(B, 1, H, W)`. Compute runs on the union of the
    batch items' masks, so that every batch item (e.g. CFG's unconditional and conditional halves) gathers the
    same blocks.

    Each plan memoises what it builds in dicts of its own (not in a class-level cache), so that a dropped plan
    frees its index tensors and weight copies.
    """

    def __init__(self, mask: torch.Tensor, policy: Policy, constants: CostConstants | None = None,
                 channels: Mapping[int, int] | None = None):
        self.policy = policy
        self.constants = constants if constants is not None else load_constants(mask.device)
        self.channels = dict(channels or {})  # the U-Net's channels per downscale factor, for the cost model
        self.flat_kernels: dict[int, torch.Tensor] = {}  # conv weights as matrices, for pixel-wise blocks
        self.mask = mask
        self.device = mask.device
        # (1, 1, H, W) float union over the batch, for max-pooling to every resolution.
        union = mask.reshape(-1, *mask.shape[-2:]).any(dim=0)
        self._union = union[None, None].float()
        self._active_maps: dict[Resolution, torch.Tensor] = {}
        self._layouts: dict[Resolution, BlockLayout] = {}
        self._gather_indices: dict[tuple[WindowSpec, bool], GatherIndex] = {}

    @property
    def latent_res(self) -> Resolution:
        return tuple(self._union.shape[-2:])  # type: ignore[return-value]

    def active_map(self, res: Resolution) -> torch.Tensor:
        """The (H, W) bool map of cells active at `res`: max-pooled from the latents, dilated by the halo."""
        res = tuple(res)
        if res not in self._active_maps:
            self._active_maps[res] = self._build_active_map(res)
        return self._active_maps[res]

    def _build_active_map(self, res: Resolution) -> torch.Tensor:
        pooled = F.adaptive_max_pool2d(self._union, res)
        h = self.policy.halo
        if h:
            pooled = F.max_pool2d(pooled, kernel_size=2 * h + 1, stride=1, padding=h)
        return pooled[0, 0] > 0

    def active_pixels(self, res: Resolution) -> torch.Tensor:
        """The (H, W) bool map of the pixels that sparse layers at `res` compute: their active blocks."""
        layout = self.layout(res)
        computed = torch.zeros(res[0] * res[1], dtype=torch.bool, device=self.device)
        computed[layout.pixel_to_gathered >= 0] = True
        return computed.reshape(res)

    def block_size(self, res: Resolution) -> int:
        """The policy's fixed block size (its largest divisor of the map size), or the cost model's choice."""
        if self.policy.block_size is None:
            channels = self.channels.get(self.latent_res[0] // res[0])
            return choose_block_size(self.active_map(res), constants=self.constants, channels=channels)
        g = math.gcd(*res)
        return max(d for d in range(1, min(self.policy.block_size, g) + 1) if g % d == 0)

    def layout(self, res: Resolution) -> BlockLayout:
        res = tuple(res)
        if res not in self._layouts:
            self._layouts[res] = self._build_layout(res)
        return self._layouts[res]

    def _build_layout(self, res: Resolution) -> BlockLayout:
        b = self.block_size(res)
        active = self.active_map(res)
        grid = active.reshape(res[0] // b, b, res[1] // b, b).any(dim=3).any(dim=1)
        blocks = grid.nonzero()
        windows = _block_windows(blocks, b, 0, b, res)
        pixel_to_gathered = torch.full((res[0] * res[1],), -1, dtype=torch.long, device=self.device)
        pixel_to_gathered[windows.rows * res[1] + windows.cols] = torch.arange(
            windows.rows.numel(), device=self.device
        )
        return BlockLayout(res, b, blocks, pixel_to_gathered)

    def gather_index(self, spec: WindowSpec, from_gathered: bool) -> GatherIndex:
        """Indices for reading `spec` from a gathered tensor (plus its recorded full value) or from a full one."""
        key = (spec, bool(from_gathered))
        if key not in self._gather_indices:
            self._gather_indices[key] = self._build_gather_index(spec, key[1])
        return self._gather_indices[key]

    @property
    def gather_indices_built(self) -> int:
        """How many gather indices this plan has built so far."""
        return len(self._gather_indices)

    def _build_gather_index(self, spec: WindowSpec, from_gathered: bool) -> GatherIndex:
        c = spec.coords(self)
        w = spec.source_res[1]
        flat = (c.rows.clamp(0, spec.source_res[0] - 1) * w + c.cols.clamp(0, w - 1))
        all_inside = bool(c.inside.all())
        layout = self.layout(spec.source_res)
        same_windows = (c.num_windows, c.height, c.width) == (layout.num_blocks, layout.block, layout.block)
        if not from_gathered:
            whole_map = c.num_windows == 1 and (c.height, c.width) == tuple(spec.source_res)
            identity = whole_map and all_inside and torch.equal(flat, torch.arange(flat.numel(), device=flat.device))
            return GatherIndex(c, None, None, flat, c.inside, all_inside, identity)
        position = layout.pixel_to_gathered[flat]
        from_fresh = (position >= 0) & c.inside
        identity = same_windows and bool(from_fresh.all()) and torch.equal(
            position, torch.arange(position.numel(), device=position.device))
        fresh_at = from_fresh.nonzero().flatten()
        recorded_at = (c.inside & ~from_fresh).nonzero().flatten()
        return GatherIndex(c, from_fresh, position.clamp(min=0), flat, c.inside, all_inside, identity,
                           fresh_at, position[fresh_at], recorded_at, flat[recorded_at])
