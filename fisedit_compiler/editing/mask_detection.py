"""Detect the region an edit affects from how the edit run's latents drift from the source run's (paper §3.1).

    diff = Normalize(sum over t = t1..t2 of |X_t - Y_t|)          (mean over latent channels)
    eps  = argmax over thresholds of OTSU(eps) = N1 N2 / (N1 + N2)^2 * (mean(A) - mean(B))^2,
           A = {diff < eps}, B = {diff >= eps}
    mask = diff >= eps, dilated by `Policy.mask_dilation`
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def otsu_threshold(values: torch.Tensor) -> float | None:
    """The threshold eps maximising OTSU(eps) over all candidate thresholds (the distinct values, each splitting
    the values into those below it and those at or above it); None if the values are all equal."""
    distinct, counts = torch.unique(values.detach().flatten().double(), return_counts=True)
    if distinct.numel() < 2:
        return None
    sums = distinct * counts
    below_count, below_sum = torch.cumsum(counts, 0)[:-1], torch.cumsum(sums, 0)[:-1]
    total_count, total_sum = counts.sum(), sums.sum()
    above_count, above_sum = total_count - below_count, total_sum - below_sum
    score = (below_count * above_count / total_count**2) * (below_sum / below_count - above_sum / above_count) ** 2
    return float(distinct[1 + int(torch.argmax(score))])


def difference_map(source: Sequence[torch.Tensor], edited: Sequence[torch.Tensor], first: int, last: int) -> torch.Tensor:
    """Normalised (B, H, W) map of how far the edited latents drifted from the source's over steps first..last
    (1-based, inclusive; `source[i]` are the latents after step i + 1)."""
    total = sum((edited[i] - source[i]).abs() for i in range(first - 1, last))
    diff = total.float().mean(dim=1)
    low = diff.amin(dim=(1, 2), keepdim=True)
    span = diff.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (diff - low) / span.clamp(min=torch.finfo(diff.dtype).tiny), torch.zeros_like(diff))


def detect_mask(diff: torch.Tensor, dilation: int = 0) -> torch.Tensor:
    """(B, 1, H, W) bool mask of the pixels at or above each batch item's Otsu threshold; empty where the map is
    constant."""
    masks = []
    for item in diff:
        eps = otsu_threshold(item)
        masks.append(item >= eps if eps is not None else torch.zeros_like(item, dtype=torch.bool))
    mask = torch.stack(masks)[:, None]
    if dilation:
        mask = F.max_pool2d(mask.float(), 2 * dilation + 1, stride=1, padding=dilation) > 0
    return mask
