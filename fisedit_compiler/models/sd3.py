"""Stable Diffusion 3 (MMDiT) with seeded random weights: the transformer and a whole `StableDiffusion3Pipeline`.

    transformer = random_sd3_transformer("tiny")           # SD3's blocks, tiny widths
    pipe = random_sd3_pipeline(latent_size=32)             # two CLIP encoders, no T5 (the pipeline then uses zeros)

"full" is SD3-medium's transformer (24 joint blocks, 1536 wide, patch 2, 16 latent channels). The tiny pipeline has
no T5 encoder (`text_encoder_3=None`, which the pipeline supports: its 256 T5 tokens are zeros), so it builds from
the generated CLIP tokenizer alone. Its VAE is SD's tiny one with SD3's scaling and shift.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from .configs import Size, check_arch_size, text_encoder_configs, vae_config
from .random_weights import random_text_encoder, seeded_model
from .tokenizer import random_tokenizer

SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
# tiny: the two CLIP encoders' hidden states (16 + 16) fill the joint attention's text width, their projections (16 +
# 16) the pooled projection
_TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": 16, "hidden_act": "gelu"}
SD3_TINY = {
    "sample_size": 32, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 4, "joint_attention_dim": 32, "caption_projection_dim": 32,
    "pooled_projection_dim": 32, "out_channels": 4, "pos_embed_max_size": 64,
}
SD3_VAE_SCALING = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def sd3_transformer_config(size: Size = "tiny", **overrides: Any) -> dict[str, Any]:
    """`SD3Transformer2DModel` kwargs: SD3-medium's ("full") or the tiny ones, with `overrides` applied."""
    check_arch_size("sd2", size)  # (the size check; SD3 is not one of the U-Net archs)
    return {**(SD3_MEDIUM if size == "full" else SD3_TINY), **overrides}


def random_sd3_transformer(size: Size = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None, **overrides: Any) -> SD3Transformer2DModel:
    """A seeded random-weight `SD3Transformer2DModel` (eval mode)."""
    config = sd3_transformer_config(size, **overrides)
    return seeded_model(lambda: SD3Transformer2DModel(**config), seed, "unet", dtype, device)


def random_sd3_pipeline(latent_size: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, **overrides: Any) -> StableDiffusion3Pipeline:
    """A tiny random-weight `StableDiffusion3Pipeline` (flow matching, Euler) without T5; the transformer's
    `sample_size` is `latent_size`, so the default image is `8 * latent_size` pixels wide."""
    placement: dict[str, Any] = {"dtype": dtype, "device": device}
    transformer = random_sd3_transformer("tiny", seed, sample_size=latent_size, **overrides, **placement)
    vae_kwargs = {**vae_config("sd2", "tiny", 8 * latent_size), **SD3_VAE_SCALING,
                  "latent_channels": transformer.config.in_channels}
    vae = seeded_model(lambda: AutoencoderKL(**vae_kwargs), seed, "vae", **placement)
    common = text_encoder_configs("sd2", "tiny")[0]
    text = {**common, **_TINY_TEXT}
    tokenizer, tokenizer_2 = random_tokenizer(), random_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=random_text_encoder(text, tokenizer, seed, with_projection=True, **placement),
        tokenizer=tokenizer,
        text_encoder_2=random_text_encoder(text, tokenizer_2, seed, with_projection=True, component="text_encoder_2",
                                           **placement),
        tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
