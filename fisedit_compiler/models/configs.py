"""Architecture configs of the Stable Diffusion family's components, at the released size and tiny.

* ``size="full"`` reproduces the real architecture (for benchmarks: the shapes and the FLOPs are the real ones);
* ``size="tiny"`` keeps exactly the same block types and options but with tiny channel counts, so that a whole
  pipeline runs in well under a second on a CPU (for tests).

Configs are plain keyword dicts for ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextConfig``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

Arch = Literal["sd15", "sd2", "sdxl"]
Size = Literal["full", "tiny"]

ARCHS: tuple[str, ...] = ("sd15", "sd2", "sdxl")
SIZES: tuple[str, ...] = ("full", "tiny")

# CLIP's context length; every SD tokenizer pads / truncates prompts to it.
MODEL_MAX_LENGTH = 77


# ---------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------

_SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# SDXL has one level less and no attention at the highest resolution.
_SDXL_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

# Options shared by all SD-family U-Nets (the diffusers defaults, spelled out so the
# configs do not change meaning if a future diffusers changes a default).
_COMMON_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "dual_cross_attention": False,
    "only_cross_attention": False,
}

# NOTE on head counts: diffusers' ``attention_head_dim`` is, for these U-Nets, really
# the NUMBER of heads (a historical misnomer kept for checkpoint compatibility:
# ``num_attention_heads = num_attention_heads or attention_head_dim``).  The configs
# below therefore use ``attention_head_dim`` exactly as the real checkpoints do, and
# the tiny configs keep the same pattern: SD 1.5 has a constant head COUNT (8), SD 2.x
# and SDXL a constant head SIZE (64), so tiny sd15 has 2 heads everywhere and tiny
# sd2/sdxl have heads of 16 channels everywhere.
_FULL_UNETS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5, unet/config.json
    "sd15": {
        **_COMMON_UNET,
        "sample_size": 64,
        "down_block_types": _SD_DOWN_BLOCKS,
        "up_block_types": _SD_UP_BLOCKS,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "use_linear_projection": False,  # 1x1-conv proj_in / proj_out
        "upcast_attention": False,
    },
    # stabilityai/stable-diffusion-2-1 (768-v), unet/config.json
    "sd2": {
        **_COMMON_UNET,
        "sample_size": 96,
        "down_block_types": _SD_DOWN_BLOCKS,
        "up_block_types": _SD_UP_BLOCKS,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        # 2.1 upcasts attention to fp32 (2.0 did not); only matters for non-SDPA attention.
        "upcast_attention": True,
    },
    # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sdxl": {
        **_COMMON_UNET,
        "sample_size": 128,
        "down_block_types": _SDXL_DOWN_BLOCKS,
        "up_block_types": _SDXL_UP_BLOCKS,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (OpenCLIP bigG)
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "use_linear_projection": True,
        "upcast_attention": False,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        # pooled bigG text embedding (1280) + 6 micro-conditioning scalars * 256
        "projection_class_embeddings_input_dim": 2816,
    },
}

# Small dims of the tiny configs.  TINY_SDXL_TEXT_HIDDEN are the two text encoders'
# hidden sizes: they are concatenated by the SDXL pipeline, so they must sum to the
# U-Net's cross_attention_dim.
TINY_CROSS_ATTENTION_DIM = 32
TINY_SDXL_TEXT_HIDDEN = (16, 16)
TINY_SDXL_PROJECTION_DIM = 32  # pooled text_embeds of text_encoder_2
TINY_SDXL_TIME_EMBED_DIM = 8

_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "sd15": {
        "sample_size": 32,
        "block_out_channels": (32, 64, 64, 64),
        "attention_head_dim": 2,  # 2 heads at every level, like SD 1.5's 8
    },
    "sd2": {
        "sample_size": 32,
        "block_out_channels": (32, 64, 64, 64),
        "attention_head_dim": (2, 4, 4, 4),  # head size 16 everywhere, like SD 2's 64
    },
    "sdxl": {
        "sample_size": 32,
        "block_out_channels": (32, 64, 64),
        "attention_head_dim": (2, 4, 4),  # head size 16 everywhere, like SDXL's 64
        "transformer_layers_per_block": (1, 1, 1),
        "addition_time_embed_dim": TINY_SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TINY_SDXL_PROJECTION_DIM + 6 * TINY_SDXL_TIME_EMBED_DIM,
    },
}
_TINY_COMMON: dict[str, Any] = {
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
}


def check_arch_size(arch: str, size: str) -> None:
    """Raise a ValueError naming the valid choices for a bad ``arch`` / ``size``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


def unet_config(arch: Arch = "sd2", size: Size = "full", inpainting: bool = False) -> dict[str, Any]:
    """Return the ``UNet2DConditionModel`` kwargs of ``arch`` at ``size``.

    ``"full"`` is the released checkpoint's config; ``"tiny"`` has the same block
    types, attention placement, projection kind and addition embedding, with tiny
    channel counts.  ``inpainting``: the inpainting variant's 9 input channels (the
    latents, the mask and the masked image's latents, as in
    stable-diffusion-inpainting).  A fresh dict is returned on every call, so callers
    may edit it.
    """
    check_arch_size(arch, size)
    config = copy.deepcopy(_FULL_UNETS[arch])
    if size == "tiny":
        config.update(copy.deepcopy(_TINY_COMMON))
        config.update(copy.deepcopy(_TINY_OVERRIDES[arch]))
    if inpainting:
        config["in_channels"] = 2 * config["in_channels"] + 1
    return config


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------

# SD's latents are scaled by this constant before entering the U-Net.
_VAE_SCALING_FACTOR = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def vae_config(arch: Arch = "sd2", size: Size = "tiny", sample_size: int = 256) -> dict[str, Any]:
    """Return ``AutoencoderKL`` kwargs; ``sample_size`` is the IMAGE size.

    Four encoder / decoder blocks give three 2x resamplings, i.e. image size =
    8 x latent size as in every SD model (the pipelines derive ``vae_scale_factor``
    from the number of blocks).  ``"full"`` is the real SD VAE; ``"tiny"`` has
    8-16 channels per level.
    """
    check_arch_size(arch, size)
    full = size == "full"
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512) if full else (8, 8, 16, 16),
        "layers_per_block": 2 if full else 1,
        "norm_num_groups": 32 if full else 4,
        "act_fn": "silu",
        "latent_channels": 4,
        "sample_size": sample_size,
        "scaling_factor": _VAE_SCALING_FACTOR[arch],
    }


# ---------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------


def text_encoder_configs(arch: Arch = "sd2", size: Size = "tiny") -> list[dict[str, Any]]:
    """Return ``CLIPTextConfig`` kwargs for the text encoder(s) of ``arch``.

    One config for sd15 / sd2, two for sdxl (``text_encoder``, ``text_encoder_2``).
    The hidden size(s) are tied to the U-Net's ``cross_attention_dim`` (sdxl
    concatenates both encoders' hidden states) and, for sdxl, ``text_encoder_2``'s
    ``projection_dim`` to the U-Net's text_time embedding input.  ``"full"`` uses the
    real encoders' dims (CLIP ViT-L/14, OpenCLIP ViT-H with the 23 layers SD 2 keeps,
    OpenCLIP ViT-bigG); ``"tiny"`` uses 2 layers.  ``vocab_size`` is not included:
    it comes from the tokenizer (see ``random_text_encoder``).
    """
    check_arch_size(arch, size)
    if size == "full":
        clip_l = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
        open_clip_h = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                       "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu"}
        open_clip_g = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
        configs = {"sd15": [clip_l], "sd2": [open_clip_h], "sdxl": [clip_l, open_clip_g]}[arch]
    elif arch == "sdxl":
        h1, h2 = TINY_SDXL_TEXT_HIDDEN
        configs = [
            {"hidden_size": h1, "intermediate_size": 2 * h1, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": h1, "hidden_act": "quick_gelu"},
            {"hidden_size": h2, "intermediate_size": 2 * h2, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": TINY_SDXL_PROJECTION_DIM, "hidden_act": "gelu"},
        ]
    else:
        h = TINY_CROSS_ATTENTION_DIM
        configs = [{"hidden_size": h, "intermediate_size": 2 * h, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "projection_dim": h, "hidden_act": "quick_gelu"}]
    common = {"max_position_embeddings": MODEL_MAX_LENGTH, "layer_norm_eps": 1e-5}
    return [{**common, **c} for c in configs]
