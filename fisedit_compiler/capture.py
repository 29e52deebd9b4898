"""Capture a diffusers U-Net as one ATen-level `fx.GraphModule` per input signature, with `torch.export`.

Non-strict export traces the real module code with fake tensors, so any `UNet2DConditionModel` config (SD 1.x,
SD 2.x, SDXL with `added_cond_kwargs`, ...) captures with no model-specific code. The graph is specialised to the
input shapes, which is what the passes want: every shape, and so every resolution, is a constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .passes.ops import METADATA_ASSERTS


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """What a captured graph is specialised to: the shape and dtype of every tensor input, by name."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype, str], ...]

    @staticmethod
    def of(inputs: dict[str, Any]) -> InputSignature:
        flat, _ = torch.utils._pytree.tree_flatten_with_path(inputs)
        entries = []
        for path, value in flat:
            name = torch.utils._pytree.keystr(path)
            if isinstance(value, torch.Tensor):
                entries.append((name, tuple(value.shape), value.dtype, value.device.type))
            else:
                entries.append((name, (), None, repr(value)))
        return InputSignature(tuple(entries))

    def describe(self) -> str:
        return ", ".join(f"{name}{list(shape)}" for name, shape, _, _ in self.tensors)


class _UNetCall(nn.Module):
    """Calls the U-Net with keyword inputs and ``return_dict=False``, so the graph returns a plain tuple."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return self.unet(**inputs, return_dict=False)


def remove_metadata_asserts(gm: fx.GraphModule) -> int:
    """Drop `_assert_tensor_metadata` nodes: checks of dtype/device that capture leaves behind, which would
    reject the differently shaped (gathered) tensors of the sparse variant."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in METADATA_ASSERTS and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    gm.recompile()
    return removed


def capture(unet: nn.Module, inputs: dict[str, Any]) -> fx.GraphModule:
    """Export `unet(**inputs)` into an ATen graph. The module is called as ``gm(inputs)`` and returns a tuple.

    The graph's `ir.SAMPLE_PLACEHOLDER` input is the latents; parameters are `get_attr` nodes that share storage with
    `unet`. Raises RuntimeError naming the input signature if export fails.
    """
    wrapper = _UNetCall(unet)
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapper, (inputs,), strict=False)
    except Exception as e:  # export errors are long; say what we tried first
        raise RuntimeError(
            f"torch.export could not capture the U-Net for inputs {InputSignature.of(inputs).describe()}: {e}"
        ) from e
    gm = exported.module()
    remove_metadata_asserts(gm)
    return gm
