"""Record cross-attention maps: the record variant's cross-attention can save its maps (B, heads, pixels, tokens).

    %o : aten.scaled_dot_product_attention(%q, %k_text, %v_text)
->
    %o : cross_attention_recording_map(%q, %k_text, %v_text, cache[o:attention_map])

The maps of the source run's first steps are what the control variant injects for the tokens that the source and
edited prompts share (paper §3.1). Calls that do not record maps run the stock attention.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import ops as ir_ops
from .control_cross_attention import rewrite_cross_attention


def record_cross_attention_maps(gm: fx.GraphModule) -> int:
    return rewrite_cross_attention(gm, ir_ops.cross_attention_recording_map)
