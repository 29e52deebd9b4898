"""The adapter of diffusers' `SD3Transformer2DModel` (Stable Diffusion 3 and 3.5: MMDiT, joint text+image attention).

Pixels: the latents `hidden_states`, an NCHW map that the model's patch embedding (a convolution with kernel and
stride `patch_size`) turns into one token per patch, with a learned positional embedding per patch added (a
constant with pixels: `annotate_spatial_layout` gives it the tokens' layout, and a sparse call gathers it like any
full-size tensor). The text (`encoder_hidden_states`), the pooled text embedding and the timestep have no pixels.
Each block's joint attention concatenates the image tokens and the text tokens along the sequence; the text tokens
are always computed (they are few), so in a sparse call the queries are the active image tokens and all text tokens,
and the keys and values all tokens (the inactive image tokens' recorded). The output is the prediction at latent
resolution, unpatchified from the tokens by a permutation (computed at full size after the tokens are scattered).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from .base import ModelAdapter, register_adapter


@register_adapter
class SD3TransformerAdapter(ModelAdapter):
    model_classes = ("SD3Transformer2DModel",)
    latents = "hidden_states"
    timestep = "timestep"
    conditions = frozenset({"timestep", "encoder_hidden_states", "pooled_projections"})
    options = {"joint_attention_kwargs": {"scale": 1.0}}  # a LoRA scale (diffusers' apply_lora_scale)
    refused = {
        "block_controlnet_hidden_states": "SD3 ControlNet residuals are not supported yet",
        "skip_layers": "skipping layers (skip-layer guidance) is not supported",
    }

    def wrap_output(self, outputs: tuple[torch.Tensor, ...], return_dict: bool) -> Any:
        if not return_dict:
            return (outputs[0],)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=outputs[0])

    def output_downscale(self) -> int:
        return int(self.model.config.patch_size)

    def channels(self) -> dict[Fraction, int]:
        """The token width at the patches' downscale (the patch size)."""
        config = getattr(self.model, "config", None)
        if config is None:
            return {}
        width = int(config.num_attention_heads) * int(config.attention_head_dim)
        return {Fraction(int(config.patch_size)): width}
