"""Control cross-attention: the control variant injects the source run's cross-attention maps for shared tokens.

    %o : aten.scaled_dot_product_attention(%q, %k_text, %v_text)
->
    %o : controlled_cross_attention(%q, %k_text, %v_text, cache[o:attention_map])

Prompt-to-Prompt style control (paper §3.1): with the maps of the tokens that P and P' share fixed to the source
run's, the latents of the first dense edit steps drift away from the source only where the text changed, which
is what mask detection looks for. Which tokens are shared is a per-call input (the token alignment).

In the sparse variant a cross-attention's queries are gathered (the active pixels of a mask); there

    %o : controlled_active_cross_attention(%q, %k_text, %v_text, cache[o:attention_map], layout)

takes the source map's rows of the active pixels, so that the sparse steps of an edit stay under the same control
as a dense Prompt-to-Prompt edit (`Policy.controlled_steps`). Programs bound without control run the stock
attention (`runtime.ops`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.fx as fx

from ..ir import INPUT, LAYOUT, SPARSE, CacheRef, reads_input
from ..ir import ops as ir_ops
from . import ops


def cross_attention_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, tuple]]:
    """SDPA nodes whose keys come from the prompt's embedding (an input marked `text`; any input without pixels in a
    graph without one), with (query, key, value, scale). An IP-Adapter's attention to its image tokens is not one:
    its maps are over other tokens than the prompt's.

    Attention masks, dropout and causal attention do not occur in U-Net cross-attention and are left alone."""
    marked = any(n.op == "placeholder" and getattr(n.meta.get(INPUT), "text", False) for n in gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if node.target is not ops.SDPA or node.args[1].meta.get(LAYOUT) is not None \
                or (marked and not reads_input(node.args[1], lambda i: i.text)):
            continue
        extra = dict(zip(["attn_mask", "dropout_p", "is_causal", "scale"], node.args[3:]), **node.kwargs)
        if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0) or extra.get("is_causal", False):
            continue
        yield node, (*node.args[:3], extra.get("scale"))


def rewrite_cross_attention(gm: fx.GraphModule, target, gathered_target=None) -> int:
    """Replace every cross-attention with ``target(query, key, value, cache[node:attention_map], scale)``; with
    `gathered_target`, those of gathered queries (a sparse variant's) with ``gathered_target(query, key, value,
    cache[node:attention_map], query layout, scale)``."""
    rewrites = 0
    for node, (query, key, value, scale) in cross_attention_nodes(gm):
        ref = CacheRef.of(node, "attention_map")
        if gathered_target is not None and node.meta.get(SPARSE):
            node.target, node.args = gathered_target, (query, key, value, ref, query.meta.get(LAYOUT), scale)
        else:
            node.target, node.args = target, (query, key, value, ref, scale)
        node.kwargs = {}
        rewrites += 1
    return rewrites


def control_cross_attention(gm: fx.GraphModule) -> int:
    """Every cross-attention under control: dense ones by `controlled_cross_attention`, gathered ones (a sparse
    variant's) by `controlled_active_cross_attention`."""
    return rewrite_cross_attention(gm, ir_ops.controlled_cross_attention, ir_ops.controlled_active_cross_attention)
