"""The adapter of diffusers' VAE `Decoder` (`AutoencoderKL.decoder`: Stable Diffusion's image decoder).

    pipe.vae.decoder = fisedit.compile(pipe.vae.decoder, policy)   # `vae.decode` now calls it
    with pipe.vae.decoder.record():            # the source image's decode, recorded
        image = pipe.vae.decode(z / s).sample
    with pipe.vae.decoder.sparse(changed):     # an edit's: only the blocks around the changed latents
        edited = pipe.vae.decode(z_edit / s).sample

Pixels: the latents `sample` (after `post_quant_conv`, a per-pixel map). The decoder is made of what the passes
already handle: convolutions, GroupNorm, nearest 2x upsampling to ever finer maps (at every resolution up to the
image's 8x the latents' the mask is upsampled to cells of that map), and one attention block at latent resolution
whose GroupNorm runs over its token sequence. It has no timestep: it is called once per image, so its record is
keyed as timestep 0. `EditSession` drives it (`editing.session`): the image of an edit is the source image outside
the recomputed region, bit for bit.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from .base import ModelAdapter, register_adapter


@register_adapter
class VAEDecoderAdapter(ModelAdapter):
    model_classes = ("Decoder",)
    latents = "sample"
    timestep = None
    refused = {"latent_embeds": "spatially conditioned decoders (MoVQ's) are not supported"}

    def call(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return (self.model(**inputs),)

    def wrap_output(self, outputs: tuple[torch.Tensor, ...], return_dict: bool) -> Any:
        return outputs[0]  # `Decoder.forward` returns the image tensor itself

    def channels(self) -> dict[Fraction, int]:
        """The width of each up block's map, from the latents' resolution (1) to the image's (1/8 for SD's VAE):
        an up block's last resnet's, the map halving in downscale after each block that upsamples."""
        widths: dict[Fraction, int] = {}
        scale = Fraction(1)
        for block in getattr(self.model, "up_blocks", ()):
            resnets = getattr(block, "resnets", None)
            if resnets:
                widths.setdefault(scale, int(resnets[-1].out_channels))
            if getattr(block, "upsamplers", None):
                scale /= 2
        return widths
