"""The embedded shapes model's architecture: Stable Diffusion's components, sized for a 2-core CPU.

* ``AutoencoderKL`` with three blocks: two 2x downsamplings, so 128x128 images are 32x32x4 latents.  No attention in
  its mid block (the scenes are flat colours; attention over 1024 positions would double its cost).
* ``CLIPTextModel``, small, trained jointly with the U-Net, with a ``CLIPTokenizer`` in which every word of the
  caption grammar is one token and prompts are padded to ``TEXT_MAX_LENGTH``.
* ``UNet2DConditionModel`` with SD's block types, GroupNorm, epsilon prediction, in one of two layouts
  (``UNET_LAYOUTS``): ``"sd"`` (Stable Diffusion 1/2's: cross-attention blocks at the two highest resolutions, a plain
  down/up block at the lowest, a cross-attention mid block) or ``"sdxl"`` (SDXL's: a plain block at the highest
  resolution, cross-attention blocks below it; without the 1024-token self-attention a training step costs 0.74x).
* ``DDIMScheduler`` with SD's schedule (``models.make_scheduler``).

``FULL`` has the shipped model's sizes (its U-Net layout is the recipe's: ``"sdxl"`` for the shipped one);
``TINY`` has the same structure with a few channels, for the smoke test.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..models import write_tokenizer_files
from .shapes import GRAMMAR_WORDS, IMAGE_SIZE

__all__ = [
    "FULL",
    "LATENT_SIZE",
    "TEXT_MAX_LENGTH",
    "TINY",
    "UNET_LAYOUTS",
    "ModelSize",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "count_parameters",
    "model_size",
]

LATENT_SIZE = IMAGE_SIZE // 4
# The longest grammar caption ("a big purple triangle, a small yellow square and a big orange cross on a white
# checkered background") is 21 tokens with the start and end tokens.
TEXT_MAX_LENGTH = 32
# Which resolution levels (highest first) have cross-attention down/up blocks; the mid block always has one.
UNET_LAYOUTS: dict[str, tuple[bool, bool, bool]] = {"sd": (True, True, False), "sdxl": (False, True, True)}


@dataclass(frozen=True)
class ModelSize:
    """Channel counts and depths of the three trained components."""

    vae_channels: tuple[int, int, int]
    vae_groups: int
    unet_channels: tuple[int, int, int]
    unet_layers_per_block: int
    unet_heads: tuple[int, int, int]  # diffusers' ``attention_head_dim``: the number of heads per block
    unet_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    unet_cross_attention: tuple[bool, bool, bool] = UNET_LAYOUTS["sd"]  # per level, highest resolution first

    def describe_unet_layout(self) -> str:
        """The U-Net's blocks in words, for model cards."""
        sizes = [LATENT_SIZE >> level for level in range(3)]
        attention = [f"{size}x{size}" for size, cross in zip(sizes, self.unet_cross_attention) if cross]
        plain = [f"{size}x{size}" for size, cross in zip(sizes, self.unet_cross_attention) if not cross]
        return (f"cross-attention blocks at {' and '.join(attention)}, plain blocks at {' and '.join(plain)}, a "
                "cross-attention mid block")


FULL = ModelSize(
    vae_channels=(16, 32, 64), vae_groups=8,
    unet_channels=(32, 64, 128), unet_layers_per_block=1, unet_heads=(1, 2, 4), unet_groups=8,
    text_hidden=128, text_layers=3, text_heads=4,
)
TINY = ModelSize(
    vae_channels=(8, 8, 8), vae_groups=4,
    unet_channels=(16, 32, 32), unet_layers_per_block=1, unet_heads=(1, 2, 2), unet_groups=8,
    text_hidden=32, text_layers=1, text_heads=2,
)


def model_size(tiny: bool, unet_layout: str = "sd") -> ModelSize:
    """``TINY`` or ``FULL``, with the U-Net layout ``unet_layout`` (a key of ``UNET_LAYOUTS``)."""
    if unet_layout not in UNET_LAYOUTS:
        raise ValueError(f"unknown U-Net layout {unet_layout!r}; choose one of {sorted(UNET_LAYOUTS)}")
    return dataclasses.replace(TINY if tiny else FULL, unet_cross_attention=UNET_LAYOUTS[unet_layout])


def build_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE tokenizer of the caption grammar: each grammar word one token, context ``TEXT_MAX_LENGTH``."""
    with tempfile.TemporaryDirectory(prefix="fisedit_shapes_tok_") as tmp:
        write_tokenizer_files(tmp, words=GRAMMAR_WORDS, model_max_length=TEXT_MAX_LENGTH)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=TEXT_MAX_LENGTH)


def _seeded(factory: Any, seed: int) -> Any:
    """``factory()`` under a seeded global RNG (the libraries' own initialisation), restoring the RNG after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def build_vae(size: ModelSize, seed: int) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` (image size 128, latents 32x32x4)."""
    return _seeded(lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        norm_num_groups=size.vae_groups,
        act_fn="silu",
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    ), seed)


def build_unet(size: ModelSize, seed: int) -> UNet2DConditionModel:
    """A freshly initialised SD-style ``UNet2DConditionModel`` on 32x32x4 latents, in ``size``'s layout."""
    cross = size.unet_cross_attention
    return _seeded(lambda: UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=size.unet_channels,
        layers_per_block=size.unet_layers_per_block,
        attention_head_dim=size.unet_heads,
        norm_num_groups=size.unet_groups,
        cross_attention_dim=size.text_hidden,
        use_linear_projection=True,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    ), seed)


def build_text_encoder(size: ModelSize, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """A freshly initialised ``CLIPTextModel`` whose vocabulary and special tokens are ``tokenizer``'s."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=4 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        projection_dim=size.text_hidden,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(lambda: CLIPTextModel(config), seed)


def count_parameters(module: torch.nn.Module) -> int:
    """The number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
