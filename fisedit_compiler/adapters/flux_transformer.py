"""The adapter of diffusers' `FluxTransformer2DModel` (FLUX.1: double-stream and single-stream MMDiT blocks).

Pixels: the latents `hidden_states`, a packed token sequence `(B, tokens, C)`: FluxPipeline packs each 2x2 patch of
the VAE latents into one token, row-major over a grid that `img_ids` spells out (`(tokens, 3)`: 0, row, column). The
adapter reads the grid from `img_ids` and gives the latents a "seq" layout over it; a mask is at the VAE latents'
resolution (twice the grid: `output_downscale` 2). Everything else has no pixels: the text, the pooled text, the
timestep and guidance, and the ids themselves. The rotary embeddings computed from the ids vary along the tokens, so
`annotate_spatial_layout` gives them the tokens' layout (constants with pixels, gathered where a region reads them);
the double blocks' joint attention and the single blocks' joint sequences (text tokens first) are joint sequences.

FLUX Kontext appends the reference image's tokens to the latents' (`img_ids[:, 0]` = 1, the same grid again when
the reference is as large as the picture). The adapter stacks them below the picture: the layout's grid is the
picture's rows, then the reference's, and masks cover the picture's part (`mask_extent`), so the reference tokens
are never active: sparse calls read their recorded activations, as they do the picture's inactive tokens.
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

    def grids(self, inputs: dict[str, Any]) -> tuple[tuple[int, int], int]:
        """The picture's token grid (rows, columns) that `img_ids` spells out, and the rows of reference tokens
        (FLUX Kontext's, ids[:, 0] = 1) that follow it, as wide as the picture; an error for ids of another form."""
        ids = inputs.get("img_ids")
        tokens = inputs[self.latents].shape[1]
        if ids is None:
            raise UnsupportedModelError(f"{self.model_name} needs img_ids: they say where each token is")
        ids = (ids[0] if ids.dim() == 3 else ids).round().long().cpu()
        if ids.shape[0] != tokens:
            raise UnsupportedModelError(f"{self.model_name}: {ids.shape[0]} img_ids for {tokens} image tokens")
        picture = int((ids[:, 0] == 0).sum())
        rows, cols = _row_major(ids[:picture], self.model_name, "the picture's")
        if picture == tokens:
            return (rows, cols), 0
        if not (ids[picture:, 0] == 1).all():
            raise UnsupportedModelError(
                f"{self.model_name}: img_ids put {tokens - picture} tokens after the picture's that are not one "
                "reference image's (ids[:, 0] = 1, as FluxKontextPipeline makes them)")
        ref_rows, ref_cols = _row_major(ids[picture:], self.model_name, "the reference image's")
        if ref_cols != cols:
            raise UnsupportedModelError(
                f"{self.model_name}: the reference image is {ref_cols} tokens wide and the picture {cols}: sparse "
                "calls stack the reference's tokens below the picture's, so both must be as wide. Give "
                "FluxKontextPipeline the reference image's own height and width (and _auto_resize=False)")
        return (rows, cols), ref_rows

    def pixel_layout(self, name: str, value: torch.Tensor, path: str, inputs: dict[str, Any]) -> SpatialLayout:
        """The packed latents: a token sequence over the grid of `img_ids` (reference rows below the picture's)."""
        if value.dim() != 3:
            raise UnsupportedModelError(f"{self.model_name} takes packed latents (B, tokens, C); got shape "
                                        f"{tuple(value.shape)}")
        (rows, cols), ref_rows = self.grids(inputs)
        return SpatialLayout("seq", (rows + ref_rows, cols), (1,), tuple(value.shape))

    def latent_shape(self, inputs: dict[str, Any]) -> tuple[int, ...]:
        """The VAE latents' shape (B, C, H, W), which masks are drawn over: the picture's tokens unpacked."""
        batch, _, channels = inputs[self.latents].shape
        (rows, cols), _ = self.grids(inputs)
        return batch, channels // PACKING ** 2, rows * PACKING, cols * PACKING

    def mask_extent(self, inputs: dict[str, Any]) -> tuple[int, int]:
        """The picture's latents and the reference's below them, at latent resolution."""
        (rows, cols), ref_rows = self.grids(inputs)
        return (rows + ref_rows) * PACKING, cols * PACKING

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


def _row_major(ids: torch.Tensor, model: str, whose: str) -> tuple[int, int]:
    """(rows, columns) of the grid that the (row, column) ids in `ids[:, 1:]` spell out, row-major from (0, 0) as
    FluxPipeline makes them; an error otherwise."""
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    if rows * cols != ids.shape[0] or not torch.equal(ids[:, 1:], expected):
        raise UnsupportedModelError(f"{model}: img_ids do not spell out a row-major grid of {whose} "
                                    f"{ids.shape[0]} tokens (as FluxPipeline makes them)")
    return rows, cols
