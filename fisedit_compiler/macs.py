"""Count multiply-accumulates of a call, or of each node of an FX graph, with PyTorch's flop formulas
(`torch.utils.flop_counter.flop_registry`).

`MacCounter` is a dispatch mode that runs every op as it comes and adds the registry's count for those that have a
formula. PyTorch's own `FlopCounterMode` also attributes counts to modules (hooks on every module) and first
tries to decompose every op without a formula, both in Python: a sparse call of the shapes model (2400 ops) took
3.5x as long under it, 2.2x under `MacCounter` (2-core EPYC, one process). They count the same MACs
(`tests/test_macs.py`).

PyTorch's counter has no formula for the CPU flash-attention kernel that `scaled_dot_product_attention` runs on
CPU, so attention would count as zero there; this module registers the same formula the counter uses for the
CUDA kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

if _CPU_SDPA is not None and _CPU_SDPA.default not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


class MacCounter(TorchDispatchMode):
    """Inside it, every op runs as usual and `macs` grows by the multiply-accumulates of those with a flop formula
    (matrix products, convolutions, attention; `flop_registry`)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    @property
    def macs(self) -> int:
        return self.flops // 2

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run `fn(*args, **kwargs)`; return (multiply-accumulates, result)."""
    with MacCounter() as counter:
        result = fn(*args, **kwargs)
    return counter.macs, result


class NodeMacCounter(fx.Interpreter):
    """Runs a graph node by node under one `MacCounter`; `macs` maps every node that ran an op (call_function,
    call_method, call_module) to its multiply-accumulates, 0 included."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.macs: dict[str, int] = {}
        self._counter: MacCounter | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with MacCounter() as self._counter:
            return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if self._counter is None or n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        before = self._counter.flops
        result = super().run_node(n)
        self.macs[n.name] = (self._counter.flops - before) // 2
        return result


def node_macs(gm: fx.GraphModule, *args: Any) -> dict[str, int]:
    """Node name -> MACs of one run of `gm(*args)`, for every node that ran an op (0 included). A sparse variant
    must run inside its call context."""
    counter = NodeMacCounter(gm)
    counter.run(*args)
    return counter.macs
