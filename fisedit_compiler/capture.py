"""Capture a model as one ATen-level `fx.GraphModule` per input signature, with `torch.export`.

Non-strict export traces the real module code with fake tensors, so any `UNet2DConditionModel` config (SD 1.x,
SD 2.x, SDXL with `added_cond_kwargs`, ...) captures with no model-specific code: what is specific (how to call
the model, which inputs carry pixels) comes from its adapter (`adapters/`), and capture writes each input's
`ir.InputLayout` on its placeholder, where the passes read it. The graph is specialised to the input shapes, which
is what the passes want: every shape, and so every resolution, is a constant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .adapters import ModelAdapter
from .ir import INPUT, KEY
from .ir.signature import InputSignature
from .passes.ops import METADATA_ASSERTS


class _AdapterCall(nn.Module):
    """Calls the model through its adapter with keyword inputs, so the graph returns a plain tuple."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.model = adapter.model
        self.adapter = adapter

    def forward(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return self.adapter.call(inputs)


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


def capture(adapter: ModelAdapter, inputs: dict[str, Any]) -> fx.GraphModule:
    """Export `adapter.call(inputs)` into an ATen graph. The module is called as ``gm(inputs)`` and returns a tuple.

    Each placeholder's `meta[ir.INPUT]` is the adapter's `InputLayout` of that input (`ir.latent_input(gm)` is the
    latents); parameters are `get_attr` nodes that share storage with the model. Raises RuntimeError naming the
    input signature if export fails.
    """
    layouts = adapter.input_layouts(inputs)
    wrapper = _AdapterCall(adapter)
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapper, (inputs,), strict=False)
    except Exception as e:  # export errors are long; say what we tried first
        raise RuntimeError(
            f"torch.export could not capture the U-Net for inputs {InputSignature.of(inputs).describe()}: {e}"
        ) from e
    gm = exported.module()
    remove_metadata_asserts(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(layouts):  # export makes one placeholder per pytree leaf of the inputs, in order
        raise RuntimeError(f"captured graph has {len(placeholders)} inputs for {len(layouts)} flattened inputs")
    for node, layout in zip(placeholders, layouts):
        node.meta[INPUT] = layout
    assign_stable_keys(gm)
    return gm


def assign_stable_keys(gm: fx.GraphModule) -> None:
    """Give every op node ``meta[ir.KEY]`` = ``<module path>:<op>#<n>``: the module that ran it (export's
    `nn_module_stack`, relative to the model), the op, and how many ops of that kind the module ran before. The
    record cache keys tensors by it, so that what is recorded does not depend on FX node names."""
    seen: dict[tuple[str, str], int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        path = path.split(".", 1)[1] if path.startswith("model.") else ("" if path == "model" else path)
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        n = seen.get((path, op), 0)
        seen[(path, op)] = n + 1
        node.meta[KEY] = f"{path or '<model>'}:{op}#{n}"
