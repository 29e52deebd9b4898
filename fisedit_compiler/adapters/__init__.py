"""Model adapters, one file per model family; `adapter_for(model)` picks a model's (see `base`)."""

from .base import InputLayout, ModelAdapter, UnsupportedModelError, adapter_for, register_adapter
from .controlnet import ControlNetAdapter
from .flux_transformer import FluxTransformerAdapter
from .sd3_transformer import SD3TransformerAdapter
from .unet_2d_condition import UNet2DConditionAdapter
from .vae_decoder import VAEDecoderAdapter

__all__ = [
    "ControlNetAdapter", "FluxTransformerAdapter", "InputLayout", "ModelAdapter", "SD3TransformerAdapter", "UNet2DConditionAdapter", "UnsupportedModelError", "adapter_for",
    "VAEDecoderAdapter", "register_adapter",
]
