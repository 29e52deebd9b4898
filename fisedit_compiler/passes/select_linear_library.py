"""Select linear library: every linear layer runs as one GEMM by the library that the cost constants name for its
size (`CostConstants.gemm_library`), as im2col's GEMMs do. It runs in every variant: the sparse one, whose gathered
layers multiply the active rows only, and the dense record and control variants (their constants are the device's,
`cost_model.load_constants`), so that a source run is not slower than the same U-Net computed by the faster library.

    %y : aten.linear(%x, %w, %b)                 (gathered tokens at 64x64, or dense)
->
    %y : linear_by_library(%x, %w, %b, seq[1]@64x64)       (None where dense)

`F.linear` takes the BLAS PyTorch was built with: MKL on x86 CPUs, whose SGEMM runs at half oneDNN's rate on AMD's
(93 against 210-225 GMAC/s on a 2-core EPYC), while the dense U-Net's convolutions run in oneDNN. Which library a
GEMM takes depends on its rows, and a gathered tensor's rows on the mask: the choice is made when a variant is
bound (the sparse one to a plan; `ir.ops.linear_by_library`). Both libraries compute the same product, in their own
floating-point order: where they differ, a record call equals the eager U-Net up to float rounding, not bit for bit
(where the constants name BLAS, e.g. on accelerators or for small layers, it is `F.linear` as in the eager model).
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import LAYOUT, SPARSE
from ..ir import ops as ir_ops
from . import ops


def select_linear_library(gm: fx.GraphModule) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.LINEAR:
            continue
        x, weight, bias = (list(node.args) + [None])[:3]
        node.target = ir_ops.linear_by_library  # in place: the node keeps its meta, and so its stable key
        node.args = (x, weight, node.kwargs.get("bias", bias), node.meta[LAYOUT] if node.meta.get(SPARSE) else None)
        node.kwargs = {}
        rewrites += 1
    return rewrites


def no_aten_linear(gm: fx.GraphModule) -> list[str]:
    """Postcondition: every linear layer takes its library from the cost constants."""
    return [f"{n.name} is an ATen linear" for n in gm.graph.nodes if n.target is ops.LINEAR]
