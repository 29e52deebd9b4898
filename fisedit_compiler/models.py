"""Seeded random-weight diffusers components for tests, benchmarks and demos.

The compiler has to be exercised on the U-Nets of real editing pipelines (SD 1.5,
SD 2.x, SDXL), but the hub cannot be reached and real checkpoints are far too large
for unit tests.  This module therefore holds the U-Net configs itself and builds
every pipeline component (U-Net, VAE, CLIP text encoders, CLIP tokenizer, scheduler)
from scratch with deterministic random weights:

* ``size="full"`` reproduces the real architecture (for benchmarks: the shapes and the
  FLOPs are the real ones, only the weights are random);
* ``size="tiny"`` keeps exactly the same block types and options but with tiny channel
  counts, so that a whole pipeline runs in well under a second on a CPU (for tests).

Public API::

    ARCHS                                  # ("sd15", "sd2", "sdxl")
    unet_config(arch, size)                # kwargs for UNet2DConditionModel
    random_unet(arch, size, seed, dtype)   # seeded random UNet2DConditionModel (eval)
    example_unet_inputs(unet, batch, size) # seeded random keyword inputs of one U-Net call
    random_pipeline(arch, latent_size, seed, size, scheduler)
    load_pipeline(path)                    # a real pipeline from a local folder

plus the per-component builders (``random_vae``, ``random_text_encoder``,
``random_tokenizer``, ``make_scheduler`` ...) that ``random_pipeline`` is made of.

Nothing here touches the network: the tokenizer vocabulary is generated locally and
``load_pipeline`` only reads local folders.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "ARCHS",
    "SCHEDULERS",
    "SIZES",
    "example_unet_inputs",
    "load_pipeline",
    "make_scheduler",
    "random_pipeline",
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

Arch = Literal["sd15", "sd2", "sdxl"]
Size = Literal["full", "tiny"]
SchedulerName = Literal["ddim", "dpm", "pndm", "euler"]

ARCHS: tuple[str, ...] = ("sd15", "sd2", "sdxl")
SIZES: tuple[str, ...] = ("full", "tiny")
SCHEDULERS: tuple[str, ...] = ("ddim", "dpm", "pndm", "euler")

# CLIP's context length; every SD tokenizer pads / truncates prompts to it.
MODEL_MAX_LENGTH = 77

# ---------------------------------------------------------------------------
# U-Net configs
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


def _check_arch_size(arch: str, size: str) -> None:
    """Raise a ValueError naming the valid choices for a bad ``arch`` / ``size``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


def unet_config(arch: Arch = "sd2", size: Size = "full") -> dict[str, Any]:
    """Return the ``UNet2DConditionModel`` kwargs of ``arch`` at ``size``.

    ``"full"`` is the released checkpoint's config; ``"tiny"`` has the same block
    types, attention placement, projection kind and addition embedding, with tiny
    channel counts.  A fresh dict is returned on every call, so callers may edit it.
    """
    _check_arch_size(arch, size)
    config = copy.deepcopy(_FULL_UNETS[arch])
    if size == "tiny":
        config.update(copy.deepcopy(_TINY_COMMON))
        config.update(copy.deepcopy(_TINY_OVERRIDES[arch]))
    return config


# ---------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------

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


def random_unet(
    arch: Arch = "sd2",
    size: Size = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    sample_size: int | None = None,
) -> UNet2DConditionModel:
    """Build a seeded random-weight ``UNet2DConditionModel`` of ``arch`` (eval mode).

    ``sample_size`` overrides the config's latent size (it only sets the pipeline's
    default resolution; the U-Net itself accepts any multiple of its downsampling).
    Weights are initialised in float32 on the CPU, then cast to ``dtype`` and moved
    to ``device``, so the same seed gives the same weights everywhere.
    """
    config = unet_config(arch, size)
    if sample_size is not None:
        config["sample_size"] = sample_size
    component_seed = _component_seed(seed, "unet")
    unet = _build_seeded(lambda: UNet2DConditionModel(**config), component_seed)
    reinit_parameters(unet, component_seed)
    return _finish(unet, dtype, device)


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
    _check_arch_size(arch, size)
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
    component_seed = _component_seed(seed, "vae")
    vae = _build_seeded(lambda: AutoencoderKL(**config), component_seed)
    reinit_parameters(vae, component_seed)
    return _finish(vae, dtype, device)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# Words that get a whole-word token.  Chosen for image-editing prompts; anything
# else still tokenizes, falling back to sub-words and finally to single bytes.
_WORDS = """
a an the of in on at to for with by from and or but not no is are was were be been
it its this that these those there here as into onto over under near behind above
below between through up down out off around inside outside across along before after
one two three four five many some all every each very more most much other another same
different half top bottom left right front back side center middle has have had do does
did can will would should could may might must make change turn add remove replace keep
edit become made into while when where what who which how than then so too also just only
cabin house home city street road bridge river lake sea ocean beach coast wave waves
mountain mountains hill hills forest woods wood tree trees flower flowers garden field
grass sky cloud clouds sun moon star stars night day morning evening sunset sunrise rain
snow ice winter summer spring autumn fall water fire smoke light lights shadow shadows
window door room wall floor table chair bed kitchen car cars boat ship train plane bus
bike bird birds dog dogs cat cats horse horses fish cow sheep lion tiger bear wolf fox
rabbit deer man woman men women boy girl child children person people face eyes hair
hand hands head portrait photo photograph picture painting drawing sketch image art
artwork style red orange yellow green blue purple pink brown black white gray grey gold
golden silver dark bright old new young big small large little tall long short
beautiful pretty cute happy sad wooden stone glass metal snowy sunny rainy foggy misty
cloudy stormy calm quiet warm cold hot high low soft hard detailed realistic
photorealistic cinematic dramatic colorful vibrant sharp blurry wet dry empty full
sitting standing walking running flying swimming looking wearing holding playing eating
reading smiling oil watercolor digital render rendering lighting anime cartoon comic
pixel vintage retro modern futuristic ancient medieval fantasy magic magical castle
tower village town market shop cafe restaurant church temple palace ruins desert island
jungle valley canyon waterfall cave volcano path trail fence farm barn hat dress shirt
coat jacket shoes glasses robot astronaut king queen knight dragon spaceship planet space
galaxy universe earth world nature landscape scene view background foreground camera
lens closeup close wide angle shot quality best masterpiece resolution hd detail details
texture colors color painted style studio cozy lamp candle street neon cyberpunk
steampunk sculpture statue marble bronze paper fabric leather sand rock rocks cliff
shore harbor lighthouse pier dock boats sails sail storm thunder lightning rainbow
fireworks lantern lanterns festival crowd party dancing music guitar piano book books
library school office building buildings skyscraper skyline apartment roof chimney
smoke garden park bench fountain pond swan duck ducks frog butterfly bee flowers rose
roses tulip tulips sunflower sunflowers leaves leaf branch branches moss fern pine oak
maple palm cactus bamboo vines autumnal spooky haunted ghost witch wizard elf fairy
princess prince warrior soldier pirate cowboy chef doctor teacher student old elderly
baby toddler family friends couple wedding smile laughing crying angry surprised
""".split()

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode mapping, in CLIP's order.

    Byte-level BPE works on these 256 symbols instead of raw bytes so that every
    byte (hence every input string) has a token and no unknown token ever appears.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(mapping[b]) for b in order]


@functools.lru_cache(maxsize=4)
def _learn_bpe_merges(word_list: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Learn BPE merges that turn each word of ``word_list`` into a single token.

    Plain Sennrich BPE over the word list (every word counted once): repeatedly
    merge the most frequent adjacent symbol pair, ties broken by the pair itself so
    the result is deterministic, until every word is one symbol.  Because encoding
    applies merges in the same order, each listed word then encodes to one token,
    and frequent sub-words (``ing``, ``th`` ...) get tokens along the way.  Words are
    ASCII lower case, whose bytes map to themselves in the byte-level alphabet.
    """
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(word_list)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return tuple(merges)
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_apply_merge(word, best) for word in words]


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every left-to-right occurrence of ``pair`` in ``word``."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _tokenizer_vocab(words: tuple[str, ...] | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Build the vocabulary in CLIP's layout: bytes, bytes+``</w>``, merges, specials.

    ``words``: the whole-word tokens (lower-case ASCII); ``None``: the default ``_WORDS``.
    """
    byte_symbols = _bytes_to_unicode()
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges = _learn_bpe_merges(tuple(_WORDS if words is None else words))
    tokens += ["".join(pair) for pair in merges]
    tokens += list(_SPECIAL_TOKENS)
    # Two different merges can produce the same string (ab+c, a+bc); keep the first id.
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer_files(
    directory: str | Path,
    words: list[str] | tuple[str, ...] | None = None,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for a small CLIP BPE.

    The files are in the format of ``openai/clip-vit-large-patch14``'s slow
    tokenizer files, so ``CLIPTokenizer.from_pretrained(directory)`` loads them
    with any transformers version.  ``words`` (lower-case ASCII) each become one
    token; ``None`` keeps the default vocabulary of the random pipelines.
    ``model_max_length`` is the context length prompts are padded / truncated to.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_vocab(None if words is None else tuple(words))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": _SPECIAL_TOKENS[0],
        "eos_token": _SPECIAL_TOKENS[1],
        "unk_token": _SPECIAL_TOKENS[1],
        "pad_token": _SPECIAL_TOKENS[1],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return directory


def random_tokenizer() -> CLIPTokenizer:
    """Build a small byte-level BPE ``CLIPTokenizer`` (context length 77) without downloads.

    The vocabulary files are written to a temporary directory that is deleted once
    the tokenizer is loaded (the tokenizer keeps everything in memory).
    """
    with tempfile.TemporaryDirectory(prefix="fisedit_clip_tok_") as tmp:
        write_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=MODEL_MAX_LENGTH)


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
    _check_arch_size(arch, size)
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
    component_seed = _component_seed(seed, component)
    model = _build_seeded(lambda: cls(config), component_seed)
    reinit_parameters(model, component_seed)
    return _finish(model, dtype, device)


# ---------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------

# SD 1.x / 2.x / XL training schedule and inference spacing.  prediction_type is
# "epsilon" for every arch - a deliberate simplification: the real SD 2.1-768 is a
# v-prediction model, but with random weights the parameterisation carries no
# meaning, and one prediction type keeps the three archs interchangeable in tests.
_SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def make_scheduler(name: SchedulerName = "ddim") -> SchedulerMixin:
    """Return the scheduler ``name`` with SD's beta schedule.

    ddim -> DDIMScheduler, dpm -> DPMSolverMultistepScheduler (DPM-Solver++ 2M),
    pndm -> PNDMScheduler (PLMS only, as in SD), euler -> EulerDiscreteScheduler.
    """
    if name == "ddim":
        return DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**_SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    if name == "pndm":
        return PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**_SD_SCHEDULE)
    raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


def random_pipeline(
    arch: Arch = "sd2",
    latent_size: int = 32,
    seed: int = 0,
    size: Size = "tiny",
    scheduler: SchedulerName = "ddim",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build a complete random-weight text-to-image pipeline of ``arch``.

    Returns a ``StableDiffusionPipeline`` (sd15, sd2; no safety checker) or a
    ``StableDiffusionXLPipeline`` (sdxl; two text encoders / tokenizers, no
    watermarker).  The U-Net's ``sample_size`` is ``latent_size``, so the default
    image size is ``8 * latent_size``.  The progress bar is disabled.
    """
    _check_arch_size(arch, size)
    # Components are cast / moved one by one (not with pipe.to) so that nothing is
    # cast twice; see _finish.
    placement: dict[str, Any] = {"dtype": dtype, "device": device}
    unet = random_unet(arch, size, seed, sample_size=latent_size, **placement)
    vae = random_vae(arch, size, seed, sample_size=8 * latent_size, **placement)
    text_configs = text_encoder_configs(arch, size)
    sched = make_scheduler(scheduler)

    if arch == "sdxl":
        tokenizer, tokenizer_2 = random_tokenizer(), random_tokenizer()
        text_encoder = random_text_encoder(text_configs[0], tokenizer, seed, **placement)
        text_encoder_2 = random_text_encoder(
            text_configs[1], tokenizer_2, seed, with_projection=True, component="text_encoder_2", **placement
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=sched,
            force_zeros_for_empty_prompt=True,
            # explicit False: None would make diffusers probe for invisible-watermark
            add_watermarker=False,
        )
    else:
        tokenizer = random_tokenizer()
        text_encoder = random_text_encoder(text_configs[0], tokenizer, seed, **placement)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_pipeline_folder(path: Path) -> None:
    """Raise a clear error if ``path`` is not a loadable local diffusers folder."""
    if not path.exists():
        raise FileNotFoundError(f"pipeline folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"pipeline path {str(path)!r} is not a folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a diffusers pipeline folder: no model_index.json in it"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed model_index.json in {str(path)!r}: {err}") from err
    if not isinstance(index, dict):
        raise ValueError(f"malformed model_index.json in {str(path)!r}: not a JSON object")
    if "unet" not in index:
        raise ValueError(f"model_index.json in {str(path)!r} lists no unet component")
    # Components are entries like "unet": ["diffusers", "UNet2DConditionModel"];
    # [null, null] marks an optional component that was saved as None.
    components = [
        name for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    ]
    missing = [name + "/" for name in components if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"pipeline folder {str(path)!r} is missing component folder(s): {', '.join(missing)}")


def load_pipeline(path: str | Path, **kwargs: Any) -> DiffusionPipeline:
    """Load a pipeline from a local diffusers folder (never from the hub).

    Checks the folder first so that a wrong path fails with an error naming the path
    and what is missing (``FileNotFoundError``: no folder, no ``model_index.json``, a
    missing component folder such as ``unet/``; ``ValueError``: malformed index or a
    component diffusers cannot load).  ``kwargs`` (e.g. ``torch_dtype``) go to
    ``DiffusionPipeline.from_pretrained``.  The progress bar is disabled, as for
    ``random_pipeline``.
    """
    path = Path(path)
    _check_pipeline_folder(path)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a diffusers pipeline from {str(path)!r}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe
