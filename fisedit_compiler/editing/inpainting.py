"""Sessions over inpainting pipelines (`StableDiffusionInpaintPipeline`, 9-channel U-Nets).

An inpainting U-Net takes, besides the latents, the mask at latent resolution and the latents of the picture with
the mask's pixels blanked. A session gives the pipeline those inputs itself, so that every run of a session is
reproducible: the picture's latents are the VAE's mean (the pipeline would draw a sample), and the mask is the
latent mask the session blends with, scaled up to pixels (the pipeline scales it back down, nearest, exactly).

- The source run of `load_image` (and its DDIM inversion) is conditioned on an empty mask and the whole picture:
  the inpainting model's way of saying "keep everything", so its activations describe the picture.
- An edit is conditioned on the user's mask and the current picture blanked inside it, as the inpainting
  pipeline would be. Outside the mask the conditioning equals the source's (up to the VAE encoder's reach across
  the mask's border), so the activations reused there are the ones the edit would compute.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .inversion import image_tensor
from .pipelines import denoiser


def is_inpainting(pipe) -> bool:
    """Whether `pipe` is an inpainting pipeline with an inpainting U-Net (latents + mask + masked-image latents)."""
    latent_channels = pipe.vae.config.latent_channels
    model = denoiser(pipe)
    if model.config.in_channels != 2 * latent_channels + 1:
        return False
    if "mask_image" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(f"the U-Net takes {model.config.in_channels} input channels (an inpainting U-Net) but "
                         f"{type(pipe).__name__} gives it no mask: load it in an inpainting pipeline "
                         "(StableDiffusionInpaintPipeline)")
    return True


@torch.no_grad()
def inpaint_inputs(pipe, picture: Any, mask: torch.Tensor | None) -> dict[str, Any]:
    """The inpainting pipeline's keyword inputs for a run over `picture` (an RGB PIL image of the session's size)
    with the latent-resolution bool `mask` (None: an empty mask, the whole picture kept)."""
    vae, scale = pipe.vae, pipe.vae_scale_factor
    pixels = image_tensor(picture, picture.height, picture.width).to(vae.device, vae.dtype)
    h, w = pixels.shape[-2] // scale, pixels.shape[-1] // scale
    latent_mask = torch.zeros(h, w, dtype=torch.bool) if mask is None else mask.cpu()
    pixel_mask = latent_mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[None, None].float()
    blanked = pixels * (pixel_mask.to(pixels.device) < 0.5)  # what the pipeline does with its own mask
    masked_latents = vae.encode(blanked).latent_dist.mean * vae.config.scaling_factor
    return {"image": picture, "mask_image": pixel_mask, "masked_image_latents": masked_latents, "strength": 1.0}


def inversion_condition(inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The channels an inpainting U-Net takes after the latents (mask, masked-image latents), for calls made
    outside the pipeline (DDIM inversion): `inputs` from `inpaint_inputs`, without guidance."""
    latents = inputs["masked_image_latents"]
    mask = torch.nn.functional.interpolate(inputs["mask_image"], size=latents.shape[-2:]).to(latents.device)
    return torch.cat([mask, latents], dim=1).to(dtype)
