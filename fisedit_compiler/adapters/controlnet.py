"""The adapter of diffusers' `ControlNetModel` (SD 1.x/2.x/XL ControlNets): the U-Net's encoder over the latents plus
a control image, returning residuals for the U-Net's down and mid blocks.

    pipe.controlnet = fisedit.compile(pipe.controlnet, policy)   # EditSession does this for a ControlNet pipeline

Pixels: the latents `sample`, and the control image `controlnet_cond`, an NCHW map at image resolution (8x the
latents' for SD): its conditioning embedding's strided convolutions bring it down to the latents' resolution, which
the mask plan serves like the VAE decoder's finer maps. Everything else has no pixels. The outputs are the residuals,
one per down block output and one for the mid block, flattened into one tuple (`call`) and put back into the
ControlNet's form (`wrap_output`); a sparse call returns each one recorded outside the active blocks of its
resolution.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from .base import ModelAdapter, register_adapter


@register_adapter
class ControlNetAdapter(ModelAdapter):
    model_classes = ("ControlNetModel",)
    latents = "sample"
    text = "encoder_hidden_states"
    timestep = "timestep"
    pixel_maps = frozenset({"controlnet_cond"})
    conditions = frozenset({"timestep", "encoder_hidden_states", "conditioning_scale", "class_labels",
                            "timestep_cond", "attention_mask", "added_cond_kwargs", "guess_mode"})
    options = {"cross_attention_kwargs": {"scale": 1.0}}  # a LoRA scale (diffusers' apply_lora_scale)

    def call(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        down, mid = self.model(**inputs, return_dict=False)
        return (*down, mid)

    def wrap_output(self, outputs: tuple[torch.Tensor, ...], return_dict: bool) -> Any:
        down, mid = tuple(outputs[:-1]), outputs[-1]
        if not return_dict:
            return down, mid
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    def channels(self) -> dict[Fraction, int]:
        widths = getattr(getattr(self.model, "config", None), "block_out_channels", None) or ()
        return {Fraction(2 ** i): int(c) for i, c in enumerate(widths)}
