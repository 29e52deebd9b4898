"""Control cross-attention: the control variant injects the source run's cross-attention maps for shared tokens.

    %o : aten.scaled_dot_product_attention(%q, %k_text, %v_text)
->
    %o : controlled_cross_attention(%q, %k_text, %v_text, cache[o:attention_map])

Prompt-to-Prompt style control (paper §3.1): with the maps of the tokens that P and P' share fixed to the source
run's, the latents of the first dense edit steps drift away from the source only where the text changed, which
is what mask detection looks for. Which tokens are shared is a per-call input (`CallContext.token_alignment`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.fx as fx

from ..ir import INPUT, LAYOUT, CacheRef, reads_input
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


def rewrite_cross_attention(gm: fx.GraphModule, target) -> int:
    """Replace every cross-attention with ``target(query, key, value, cache[node:attention_map], scale)``."""
    rewrites = 0
    for node, (query, key, value, scale) in cross_attention_nodes(gm):
        node.target = target
        node.args = (query, key, value, CacheRef.of(node, "attention_map"), scale)
        node.kwargs = {}
        rewrites += 1
    return rewrites


def control_cross_attention(gm: fx.GraphModule) -> int:
    return rewrite_cross_attention(gm, ir_ops.controlled_cross_attention)
