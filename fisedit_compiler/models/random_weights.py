"""Seeded random weights: every pipeline component built from scratch, deterministic per seed on every device.

Each component (U-Net, VAE, text encoders) draws from a generator of its own, derived from the seed, and every
parameter is re-drawn (`reinit_parameters`) so that no layer is a library zero-init that tests could not see.
`example_unet_inputs` draws the keyword inputs of one U-Net call the same way; `random_pipeline` assembles a whole
text-to-image pipeline from the configs (`configs`), a generated tokenizer (`tokenizer`) and a scheduler
(`loading.make_scheduler`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .configs import MODEL_MAX_LENGTH, Arch, Size, check_arch_size, text_encoder_configs, unet_config, vae_config
from .loading import SchedulerName, make_scheduler
from .tokenizer import random_tokenizer

# Each component draws from its own generator so that e.g. changing the VAE config
# does not change the U-Net's weights for the same seed.
_COMPONENT_SEED_OFFSET = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


def _component_seed(seed: int, component: str) -> int:
    """Derive a distinct, stable generator seed per (seed, component)."""
    return seed * 16 + _COMPONENT_SEED_OFFSET[component]


@torch.no_grad()
def reinit_parameters(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter of ``module`` with seeded random values, in place.

    Why not keep the library initialisation: diffusers zero-initialises several
    layers (e.g. ``proj_out`` of transformer blocks, and checkpoint loading normally
    fills everything anyway), so a freshly constructed model can have branches that
    contribute exactly nothing, and tests on it would be vacuous (a compiler pass that
    drops an attention block would still "match").  Re-drawing every parameter makes
    every layer matter.  Values are drawn on the CPU in float32 from a dedicated
    generator, so they are identical on every device and do not depend on the global
    RNG state.

    Scales keep activations O(1) through the network: weights (>= 2-D, including
    embeddings) ~ N(0, 1/fan_in); biases ~ N(0, 0.02^2); 1-D gains (norm weights)
    ~ 1 + N(0, 0.1^2), so normalisations stay close to identity but not exactly it.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            values = torch.randn(param.shape, generator=generator) * fan_in**-0.5
        elif name.endswith("bias"):
            values = torch.randn(param.shape, generator=generator) * 0.02
        else:
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        param.copy_(values.to(dtype=param.dtype, device=param.device))
    return module


def _build_seeded(factory: Any, seed: int) -> Any:
    """Construct ``factory()`` with the global torch RNG seeded, then restore the RNG.

    The global seed makes construction deterministic even for anything the
    re-initialisation does not cover; ``fork_rng`` keeps the caller's RNG stream
    untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _finish(
    module: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Any:
    """Cast / move a freshly initialised (float32) model and put it in eval mode."""
    # Only cast when needed: diffusers' ModelMixin.to(dtype=...) logs a warning about
    # "modules to keep in float32" on every call, even a no-op float32 -> float32 one.
    if dtype != torch.float32:
        module = module.to(dtype=dtype)
    if device is not None:
        module = module.to(device)
    return module.eval()


def seeded_model(factory: Any, seed: int, component: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Any:
    """`factory()`'s module built and every parameter drawn from `component`'s seed stream (`_component_seed`),
    then cast and moved (`_finish`, eval mode): what every random component here is made with."""
    component_seed = _component_seed(seed, component)
    model = _build_seeded(factory, component_seed)
    reinit_parameters(model, component_seed)
    return _finish(model, dtype, device)


def random_unet(
    arch: Arch = "sd2",
    size: Size = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    sample_size: int | None = None,
    inpainting: bool = False,
) -> UNet2DConditionModel:
    """Build a seeded random-weight ``UNet2DConditionModel`` of ``arch`` (eval mode); ``inpainting``: its
    9-channel inpainting variant.

    ``sample_size`` overrides the config's latent size (it only sets the pipeline's
    default resolution; the U-Net itself accepts any multiple of its downsampling).
    Weights are initialised in float32 on the CPU, then cast to ``dtype`` and moved
    to ``device``, so the same seed gives the same weights everywhere.
    """
    config = unet_config(arch, size, inpainting)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return seeded_model(lambda: UNet2DConditionModel(**config), seed, "unet", dtype, device)


def random_vae(
    arch: Arch = "sd2",
    size: Size = "tiny",
    seed: int = 0,
    sample_size: int = 256,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> AutoencoderKL:
    """Build a seeded random-weight ``AutoencoderKL`` (eval mode)."""
    config = vae_config(arch, size, sample_size)
    return seeded_model(lambda: AutoencoderKL(**config), seed, "vae", dtype, device)


def random_text_encoder(
    config_kwargs: dict[str, Any],
    tokenizer: CLIPTokenizer,
    seed: int = 0,
    with_projection: bool = False,
    component: str = "text_encoder",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Build a seeded random CLIP text encoder matching ``tokenizer`` (eval mode).

    ``vocab_size`` and the special-token ids are taken from the tokenizer: CLIP
    pools the hidden state at the first ``eos_token_id``, so they must agree with the
    vocabulary.  (With the small generated vocabulary, "full" encoders therefore
    have a smaller token-embedding table than the real 49408-token one; this changes
    neither their compute nor their output shapes.)  ``component`` selects the seed
    stream ("text_encoder" or "text_encoder_2").
    """
    config = CLIPTextConfig(
        **config_kwargs,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return seeded_model(lambda: cls(config), seed, component, dtype, device)


def random_pipeline(
    arch: Arch = "sd2",
    latent_size: int = 32,
    seed: int = 0,
    size: Size = "tiny",
    scheduler: SchedulerName = "ddim",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    inpainting: bool = False,
) -> StableDiffusionPipeline | StableDiffusionInpaintPipeline | StableDiffusionXLPipeline:
    """Build a complete random-weight text-to-image pipeline of ``arch``.

    Returns a ``StableDiffusionPipeline`` (sd15, sd2; no safety checker) or a
    ``StableDiffusionXLPipeline`` (sdxl; two text encoders / tokenizers, no
    watermarker); with ``inpainting`` (sd15, sd2), a ``StableDiffusionInpaintPipeline``
    over a 9-channel U-Net.  The U-Net's ``sample_size`` is ``latent_size``, so the default
    image size is ``8 * latent_size``.  The progress bar is disabled.
    """
    check_arch_size(arch, size)
    if inpainting and arch == "sdxl":
        raise ValueError("random_pipeline builds inpainting pipelines of sd15 and sd2 only")
    # Components are cast / moved one by one (not with pipe.to) so that nothing is
    # cast twice; see _finish.
    placement: dict[str, Any] = {"dtype": dtype, "device": device}
    unet = random_unet(arch, size, seed, sample_size=latent_size, inpainting=inpainting, **placement)
    vae = random_vae(arch, size, seed, sample_size=8 * latent_size, **placement)
    text_configs = text_encoder_configs(arch, size)
    sched = make_scheduler(scheduler)

    tokenizer = random_tokenizer()
    text_encoder = random_text_encoder(text_configs[0], tokenizer, seed, **placement)
    components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": sched}
    if arch == "sdxl":
        tokenizer_2 = random_tokenizer()
        text_encoder_2 = random_text_encoder(
            text_configs[1], tokenizer_2, seed, with_projection=True, component="text_encoder_2", **placement
        )
        pipe = StableDiffusionXLPipeline(
            **components,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            force_zeros_for_empty_prompt=True,
            # explicit False: None would make diffusers probe for invisible-watermark
            add_watermarker=False,
        )
    else:
        cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        pipe = cls(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def example_unet_inputs(
    unet: torch.nn.Module,
    batch: int = 2,
    size: int = 32,
    seed: int = 0,
    text_len: int = MODEL_MAX_LENGTH,
    timestep: int | torch.Tensor = 500,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Keyword inputs of one call of a ``UNet2DConditionModel``: latents ``(batch, in_channels, size, size)``
    and text embeddings ``(batch, text_len, cross_attention_dim)`` drawn from a generator seeded with ``seed``,
    ``timestep`` (a number becomes a 0-d tensor; a tensor, e.g. one per batch item, is kept), and SDXL's added
    conditions (a random pooled text embedding, and the size conditioning of an image 8x the latents).

    The keys are in ``forward``'s argument order, so that ``compiled.variants(inputs)`` finds the variants that
    calls with them built. Tensors are drawn on the CPU, then floating ones are cast to ``dtype`` and all are moved
    to ``device``, so that a seed gives the same inputs everywhere.
    """
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=g),
        "timestep": timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(batch, text_len, config.cross_attention_dim, generator=g),
    }
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size conditioning
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        image = float(8 * size)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.tensor([[image, image, 0.0, 0.0, image, image]] * batch),
        }

    def place(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
        return value.to(device=device, dtype=cast)

    return place(inputs)
