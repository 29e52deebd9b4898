"""Read a user-drawn mask image (white = edit) as a bool mask at latent resolution."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..inputs import mask_from_image


def load_mask_image(path: str | Path, latent: tuple[int, int], scale_factor: int = 8) -> torch.Tensor:
    """The mask image at `path` as an (H, W) bool tensor. It must be drawn at latent resolution (H x W) or at image
    resolution (f H x f W for the VAE's `scale_factor` f, 8 in Stable Diffusion; a latent pixel is active if most of
    its f x f image pixels are bright); see `inputs.mask_from_image`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask image {path} does not exist")
    with Image.open(path) as image:
        return mask_from_image(image, latent, scale_factor, what=f"mask image {path}")
