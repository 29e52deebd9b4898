"""What the editing layer reads of a diffusers pipeline besides its call: which component denoises.

Stable Diffusion 1.x/2.x/XL pipelines hold a `unet`; SD3 and FLUX pipelines a `transformer`. An `EditSession`
compiles that component in place (`fisedit.compile`: the adapter of its class says how) and drives the pipeline as
it is, so the rest of a session does not depend on the model family.
"""

from __future__ import annotations

from torch import nn

DENOISERS = ("unet", "transformer")


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
