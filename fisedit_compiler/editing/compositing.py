"""Pasting the source picture back outside an edit's mask, after decoding, as inpainting tools do.

The VAE decoder sees the whole latent map, so a decoded edit differs from the source picture a little everywhere
(and a loaded picture's reconstruction is not the picture). With `paste_back`, the pixels outside the mask are the
source picture's exactly, and inside they fade from the source's to the edit's over `feather` pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def feathered_alpha(mask: torch.Tensor, size: tuple[int, int], feather: int) -> torch.Tensor:
    """(H, W) float in [0, 1] at image `size` (w, h): 0 outside the latent `mask` (upsampled, nearest), rising to 1
    over `feather` pixels inside it (the mean of the mask eroded 0..feather-1 times)."""
    w, h = size
    inside = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")
    if feather <= 1:
        return inside[0, 0]
    total, eroded = torch.zeros_like(inside), inside
    for _ in range(feather):
        total += eroded
        eroded = 1 - F.max_pool2d(1 - eroded, 3, stride=1, padding=1)  # erode by one pixel (borders stay in)
    return (total / feather)[0, 0]


def paste_outside(edited: Image.Image, source: Image.Image, mask: torch.Tensor, feather: int) -> Image.Image:
    """`edited` with `source`'s pixels outside `mask` (latent resolution), feathered `feather` pixels inwards."""
    if edited.size != source.size:
        raise ValueError(f"the edited picture is {edited.size}, the source {source.size}: they must match")
    alpha = feathered_alpha(mask.cpu(), edited.size, feather).numpy()[..., None]
    a = np.asarray(edited.convert("RGB"), dtype=np.float32)
    b = np.asarray(source.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(alpha * a + (1 - alpha) * b), 0, 255).astype(np.uint8))
