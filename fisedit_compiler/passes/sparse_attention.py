"""Sparse attention: self-attention at a sparse resolution takes queries from active tokens only.

    %k_full : scatter_into_recorded(%k, cache[k], layout)
    %v_full : scatter_into_recorded(%v, cache[v], layout)
    %o : aten.scaled_dot_product_attention(%q, %k_full, %v_full)      (%q gathered)
->
    %o : active_query_attention(%q, %k, %v, cache[k], cache[v], layout)

Keys and values of inactive tokens are the recorded ones: exact, since those tokens' inputs equal the source
run's. The fused op never builds the full-size K/V as separate graph values (docs/design.md, "Passes": sparse
attention). Cross-attention needs no rewrite: its keys and values come from the text, and its queries are already
gathered.
With `Policy.attention="masked_only"` the inputs stay gathered (active tokens attend to active tokens) and with
"dense" self-attention is not sparse at all: this pass then finds nothing to do.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..ir import SPARSE
from ..ir import ops as ir_ops
from . import ops


def _scattered(node: object) -> bool:
    return isinstance(node, fx.Node) and node.target is ir_ops.scatter_into_recorded


def sparse_attention(gm: fx.GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.SDPA or not node.meta.get(SPARSE):
            continue
        query, key, value = node.args[:3]
        extra = dict(zip(["attn_mask", "dropout_p", "is_causal", "scale"], node.args[3:]), **node.kwargs)
        if not (_scattered(key) and _scattered(value)):
            continue
        if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0) or extra.get("is_causal", False):
            continue  # keep the general path: materialised K/V and the stock op
        layout = key.args[2]
        if not layout.rows_of_pixels:
            continue  # (a joint sequence's keys: its text tokens are no recorded tokens; the stock op takes them)
        node.target = ir_ops.active_query_attention
        key_ref, value_ref = (dataclasses.replace(s.args[1], kind="attention_kv") for s in (key, value))
        node.args = (query, key.args[0], value.args[0], key_ref, value_ref, layout, extra.get("scale"))
        node.kwargs = {}
        rewrites += 1
    return rewrites
