"""From an edit mask to the index tensors that sparse calls gather and scatter with.

Everything mask-dependent is computed here, once per mask (EEdit's token index preprocessing), never per step:
the active blocks at every resolution and, per gather geometry (`ir.index.WindowSpec`: `ActivePixels`,
`FullImage`, `ConvWindows`, `Upsampled`), where each gathered pixel comes from (`ir.index.GatherIndex`). The
geometry and index types live in the IR, below the runtime and the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from ..cost_model import CostConstants, choose_block_size, load_constants
from ..ir.index import BlockLayout, GatherIndex, Resolution, WindowSpec, block_windows
from ..policy import Policy


class MaskPlan:
    """The active blocks and gather indices of one edit mask, built lazily per resolution and per geometry.

    `mask` is a bool tensor at latent resolution, `(H, W)` or `(B, 1, H, W)`. Compute runs on the union of the
    batch items' masks, so that every batch item (e.g. CFG's unconditional and conditional halves) gathers the
    same blocks. `extent`: the (H', W') at latent resolution that the model's pixel layouts span, when larger than
    the mask (FLUX Kontext's reference tokens, stacked below the picture's): the mask covers its top-left, the rest
    is never active.

    Each plan memoises what it builds in dicts of its own (not in a class-level cache), so that a dropped plan
    frees its index tensors and weight copies.
    """

    def __init__(self, mask: torch.Tensor, policy: Policy, constants: CostConstants | None = None,
                 channels: Mapping[Fraction, int] | None = None, output_downscale: int = 1,
                 extent: tuple[int, int] | None = None):
        self.policy = policy
        # the downscale of the map whose active blocks the model's output recomputes (a transformer's patch size)
        self.output_downscale = output_downscale
        self.constants = constants if constants is not None else load_constants(mask.device)
        # the model's channels per downscale factor of its maps (below 1 for maps finer than the latents: a VAE
        # decoder's), for the cost model
        self.channels = dict(channels or {})
        self._values: dict[Hashable, torch.Tensor] = {}  # what programs read of the plan (`value`)
        self.mask = mask
        self.device = mask.device
        # (1, 1, H, W) float union over the batch, for max-pooling to every resolution.
        union = mask.reshape(-1, *mask.shape[-2:]).any(dim=0)
        self.mask_res = tuple(union.shape)
        extent = tuple(extent) if extent is not None else self.mask_res
        if extent[0] < self.mask_res[0] or extent[1] < self.mask_res[1]:
            raise ValueError(f"a mask plan's extent {extent} must hold its mask {self.mask_res}")
        union = F.pad(union, (0, extent[1] - self.mask_res[1], 0, extent[0] - self.mask_res[0]))
        self._union = union[None, None].float()
        self._active_maps: dict[Resolution, torch.Tensor] = {}
        self._layouts: dict[Resolution, BlockLayout] = {}
        self._gather_indices: dict[tuple[WindowSpec, bool], GatherIndex] = {}

    @property
    def latent_res(self) -> Resolution:
        """The (H, W) at latent resolution that the plan spans: its extent."""
        return tuple(self._union.shape[-2:])  # type: ignore[return-value]

    def active_map(self, res: Resolution) -> torch.Tensor:
        """The (H, W) bool map of cells active at `res`: the mask max-pooled from the latents and dilated by the
        halo, in cells of `res` (`Policy.halo_unit` "cells") or, before pooling, in latent pixels ("latent_pixels")."""
        res = tuple(res)
        if res not in self._active_maps:
            self._active_maps[res] = self._build_active_map(res)
        return self._active_maps[res]

    def _build_active_map(self, res: Resolution) -> torch.Tensor:
        h = self.policy.halo
        if self.policy.halo_unit == "latent_pixels":
            grown = F.max_pool2d(self._union, kernel_size=2 * h + 1, stride=1, padding=h) if h else self._union
            active = F.adaptive_max_pool2d(grown, res)[0, 0] > 0
        else:
            pooled = F.adaptive_max_pool2d(self._union, res)
            if h:
                pooled = F.max_pool2d(pooled, kernel_size=2 * h + 1, stride=1, padding=h)
            active = pooled[0, 0] > 0
        if self.latent_res != self.mask_res:  # the halo stops at the mask's edge: beyond it are another picture's
            (h, w), (eh, ew) = self.mask_res, self.latent_res
            picture = F.pad(torch.ones(h, w, device=self.device), (0, ew - w, 0, eh - h))
            active &= F.adaptive_max_pool2d(picture[None, None], res)[0, 0] > 0
        return active

    def active_pixels(self, res: Resolution) -> torch.Tensor:
        """The (H, W) bool map of the pixels that sparse layers at `res` compute: their active blocks."""
        layout = self.layout(res)
        computed = torch.zeros(res[0] * res[1], dtype=torch.bool, device=self.device)
        computed[layout.pixel_to_gathered >= 0] = True
        return computed.reshape(res)

    def recomputed_pixels(self) -> torch.Tensor:
        """The (H, W) bool map (the mask's size) of latent pixels that a sparse call recomputes: the active blocks
        of the output's map (the latents', or a transformer's patches), each cell spread over the latent pixels it
        covers."""
        f = self.output_downscale
        h, w = self.latent_res
        computed = self.active_pixels((h // f, w // f))
        computed = computed.repeat_interleave(f, 0).repeat_interleave(f, 1) if f > 1 else computed
        return computed[:self.mask_res[0], :self.mask_res[1]]

    def constants_at(self, res: Resolution) -> CostConstants:
        """The cost constants for the map at `res`: those measured on a region of about its active pixels'
        size (`CostConstants.for_active`)."""
        return self.constants.for_active(int(self.active_map(res).sum()))

    def block_size(self, res: Resolution) -> int:
        """The policy's fixed block size (its largest divisor of the map size), or the cost model's choice."""
        if self.policy.block_size is None:
            channels = self.channels.get(Fraction(self.latent_res[0], res[0]))
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
        windows = block_windows(blocks, b, 0, b, res)
        pixel_to_gathered = torch.full((res[0] * res[1],), -1, dtype=torch.long, device=self.device)
        pixel_to_gathered[windows.rows * res[1] + windows.cols] = torch.arange(
            windows.rows.numel(), device=self.device
        )
        repeated = bucketed_count(len(blocks), self.policy.block_count_steps) - len(blocks)
        if repeated:  # repeats of the last block: computed like it, written where it is (the same values)
            blocks = torch.cat([blocks, blocks[-1:].expand(repeated, 2)])
        return BlockLayout(res, b, blocks, pixel_to_gathered, repeated)

    def gather_index(self, spec: WindowSpec, from_gathered: bool) -> GatherIndex:
        """Indices for reading `spec` from a gathered tensor (plus its recorded full value) or from a full one."""
        key = (spec, bool(from_gathered))
        if key not in self._gather_indices:
            self._gather_indices[key] = self._build_gather_index(spec, key[1])
        return self._gather_indices[key]

    def value(self, key: Hashable, make: Callable[[MaskPlan], Any]) -> Any:
        """A value derived from this plan for the programs that run it (an index tensor, a conv kernel flattened
        for pixel-wise blocks, a block count an eager program reads), made once: it lives as long as the plan (one
        edit)."""
        if key not in self._values:
            self._values[key] = make(self)
        return self._values[key]

    def release_values(self) -> None:
        """Drop what `value` made (at SD 1.5's size the flattened kernels alone are 2 GiB): a run whose calls are
        over lets the picture's decode reuse that memory. A later call makes them again."""
        self._values.clear()

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
            source_recorded, source_rows = _sources(flat, c.inside, None, 0)
            return GatherIndex(c, None, None, flat, c.inside, all_inside, identity,
                               source_recorded=source_recorded, source_rows=source_rows)
        position = layout.pixel_to_gathered[flat]
        from_fresh = (position >= 0) & c.inside
        identity = same_windows and bool(from_fresh.all()) and torch.equal(
            position, torch.arange(position.numel(), device=position.device))
        fresh_at = from_fresh.nonzero().flatten()
        source_recorded, source_rows = _sources(flat, c.inside & ~from_fresh, torch.where(from_fresh, position, -1),
                                                layout.num_pixels)
        return GatherIndex(c, from_fresh, position.clamp(min=0), flat, c.inside, all_inside, identity,
                           fresh_at, position[fresh_at], source_recorded, source_rows)


def bucketed_count(count: int, steps: int) -> int:
    """`count` rounded up to one of `steps` sizes per doubling (`Policy.block_count_steps`; 0: `count`)."""
    if steps == 0 or count <= steps:
        return count
    step = 2 ** (count.bit_length() - 1) // steps  # count lies in [2^e, 2^(e+1)): `steps` sizes of 2^e / steps
    return -(-count // step) * step


def _sources(flat: torch.Tensor, reads_recorded: torch.Tensor, fresh_position: torch.Tensor | None,
             fresh_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`GatherIndex.source_recorded` and `source_rows` of window pixels at flat positions `flat`: where
    `reads_recorded`, a pixel reads the recorded pixel there; else the fresh pixel `fresh_position` (where >= 0),
    else zero. The sources: `fresh_pixels` fresh pixels, the recorded ones, the zero pixel."""
    source_recorded, inverse = torch.unique(flat[reads_recorded], return_inverse=True)
    rows = torch.full_like(flat, fresh_pixels + source_recorded.numel())
    if fresh_position is not None:
        rows = torch.where(fresh_position >= 0, fresh_position, rows)
    rows[reads_recorded] = fresh_pixels + inverse
    return source_recorded, rows


def flattened_kernel_bytes(model: torch.nn.Module) -> int:
    """The most bytes a mask plan of `model` makes in flattened convolution kernels (`MaskPlan.value`: one copy of
    each plain convolution's weight larger than 1x1 that runs as one GEMM over pixel-wise blocks), which live for
    an edit's denoising steps: 2.0 GiB for SD 1.5's and SD 2's U-Nets, 1.2 GiB for SDXL's."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.dilation == (1, 1)
               and m.kernel_size != (1, 1))
