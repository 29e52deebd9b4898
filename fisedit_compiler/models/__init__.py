"""Seeded random-weight diffusers components for tests, benchmarks and demos, and the local pipeline loader.

The compiler has to be exercised on the U-Nets of real editing pipelines (SD 1.5,
SD 2.x, SDXL), but the hub cannot be reached and real checkpoints are far too large
for unit tests.  This package therefore holds the configs itself and builds every
pipeline component (U-Net, VAE, CLIP text encoders, CLIP tokenizer, scheduler) from
scratch with deterministic random weights. One room per concern:

* ``configs``: the architectures of sd15 / sd2 / sdxl, ``size="full"`` (the real
  shapes and FLOPs) or ``"tiny"`` (same block types and options, tiny channels);
* ``random_weights``: seeded initialisation, the random components and pipelines,
  and example U-Net inputs;
* ``tokenizer``: a small CLIP BPE tokenizer generated locally;
* ``loading``: ``load_pipeline`` (a real pipeline from a local folder) and SD's
  schedulers;
* ``sd3``, ``flux``: the diffusion transformers (SD3-medium's and FLUX.1-dev's configs,
  tiny ones, and tiny random pipelines);
* ``controlnet``: a ControlNet made from a random U-Net, and its family's ControlNet pipeline.

Public API (all importable from ``fisedit_compiler.models``)::

    ARCHS                                  # ("sd15", "sd2", "sdxl")
    unet_config(arch, size)                # kwargs for UNet2DConditionModel
    random_unet(arch, size, seed, dtype)   # seeded random UNet2DConditionModel (eval)
    example_unet_inputs(unet, batch, size) # seeded random keyword inputs of one U-Net call
    random_pipeline(arch, latent_size, seed, size, scheduler)
    load_pipeline(path)                    # a real pipeline from a local folder
    random_sd3_pipeline(latent_size)       # a tiny StableDiffusion3Pipeline (models.sd3)
    random_flux_pipeline(latent_size)      # a tiny FluxPipeline (models.flux)

plus the per-component builders (``random_vae``, ``random_text_encoder``,
``random_tokenizer``, ``make_scheduler`` ...) that ``random_pipeline`` is made of.

Nothing here touches the network: the tokenizer vocabulary is generated locally and
``load_pipeline`` only reads local folders.
"""

from .configs import (
    ARCHS,
    MODEL_MAX_LENGTH,
    SIZES,
    TINY_CROSS_ATTENTION_DIM,
    TINY_SDXL_PROJECTION_DIM,
    TINY_SDXL_TEXT_HIDDEN,
    TINY_SDXL_TIME_EMBED_DIM,
    Arch,
    Size,
    text_encoder_configs,
    unet_config,
    vae_config,
)
from .loading import SCHEDULERS, SchedulerName, load_pipeline, make_scheduler
from .random_weights import (
    example_unet_inputs,
    random_pipeline,
    random_text_encoder,
    random_unet,
    random_vae,
    reinit_parameters,
)
from .flux import random_flux_pipeline, random_flux_transformer
from .sd3 import random_sd3_pipeline, random_sd3_transformer
from .tokenizer import _WORDS, random_tokenizer, write_tokenizer_files

__all__ = [
    "ARCHS",
    "SCHEDULERS",
    "SIZES",
    "example_unet_inputs",
    "load_pipeline",
    "make_scheduler",
    "random_flux_pipeline",
    "random_flux_transformer",
    "random_pipeline",
    "random_sd3_pipeline",
    "random_sd3_transformer",
    "random_text_encoder",
    "random_tokenizer",
    "random_unet",
    "random_vae",
    "reinit_parameters",
    "text_encoder_configs",
    "unet_config",
    "vae_config",
    "write_tokenizer_files",
]
