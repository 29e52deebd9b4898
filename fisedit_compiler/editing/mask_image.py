"""Read a user-drawn mask image (white = edit) as a bool mask at latent resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_mask_image(path: str | Path, latent: tuple[int, int], scale_factor: int = 8) -> torch.Tensor:
    """The mask image at `path` as an (H, W) bool tensor. It must be drawn at latent resolution (H x W) or at image
    resolution (f H x f W for the VAE's `scale_factor` f, 8 in Stable Diffusion; a latent pixel is active if most of
    its f x f image pixels are bright)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask image {path} does not exist")
    image = Image.open(path).convert("L")
    h, w = latent
    f = scale_factor
    if image.size == (f * w, f * h):
        image = image.resize((w, h), Image.BOX)
    if image.size != (w, h):
        raise ValueError(
            f"mask image {path} is {image.size[0]}x{image.size[1]} pixels, but the latents are {w}x{h}: draw it "
            f"at {w}x{h} (latent resolution) or {f * w}x{f * h} (image resolution)"
        )
    return torch.from_numpy(np.array(image) > 127)
