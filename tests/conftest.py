"""Shared fixtures: tiny random-weight U-Nets with the block types of SD 1.5, SD 2 and SDXL, and their inputs."""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run through Triton's CPU interpreter where there is no GPU, so that a plain `pytest` runs the
    # same tests as `make test`. Set before anything imports triton: it reads the flag when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fisedit_compiler.models import random_unet  # noqa: E402


@functools.lru_cache(maxsize=None)
def tiny_unet(arch: str):
    return random_unet(arch, "tiny", seed=0)


def unet_inputs(unet, batch: int = 2, size: int = 32, seed: int = 0, text_len: int = 7) -> dict:
    """Keyword inputs for one U-Net call: latents, a timestep, text embeddings (and SDXL's added conditions)."""
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, text_len, config.cross_attention_dim, generator=g),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32),
        }
    return inputs


def ellipse_mask(size: int, fraction: float, center=(0.4, 0.6)) -> torch.Tensor:
    """A (size, size) bool ellipse covering about `fraction` of the map."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ry = (fraction * size * size / torch.pi * 1.5) ** 0.5
    rx = ry / 1.5
    return ((yy - center[0] * size) / ry) ** 2 + ((xx - center[1] * size) / rx) ** 2 <= 1


def run_pipeline(pipe, prompt: str, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """The final latents of a CFG pipeline run from `latents` (cloned: pipelines scale them in place)."""
    size = latents.shape[-1]
    return pipe(prompt, latents=latents.clone(), num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                height=8 * size, width=8 * size).images


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to float rounding, relative to the output's scale."""
    return (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


@pytest.fixture(params=["sd15", "sd2", "sdxl"])
def arch(request) -> str:
    return request.param
