"""The adapter of diffusers' `UNet2DConditionModel` (SD 1.x, SD 2.x, SDXL, and U-Nets called like them).

Pixels: the latents `sample`, and the ControlNet / T2I-Adapter residuals added to the down and mid blocks (NCHW
maps at each block's resolution; a sparse call gathers the fresh residuals of its call where a region reads them).
Everything else (timestep, text embeddings, SDXL's added conditions, attention masks) has no pixels. Norms are
GroupNorms and attention is separate self- (keys with pixels) and cross-attention (text keys), the rules the passes
apply by default.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from .base import ModelAdapter, register_adapter


@register_adapter
class UNet2DConditionAdapter(ModelAdapter):
    model_classes = ("UNet2DConditionModel",)
    latents = "sample"
    text = "encoder_hidden_states"
    timestep = "timestep"
    pixel_maps = frozenset({
        "down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
    })
    conditions = frozenset({
        "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "added_cond_kwargs",
        "encoder_attention_mask",
    })
    options = {"cross_attention_kwargs": {"scale": 1.0}}  # a LoRA scale (diffusers' apply_lora_scale)

    @property
    def layout_module(self) -> str | None:
        """The mid block, whose output is where the objects of the picture are (None for a U-Net without one)."""
        return "mid_block" if getattr(self.model, "mid_block", None) is not None else None

    def wrap_output(self, outputs: tuple[torch.Tensor, ...], return_dict: bool) -> Any:
        if not return_dict:
            return (outputs[0],)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=outputs[0])

    def channels(self) -> dict[Fraction, int]:
        widths = getattr(getattr(self.model, "config", None), "block_out_channels", None) or ()
        return {Fraction(2 ** i): int(c) for i, c in enumerate(widths)}
