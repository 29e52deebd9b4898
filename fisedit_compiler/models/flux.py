"""FLUX.1 with seeded random weights: the transformer and a whole `FluxPipeline`.

    transformer = random_flux_transformer("tiny")          # FLUX's double and single blocks, tiny widths
    pipe = random_flux_pipeline(latent_size=32)            # CLIP + a tiny T5 encoder, the generated tokenizer
    kontext = random_flux_pipeline(latent_size=32, kontext=True)  # the same, as a FluxKontextPipeline

"full" is FLUX.1-dev's transformer (19 double and 38 single blocks, 3072 wide, guidance embedding). The tiny
pipeline's T5 encoder reads the generated CLIP tokenizer's ids (`tokenizer_2`: FluxPipeline only calls it), so it
builds without downloads. Its VAE is SD's tiny one with FLUX's scaling and shift; the transformer takes its latents
packed 2x2 into tokens (16 channels per token for 4 latent channels).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                       FluxTransformer2DModel)
from transformers import T5Config, T5EncoderModel

from .configs import Size, check_arch_size, text_encoder_configs, vae_config
from .random_weights import random_text_encoder, seeded_model
from .tokenizer import random_tokenizer

FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_TINY = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": (4, 4, 8),
}
FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def flux_transformer_config(size: Size = "tiny", **overrides: Any) -> dict[str, Any]:
    """`FluxTransformer2DModel` kwargs: FLUX.1-dev's ("full") or the tiny ones, with `overrides` applied."""
    check_arch_size("sd2", size)  # (the size check; FLUX is not one of the U-Net archs)
    return {**(FLUX_DEV if size == "full" else FLUX_TINY), **overrides}


def random_flux_transformer(size: Size = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                            device: torch.device | str | None = None, **overrides: Any) -> FluxTransformer2DModel:
    """A seeded random-weight `FluxTransformer2DModel` (eval mode)."""
    config = flux_transformer_config(size, **overrides)
    return seeded_model(lambda: FluxTransformer2DModel(**config), seed, "unet", dtype, device)


def random_flux_pipeline(latent_size: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None, kontext: bool = False) -> FluxPipeline:
    """A tiny random-weight `FluxPipeline` (flow matching, Euler, guidance embedding); `latent_size` is the VAE
    latents' side (the transformer sees half as many tokens per side), the image `8 * latent_size` pixels wide.
    `kontext`: a `FluxKontextPipeline` of the same components (it edits a picture it is given, whose tokens the
    transformer reads beside the latents')."""
    placement: dict[str, Any] = {"dtype": dtype, "device": device}
    transformer = random_flux_transformer("tiny", seed, **placement)
    latent_channels = transformer.config.in_channels // 4
    vae_kwargs = {**vae_config("sd2", "tiny", 8 * latent_size), **FLUX_VAE_SCALING, "latent_channels": latent_channels}
    vae = seeded_model(lambda: AutoencoderKL(**vae_kwargs), seed, "vae", **placement)
    tokenizer, tokenizer_2 = random_tokenizer(), random_tokenizer()
    clip = {**text_encoder_configs("sd2", "tiny")[0], "hidden_size": transformer.config.pooled_projection_dim,
            "intermediate_size": 2 * transformer.config.pooled_projection_dim}
    t5 = seeded_model(lambda: T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=transformer.config.joint_attention_dim, d_ff=64, d_kv=8, num_layers=2,
        num_heads=4, pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id)),
        seed, "text_encoder_2", **placement)
    pipe = (FluxKontextPipeline if kontext else FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=random_text_encoder(clip, tokenizer, seed, **placement), tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
