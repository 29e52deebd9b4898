"""LoRA, IP-Adapter and T2I-Adapter weights for tests and benchmarks: seeded random ones, in the formats that
diffusers' own loaders read, so that they reach a model the way a user's files do.

    save_random_lora(pipe.unet, folder)                        # a LoRA file; then pipe.load_lora_weights(folder)
    save_random_ip_adapter(pipe.unet, folder, image_dim=32)    # an IP-Adapter file; then pipe.load_ip_adapter(...)
    adapter = random_t2i_adapter(pipe.unet)                    # a T2IAdapter whose residuals fit the U-Net
    t2i_pipe = t2i_adapter_pipeline(pipe, adapter)             # StableDiffusion(XL)AdapterPipeline over its parts
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name `load_lora_weights(folder)` looks for
IP_ADAPTER_FILE = "ip_adapter.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2")  # attention, transformer and ResNet layers: linear and convolution LoRA layers both


def random_lora(unet, rank: int = 4, seed: int = 0, std: float = 0.05,
                targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, torch.Tensor]:
    """A LoRA of `unet` (PEFT's state-dict format, keys without the adapter name): every LoRA matrix seeded normal
    of deviation `std`, so that the adapter changes what the U-Net computes. `unet` is left as it was."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False))
    state = get_peft_model_state_dict(model)
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(value.shape, generator=g) * std for name, value in sorted(state.items())}


def save_random_lora(unet, folder, **lora) -> Path:
    """Write `random_lora(unet, **lora)` to `folder` as a diffusers LoRA file (`pipe.load_lora_weights(folder)`)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=random_lora(unet, **lora),
                                              weight_name=LORA_FILE, safe_serialization=True)
    return Path(folder) / LORA_FILE


def random_ip_adapter(unet, image_dim: int, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """An IP-Adapter of `unet` in the checkpoint format (`image_proj.*`: the projection of an image embedding of
    width `image_dim` into 4 tokens; `ip_adapter.<n>.to_{k,v}_ip.weight`: each cross-attention's keys and values
    of those tokens, numbered as diffusers' loader numbers them), seeded normal of deviation `std`."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * width, image_dim, generator=g) * std,
             "image_proj.proj.bias": torch.zeros(4 * width),
             "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention: no image tokens
        hidden = _hidden_size(unet, name)
        for kv in ("k", "v"):
            state[f"ip_adapter.{key}.to_{kv}_ip.weight"] = torch.randn(hidden, width, generator=g) * std
        key += 2
    return state


def save_random_ip_adapter(unet, folder, image_dim: int, **ip) -> Path:
    """Write `random_ip_adapter(unet, image_dim, **ip)` to `folder/ip_adapter.safetensors`, which
    `pipe.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)`
    loads (the image embeddings are then given to the pipeline: `ip_adapter_image_embeds`)."""
    from safetensors.torch import save_file

    path = Path(folder) / IP_ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_ip_adapter(unet, image_dim, **ip), str(path))
    return path


def _hidden_size(unet, processor: str) -> int:
    widths = unet.config.block_out_channels
    if processor.startswith("mid_block"):
        return widths[-1]
    block = int(processor.split(".")[1])
    return (list(reversed(widths)) if processor.startswith("up_blocks") else widths)[block]


def random_t2i_adapter(unet, seed: int = 5, std: float = 0.1):
    """A `T2IAdapter` (full adapter) whose residuals fit `unet`'s down blocks: one per block, at its resolution and
    width; the conditioning picture is at image resolution (8x the latents'). Seeded, eval mode."""
    from diffusers import T2IAdapter

    widths = list(unet.config.block_out_channels)
    adapter = T2IAdapter(in_channels=3, channels=widths, num_res_blocks=1, downscale_factor=8,
                         adapter_type="full_adapter")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return adapter.eval()


def t2i_adapter_pipeline(base, adapter):
    """`base`'s components with a T2I-`adapter`: a `StableDiffusionAdapterPipeline`, or the XL one over an SDXL
    pipeline (no safety checker; the progress bar off, as `random_pipeline`'s)."""
    from diffusers import StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline

    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "unet": base.unet,
             "adapter": adapter, "scheduler": base.scheduler}
    if isinstance(base, StableDiffusionXLPipeline):
        pipe = StableDiffusionXLAdapterPipeline(**parts, text_encoder_2=base.text_encoder_2,
                                                tokenizer_2=base.tokenizer_2, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionAdapterPipeline(**parts, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
