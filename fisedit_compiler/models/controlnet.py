"""ControlNets for tests and benchmarks: made from a random-weight U-Net, in the pipeline of its family.

    controlnet = random_controlnet(pipe.unet)            # ControlNetModel.from_unet, residual projections seeded
    cn_pipe = controlnet_pipeline(pipe, controlnet)       # StableDiffusion(XL)ControlNetPipeline over pipe's parts
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)


def random_controlnet(unet, seed: int = 3, std: float = 0.1, **from_unet: Any) -> ControlNetModel:
    """A ControlNet made from `unet` (`ControlNetModel.from_unet`, which copies its encoder; `from_unet`: its other
    arguments) whose zero-initialised residual projections get seeded normal weights of deviation `std`, so that it
    changes what the U-Net computes (eval mode)."""
    controlnet = ControlNetModel.from_unet(unet, **from_unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return controlnet.eval()


def controlnet_pipeline(base, controlnet: ControlNetModel):
    """`base`'s components with `controlnet`: a `StableDiffusionControlNetPipeline`, or the XL one over an SDXL
    pipeline (no safety checker, no watermarker; the progress bar off, as `random_pipeline`'s)."""
    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "unet": base.unet,
             "controlnet": controlnet, "scheduler": base.scheduler}
    if isinstance(base, StableDiffusionXLPipeline):
        pipe = StableDiffusionXLControlNetPipeline(**parts, text_encoder_2=base.text_encoder_2,
                                                   tokenizer_2=base.tokenizer_2, force_zeros_for_empty_prompt=True,
                                                   add_watermarker=False)
    else:
        pipe = StableDiffusionControlNetPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
