"""Broadcast over blocks: per-batch-item operands of elementwise ops are repeated to line up with gathered maps.

    %h : aten.add(%conv, %temb)      %conv: gathered (B*blocks, C, b, b), %temb: (B, C, 1, 1)
->
    %temb_rep : repeat_over_blocks(%temb, %conv)
    %h : aten.add(%conv, %temb_rep)

A gathered map folds the blocks into the batch dim, so an operand with a batch dim (the time embedding) would no
longer broadcast. Token sequences keep the batch dim and need nothing.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE, SpatialLayout, tensor_meta
from ..ir import ops as ir_ops
from . import ops


def broadcast_over_blocks(gm: fx.GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        layout = node.meta.get(LAYOUT)
        if node.target not in ops.ELEMENTWISE or not node.meta.get(SPARSE) or layout.kind != "map":
            continue
        gathered = next(a for a in node.all_input_nodes if isinstance(a.meta.get(LAYOUT), SpatialLayout))
        for operand in node.all_input_nodes:
            meta = tensor_meta(operand)
            if operand.meta.get(LAYOUT) is not None or meta is None:
                continue
            if meta.dim() != len(layout.shape) or meta.shape[0] == 1:
                continue  # broadcasts from the trailing dims, or has no batch to line up
            with gm.graph.inserting_before(node):
                repeated = gm.graph.call_function(ir_ops.repeat_over_blocks, (operand, gathered))
            node.replace_input_with(operand, repeated)
            rewrites += 1
    return rewrites


def per_item_operands_repeated(gm: fx.GraphModule) -> list[str]:
    """Postcondition: no elementwise op on gathered maps reads a per-batch-item operand directly."""
    problems = []
    for node in gm.graph.nodes:
        layout = node.meta.get(LAYOUT)
        if node.target not in ops.ELEMENTWISE or not node.meta.get(SPARSE) or layout.kind != "map":
            continue
        for operand in node.all_input_nodes:
            meta = tensor_meta(operand)
            if (operand.meta.get(LAYOUT) is None and meta is not None and meta.dim() == len(layout.shape)
                    and meta.shape[0] != 1):
                problems.append(f"{node.name} reads per-batch-item {operand.name} without repeating it")
    return problems
