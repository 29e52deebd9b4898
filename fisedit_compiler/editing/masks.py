"""Synthetic edit masks at latent resolution: the ellipse that the demo, `fisedit inspect`, the benchmarks and the
tests edit, and masks of an exact coverage."""

from __future__ import annotations

import torch


def ellipse_mask(size: int, fraction: float, center: tuple[float, float] = (0.45, 0.55), aspect: float = 1.5,
                 exact: bool = False, grid_offset: float = 0.5) -> torch.Tensor:
    """A (size, size) bool ellipse, `aspect` times as tall as wide, centred at `center` (fractions of the height
    and width), covering about `fraction` of the map; with `exact`, the `round(fraction * size**2)` pixels nearest
    the centre (ties included), so that the coverage is matched to the pixel. A pixel's coordinates are its index
    plus `grid_offset` (0.5: its centre; 0: its top-left corner). Never empty: a fraction below one pixel still
    marks the centre pixel."""
    if not 0 < fraction <= 1:
        raise ValueError(f"an ellipse mask covers a fraction in (0, 1] of the map, got {fraction}")
    yy, xx = torch.meshgrid(torch.arange(size) + grid_offset, torch.arange(size) + grid_offset, indexing="ij")
    cy, cx = center[0] * size, center[1] * size
    if exact:
        return coverage_mask((((yy - cy) / aspect) ** 2 + (xx - cx) ** 2).sqrt(), fraction)
    ry = (fraction * size * size / torch.pi * aspect) ** 0.5
    rx = ry / aspect
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if not mask.any():
        mask[int(cy), int(cx)] = True
    return mask


def centred_disk(shape: tuple[int, int], fraction: float) -> torch.Tensor:
    """An (H, W) bool disk centred on the map, round in the map's own proportions (an ellipse on a map that is not
    square), covering about `fraction` of it."""
    h, w = shape
    yy, xx = torch.meshgrid((torch.arange(h) + 0.5) / h - 0.5, (torch.arange(w) + 0.5) / w - 0.5, indexing="ij")
    return yy ** 2 + xx ** 2 <= fraction / torch.pi


def coverage_mask(distance: torch.Tensor, fraction: float) -> torch.Tensor:
    """The pixels of the `round(fraction * N)` smallest `distance`s (at least one; ties included)."""
    k = max(1, round(fraction * distance.numel()))
    threshold = distance.flatten().sort().values[k - 1]
    return distance <= threshold
