"""The adapter of diffusers' `FluxTransformer2DModel` (FLUX.1: double-stream and single-stream MMDiT blocks).

Pixels: the latents `hidden_states`, a packed token sequence `(B, tokens, C)`: FluxPipeline packs each 2x2 patch of
the VAE latents into one token, row-major over a grid that `img_ids` spells out (`(tokens, 3)`: 0, row, column). The
adapter reads the grid from `img_ids` and gives the latents a "seq" layout over it; a mask is at the VAE latents'
resolution (twice the grid: `output_downscale` 2). Everything else has no pixels: the text, the pooled text, the
timestep and guidance, and the ids themselves. The rotary embeddings computed from the ids vary along the tokens, so
`annotate_spatial_layout` gives them the tokens' layout (constants with pixels, gathered where a region reads them);
the double blocks' joint attention and the single blocks' joint sequences (text tokens first) are joint sequences.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from ..ir import SpatialLayout
from .base import ModelAdapter, UnsupportedModelError, register_adapter

PACKING = 2  # FluxPipeline packs 2x2 latent pixels into a token


@register_adapter
class FluxTransformerAdapter(ModelAdapter):
    model_classes = ("FluxTransformer2DModel",)
    latents = "hidden_states"
    timestep = "timestep"
    conditions = frozenset({"timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids",
                            "guidance", "controlnet_blocks_repeat"})
    options = {"joint_attention_kwargs": {"scale": 1.0}}  # a LoRA scale (diffusers' apply_lora_scale)
    refused = {
        "controlnet_block_samples": "FLUX ControlNet residuals are not supported yet",
        "controlnet_single_block_samples": "FLUX ControlNet residuals are not supported yet",
    }

    def grid(self, inputs: dict[str, Any]) -> tuple[int, int]:
        """The token grid that `img_ids` spells out; an error unless it is the row-major grid FluxPipeline makes."""
        ids = inputs.get("img_ids")
        tokens = inputs[self.latents].shape[1]
        if ids is None:
            raise UnsupportedModelError(f"{self.model_name} needs img_ids: they say where each token is")
        ids = ids[0] if ids.dim() == 3 else ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        if rows * cols != tokens or not torch.equal(ids[:, 1:].round().long().cpu(), expected) or ids[:, 0].any():
            raise UnsupportedModelError(
                f"{self.model_name}: img_ids do not spell out a row-major grid of the {tokens} image tokens (as "
                "FluxPipeline makes them); tokens of another image (FLUX Kontext's reference) are not supported yet")
        return rows, cols

    def pixel_layout(self, name: str, value: torch.Tensor, path: str, inputs: dict[str, Any]) -> SpatialLayout:
        """The packed latents: a token sequence over the grid of `img_ids`."""
        if value.dim() != 3:
            raise UnsupportedModelError(f"{self.model_name} takes packed latents (B, tokens, C); got shape "
                                        f"{tuple(value.shape)}")
        return SpatialLayout("seq", self.grid(inputs), (1,), tuple(value.shape))

    def latent_shape(self, inputs: dict[str, Any]) -> tuple[int, ...]:
        """The VAE latents' shape (B, C, H, W), which masks are drawn over: the packed tokens unpacked."""
        batch, _, channels = inputs[self.latents].shape
        rows, cols = self.grid(inputs)
        return batch, channels // PACKING ** 2, rows * PACKING, cols * PACKING

    def output_downscale(self) -> int:
        return PACKING

    def wrap_output(self, outputs: tuple[torch.Tensor, ...], return_dict: bool) -> Any:
        if not return_dict:
            return (outputs[0],)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=outputs[0])

    def channels(self) -> dict[Fraction, int]:
        config = self.model.config
        return {Fraction(PACKING): int(config.num_attention_heads) * int(config.attention_head_dim)}
