"""Count multiply-accumulates of a call with `torch.utils.flop_counter.FlopCounterMode`.

PyTorch's counter has no formula for the CPU flash-attention kernel that `scaled_dot_product_attention` runs on
CPU, so attention would count as zero there; this module registers the same formula the counter uses for the
CUDA kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

if _CPU_SDPA is not None and _CPU_SDPA.default not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run `fn(*args, **kwargs)`; return (multiply-accumulates, result)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops() // 2, result
