"""Real images into an edit session: the image as the pipeline's VAE sees it, and DDIM inversion of its latents.

DDIM inversion runs the deterministic DDIM update backwards, from the clean latents to the noise the sampler starts
from, at the timesteps of the session's schedule. With inversion step skipping (EEdit's ISS, `skip` = m) the U-Net
is called at every m-th inversion step only and its predicted noise is reused for the steps in between: m times
fewer calls, at some cost in how well the inverted noise reproduces the image (measured by
`benchmarks/inversion.py`). m = 1 is plain DDIM inversion.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


class ImageError(ValueError):
    """An image `load_image` cannot take, with what was given and what to do."""


def image_tensor(image: Any, height: int, width: int) -> torch.Tensor:
    """`image` as a (1, 3, height, width) float tensor in [-1, 1], the VAE's input.

    Accepted: an RGB PIL image, or a float tensor in [0, 1] shaped (3, H, W) or (1, 3, H, W). An image of another
    size is centre-cropped to the session's aspect ratio and resized (bicubic) to (height, width)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ImageError(f"the image is a {image.mode!r} PIL image; load_image takes RGB: convert it first "
                             "(image.convert('RGB'))")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ImageError(f"the image tensor has dtype {image.dtype}; load_image takes floats in [0, 1]")
        pixels = image.detach().float().cpu()
        if pixels.ndim == 4 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ImageError(f"the image tensor has shape {tuple(image.shape)}; load_image takes (3, H, W) or "
                             "(1, 3, H, W) RGB")
        if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ImageError("the image tensor's values are not all in [0, 1]; scale it to [0, 1] first")
    else:
        raise ImageError(f"the image is a {type(image).__name__}; load_image takes an RGB PIL image or a float "
                         "tensor in [0, 1]")
    h, w = pixels.shape[-2:]
    if min(h, w) < 8:
        raise ImageError(f"the image is {w}x{h} pixels: too small to edit")
    left, top, right, bottom = centre_crop_box(w, h, width, height)
    pixels = pixels[:, top:bottom, left:right]
    if tuple(pixels.shape[-2:]) != (height, width):
        pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bicubic",
                                                 align_corners=False, antialias=True)[0].clamp(0, 1)
    return pixels[None] * 2 - 1


def centre_crop_box(w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred box of a w x h picture with the aspect ratio of
    width x height."""
    if h * width > w * height:  # too tall
        crop = round(w * height / width)
        return 0, (h - crop) // 2, w, (h - crop) // 2 + crop
    if h * width < w * height:  # too wide
        crop = round(h * width / height)
        return (w - crop) // 2, 0, (w - crop) // 2 + crop, h
    return 0, 0, w, h


def require_variance_preserving(scheduler) -> None:
    """Inversion writes latents at the schedule's noise levels as sqrt(a) x0 + sqrt(1 - a) eps: schedulers whose
    latents are scaled by sigma (Euler, LMS, Heun, ...) would read them wrongly."""
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0 or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"load_image inverts with DDIM, whose latents are variance preserving; the pipeline's "
                         f"{type(scheduler).__name__} scales its latents by sigma: use DDIM, DPM-Solver++ or "
                         "UniPC (pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config))")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"load_image inverts epsilon- or v-prediction models, not {scheduler.config.prediction_type}")


@dataclasses.dataclass
class Inversion:
    """`latents[i]`: the latents before denoising step i (at the noise level of `timesteps[i]`), then after the last
    step: the clean latents the inversion started from. `unet_calls`: the U-Net calls it took."""

    latents: list[torch.Tensor]
    unet_calls: int


@torch.no_grad()
def ddim_inversion(unet, scheduler, clean: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor,
                   skip: int = 1, condition: torch.Tensor | None = None) -> Inversion:
    """DDIM inversion of `clean` latents conditioned on `text` (no guidance) over the denoising `timesteps`
    (descending), calling `unet` at every `skip`-th step only (EEdit's inversion step skipping). `condition`:
    channels the U-Net takes after the latents (an inpainting U-Net's mask and masked-image latents)."""
    if skip < 1:
        raise ValueError(f"inversion step skipping must be >= 1 (1: none), got {skip}")
    alphas = scheduler.alphas_cumprod
    final = getattr(scheduler, "final_alpha_cumprod", alphas[0])
    levels = [alphas[int(t)] for t in timesteps] + [torch.as_tensor(final)]
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    z = clean
    latents = [clean]
    calls = 0
    output = None
    for n, i in enumerate(reversed(range(len(timesteps)))):  # from the clean end to the noisy one
        a_prev, a_next = (levels[i + 1].to(z.dtype), levels[i].to(z.dtype))  # current and target noise levels
        if n % skip == 0:
            sample = z if condition is None else torch.cat([z, condition], dim=1)
            output = unet(sample, timesteps[i], encoder_hidden_states=text).sample
            calls += 1
        if v_prediction:
            eps = a_prev.sqrt() * output + (1 - a_prev).sqrt() * z
        else:
            eps = output
        x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        latents.append(z)
    return Inversion(latents[::-1], calls)


def picture_size(image: Any) -> tuple[int, int]:
    """(width, height) of a picture `image_tensor` takes: a PIL image or an image tensor (..., H, W)."""
    return (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size


def crop_mask_like_image(mask: Any, original_size: tuple[int, int] | None, height: int, width: int) -> Any:
    """A PIL mask the size of the original picture given to `load_image`, cropped and resized (nearest) the way
    the picture was; any other mask unchanged."""
    from PIL import Image

    if not isinstance(mask, Image.Image) or original_size is None or mask.size != original_size:
        return mask
    box = centre_crop_box(*original_size, width, height)
    return mask.convert("L").crop(box).resize((width, height), Image.NEAREST)


def is_flow_matching(scheduler) -> bool:
    """Whether the scheduler integrates a rectified flow (SD3, FLUX: latents (1 - sigma) x0 + sigma noise, the model
    predicting their velocity), which `flow_inversion` inverts."""
    return type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@torch.no_grad()
def flow_inversion(model, inputs: dict[str, Any], latents_name: str, clean: torch.Tensor, sigmas: torch.Tensor,
                   skip: int = 1, appended: torch.Tensor | None = None) -> Inversion:
    """Euler inversion of a rectified flow: from `clean` latents (sigma 0) up the pipeline's `sigmas` (descending,
    ending at 0), each step ``z += (sigma_next - sigma) * v(z, sigma)`` with the model's velocity at the lower noise
    level, calling it at every `skip`-th step only (EEdit's inversion step skipping). `inputs` are the keyword
    inputs of the pipeline's own first call of `model` (its conditioning), whose `timestep` is scaled to each sigma
    (it is proportional to sigma: SD3 passes 1000 sigma, FLUX sigma) and whose `latents_name` input is replaced.
    `appended`: tokens the pipeline appends to the latents' in that input (FLUX Kontext's reference picture's), kept
    as they are; the velocity is the latents' part of the model's output."""
    if skip < 1:
        raise ValueError(f"inversion step skipping must be >= 1 (1: none), got {skip}")
    first, timestep = float(sigmas[0]), inputs["timestep"]
    z, latents, calls, velocity = clean, [clean], 0, None
    steps = len(sigmas) - 1
    for n, i in enumerate(reversed(range(steps))):  # from the clean end (sigmas[steps] = 0) to the noisy one
        sigma, target = float(sigmas[i + 1]), float(sigmas[i])
        if n % skip == 0:
            x = z if appended is None else torch.cat([z, appended], dim=1)
            call = {**inputs, latents_name: x, "timestep": timestep * (sigma / first), "return_dict": False}
            velocity = model(**call)[0][:, :z.shape[1]]
            calls += 1
        z = z + (target - sigma) * velocity
        latents.append(z)
    return Inversion(latents[::-1], calls)
