"""What the editing layer reads of a diffusers pipeline besides its call: which component denoises, and the form of
its latents.

Stable Diffusion 1.x/2.x/XL pipelines hold a `unet`; SD3 and FLUX pipelines a `transformer`. An `EditSession`
compiles that component in place (`fisedit.compile`: the adapter of its class says how) and drives the pipeline as
it is; it keeps latents as VAE latent maps and converts them where they cross the pipeline (`latent_packing`), so the
rest of a session does not depend on the model family.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .inversion import image_tensor

DENOISERS = ("unet", "transformer")
CONTROL_MODELS = {"controlnet": "ControlNet", "adapter": "T2I-Adapter"}  # models of a control image, by attribute
# pipelines whose `image` is a picture the denoiser reads beside the latents (its tokens appended to theirs)
REFERENCE_PIPELINES = {"FluxKontextPipeline": "FLUX Kontext reference picture"}


def denoiser_name(pipe) -> str:
    """The attribute of `pipe` that holds its denoising model ("unet" or "transformer")."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has no denoising model: an EditSession drives pipelines with a `unet` "
                     "(Stable Diffusion 1.x, 2.x, XL) or a `transformer` (SD3)")


def denoiser(pipe) -> nn.Module:
    """The pipeline's denoising model (compiled or not)."""
    return getattr(pipe, denoiser_name(pipe))


def reference_picture(pipe) -> str | None:
    """What `pipe`'s `image` is where it is a picture the denoiser reads beside the latents (FLUX Kontext's, found
    by class along the MRO), else None."""
    return next((REFERENCE_PIPELINES[c.__name__] for c in type(pipe).__mro__ if c.__name__ in REFERENCE_PIPELINES),
                None)


def control_model(pipe) -> str | None:
    """What follows a control image in `pipe` ("ControlNet", "T2I-Adapter", or a FLUX Kontext pipeline's reference
    picture), which its `image` input is; None for a pipeline without one."""
    return reference_picture(pipe) or next((kind for name, kind in CONTROL_MODELS.items()
                                            if isinstance(getattr(pipe, name, None), nn.Module)), None)


def control_inputs(pipe, image: Any, height: int, width: int) -> dict[str, Any]:
    """The pipeline inputs of a control image for pictures of `height` x `width` pixels: its `image`. A FLUX Kontext
    pipeline would pick its own size for the picture and its reference (one of the sizes Kontext was trained at, or
    1024² pixels): its reference is centre-cropped and resized to the session's size, and the pipeline told to keep
    that size (so that the reference's tokens are a grid as large as the latents', which sparse calls stack)."""
    if reference_picture(pipe) is None:
        return {"image": image}
    pixels = (image_tensor(image, height, width) + 1) / 2  # the pipeline's image processor takes [0, 1]
    return {"image": pixels, "max_area": height * width, "_auto_resize": False}


def has_ip_adapter(pipe) -> bool:
    """Whether the pipeline's denoiser has an IP-Adapter loaded (`pipe.load_ip_adapter`): its calls then need an
    image prompt."""
    return getattr(getattr(denoiser(pipe), "config", None), "encoder_hid_dim_type", None) == "ip_image_proj"


def ip_adapter_inputs(image: Any) -> dict[str, Any]:
    """The pipeline inputs of an IP-Adapter's image prompt: `ip_adapter_image_embeds` for embeddings (a tensor or a
    list of them, one per adapter), `ip_adapter_image` for pictures (the pipeline's image encoder embeds them)."""
    if isinstance(image, Tensor):
        return {"ip_adapter_image_embeds": [image]}
    if isinstance(image, (list, tuple)) and image and all(isinstance(t, Tensor) for t in image):
        return {"ip_adapter_image_embeds": list(image)}
    return {"ip_adapter_image": image}


def latent_packing(pipe, height: int, width: int) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(pack, unpack) between the VAE latents map `(B, C, H, W)` that a session keeps (masks, blends, trajectories)
    and the pipeline's `latents` for images of `height` x `width` pixels: FLUX pipelines pack 2x2 latent pixels into
    a token (`(B, tokens, 4C)`, their `_pack_latents`); the others take the map itself."""
    pack, unpack = getattr(pipe, "_pack_latents", None), getattr(pipe, "_unpack_latents", None)
    if pack is None or unpack is None:
        return (lambda z: z), (lambda z: z)
    scale = pipe.vae_scale_factor
    return (lambda z: pack(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3]),
            lambda z: unpack(z, height, width, scale))


class Interrupted(Exception):
    """Raised from a legacy pipeline's callback to end its run early (what `pipe._interrupt` does for the others)."""


def step_callbacks(pipe, on_step_end: Callable) -> dict[str, Any]:
    """The keyword inputs that make `pipe` call `on_step_end(pipe, i, t, {"latents": ...})` after every step, whose
    returned "latents" replace the pipeline's: `callback_on_step_end`, or for pipelines that predate it (the
    T2I-Adapter ones) a `callback` that writes the latents in place, and raises `Interrupted` where the step asked
    the pipeline to stop (`pipe._interrupt`)."""
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def callback(i, t, latents):
        new = on_step_end(pipe, i, t, {"latents": latents}).get("latents")
        if new is not None:
            latents.copy_(new)
        if getattr(pipe, "_interrupt", False):
            pipe._interrupt = False
            raise Interrupted

    return {"callback": callback, "callback_steps": 1}
