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

from ..ir import INPUT, LAYOUT, CacheRef
from ..ir import ops as ir_ops
from . import ops


def cross_attention_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, tuple]]:
    """SDPA nodes whose keys come from the prompt's embedding (an input marked `text`; any input without pixels in a
    graph without one), with (query, key, value, scale). An IP-Adapter's attention to its image tokens is not one:
    its maps are over other tokens than the prompt's.

    Attention masks, dropout and causal attention do not occur in U-Net cross-attention and are left alone."""
    text = {n for n in gm.graph.nodes if n.op == "placeholder" and getattr(n.meta.get(INPUT), "text", False)}
    reads_text = _reads(text) if text else (lambda node: True)
    for node in list(gm.graph.nodes):
        if node.target is not ops.SDPA or node.args[1].meta.get(LAYOUT) is not None or not reads_text(node.args[1]):
            continue
        extra = dict(zip(["attn_mask", "dropout_p", "is_causal", "scale"], node.args[3:]), **node.kwargs)
        if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0) or extra.get("is_causal", False):
            continue
        yield node, (*node.args[:3], extra.get("scale"))


def _reads(sources: set[fx.Node]):
    """node -> whether it depends on one of `sources` (memoised over the graph)."""
    memo: dict[fx.Node, bool] = {}

    def reads(node: fx.Node) -> bool:
        stack = [node]
        while stack:
            n = stack[-1]
            if n in memo:
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in memo]
            if pending:
                stack.extend(pending)
                continue
            memo[n] = n in sources or any(memo[a] for a in n.all_input_nodes)
            stack.pop()
        return memo[node]

    return reads


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
