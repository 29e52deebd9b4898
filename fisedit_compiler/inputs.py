"""What users hand the API, checked once: edit masks and prompts.

Both entry points that take a mask, `EditSession.edit(prompt, mask=...)` and `CompiledUNet.sparse(mask)`, read it
with `as_mask`; the session checks its prompts with `check_prompt` before the tokenizer sees them.

A mask marks the latent pixels to recompute (True: edit). Accepted:

- a `torch.Tensor` of dtype bool, or of a real dtype holding only 0 and 1 (any device);
- a NumPy array, the same;
- a PIL image (any mode; read as a mask image file is: grayscale, bright pixels > 127 are True), at latent
  resolution, or at image resolution where the caller knows the VAE's scale factor (the session does).

Shapes, at latent resolution H x W: `(H, W)` or `(1, H, W)` for every batch item, or `(B, 1, H, W)` with B = 1 or
the U-Net call's batch (`CompiledUNet.sparse` only; the session edits one image). Anything else (NaN, 0.7, complex
values, another shape, a list) raises `MaskError`, a `ValueError` that says what was given and what is expected.
"""

from __future__ import annotations

import reprlib
from typing import Any

import numpy as np
import torch
from PIL import Image

EXPECTED = "a bool or 0/1 torch.Tensor, NumPy array or PIL image at latent resolution"


class MaskError(ValueError):
    """A mask of the wrong type, shape, dtype or values."""


def as_mask(mask: Any, size: tuple[int, int], batch: int = 1, scale_factor: int | None = None) -> torch.Tensor:
    """`mask` (see the module docstring) as a bool tensor for latents of `size` (H, W) and a call of `batch`:
    `(H, W)` or `(B, 1, H, W)`, on the tensor's device (CPU for arrays and images). With `scale_factor`, PIL images
    drawn at image resolution (scale_factor * H x scale_factor * W) are taken too."""
    h, w = size
    if isinstance(mask, Image.Image):
        return mask_from_image(mask, size, scale_factor, what="mask image", error=MaskError)
    if isinstance(mask, np.ndarray):
        kind, dtype = "NumPy array", mask.dtype
        if dtype.kind not in "biufc":
            raise MaskError(f"mask must be bool or hold only 0 and 1, got a {kind} of dtype {dtype}")
        mask = _from_numpy(mask)
    elif isinstance(mask, torch.Tensor):
        kind, dtype = "tensor", mask.dtype
    else:
        raise MaskError(f"mask must be a torch.Tensor, a NumPy array or a PIL image (bool, or 0/1 values), got "
                        f"{type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex:
            raise MaskError(f"mask must be bool or hold only 0 and 1, got a complex {kind} ({dtype})")
        bad = ~((mask == 0) | (mask == 1))
        if bad.any():
            example = mask[bad].flatten()[0].item()
            raise MaskError(f"mask must be bool or hold only 0 and 1, got a {kind} of dtype {dtype} with other "
                            f"values (e.g. {example:g})")
        mask = mask != 0
    shape = tuple(mask.shape)
    if shape == (1, h, w):
        return mask[0]
    if shape == (h, w) or (len(shape) == 4 and shape[1:] == (1, h, w) and shape[0] in (1, batch)):
        return mask
    per_item = f" or a ({batch}, 1, {h}, {w}) one" if batch > 1 else ""
    raise MaskError(f"mask has shape {shape} but the latents are {h}x{w}" + (f" (batch {batch})" if batch > 1 else "")
                    + f": pass a ({h}, {w}) mask{per_item}, {EXPECTED}")


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A real or bool NumPy array as a tensor (dtypes torch lacks, e.g. uint64, as float64: 0 and 1 stay exact)."""
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def mask_from_image(image: Image.Image, size: tuple[int, int], scale_factor: int | None = None,
                    what: str = "mask image", error: type[Exception] = ValueError) -> torch.Tensor:
    """An (H, W) bool mask from a mask image (white = edit) drawn at latent resolution (H x W) or, with
    `scale_factor` f, at image resolution (f H x f W; a latent pixel is active if most of its f x f image pixels are
    bright). `what` names the image in the error raised (of type `error`) for any other size."""
    image = image.convert("L")
    h, w = size
    f = scale_factor
    if f and image.size == (f * w, f * h):
        image = image.resize((w, h), Image.BOX)
    if image.size != (w, h):
        image_size = f" or {f * w}x{f * h} (image resolution)" if f else ""
        raise error(f"{what} is {image.size[0]}x{image.size[1]} pixels, but the latents are {w}x{h}: draw it at "
                    f"{w}x{h} (latent resolution){image_size}")
    return torch.from_numpy(np.array(image) > 127)


def check_prompt(prompt: Any, name: str = "prompt") -> str:
    """`prompt` if it is one str; a TypeError naming what was given otherwise (before a tokenizer fails on it)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be one str (the text of the image), got {type(prompt).__name__} "
                        f"({reprlib.repr(prompt)})")
    return prompt
