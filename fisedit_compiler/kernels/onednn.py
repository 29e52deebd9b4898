"""oneDNN's linear primitive as a registered operator, ``torch.ops.fisedit.onednn_linear``: the GEMM behind
`reference.matmul_rows` with ``gemm="onednn"`` (`cost_model.GEMM_LIBRARIES` says when it is used).

Registered so that a program holds it as one opaque node: Inductor's own lowering of the raw primitive
(`torch.ops.mkldnn._linear_pointwise`) assumes weights frozen into the graph as constants, and a program's kernels
are inputs. A flop formula makes PyTorch's counters (`FlopCounterMode`, `macs.MacCounter`) count it as the matrix
product it is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils import flop_counter

from .registry import custom_op


def _onednn_linear(rows: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``rows @ kernel.T + bias`` for (..., k) `rows` and an (out, k) `kernel`, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(rows, kernel, bias, "none", [], "")


onednn_linear = custom_op("onednn_linear", _onednn_linear)


@onednn_linear.register_fake
def _(rows, kernel, bias):
    return rows.new_empty((*rows.shape[:-1], kernel.shape[0]))


@flop_counter.register_flop_formula([torch.ops.fisedit.onednn_linear, torch.ops.mkldnn._linear_pointwise])
def _(rows_shape, *args, out_shape=None, **kwargs) -> int:
    """A matrix product: `FlopCounterMode` (and so `macs`) counts it like the `F.linear` it replaces, as the
    operator and as the primitive it calls (what an eager program's direct call runs, `Program.direct`): every
    row's elements times the output's features (from the output's shape: the primitive's binary overload takes
    another operand before the weight)."""
    return 2 * math.prod(rows_shape) * out_shape[-1]
