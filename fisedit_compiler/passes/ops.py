"""ATen op families, as the passes see them. One table, so that every pass agrees on what an op is."""

from __future__ import annotations

import operator

import torch

from ..ir.ops import WRITES

aten = torch.ops.aten


class _Elementwise:
    """Elementwise ops: each output pixel depends on the same pixel of the inputs (other operands broadcast).

    Every ATen op PyTorch tags `torch.Tag.pointwise` (add, silu, where, ...: a new pointwise op needs no entry
    here), plus the value-preserving conversions and views that carry no such tag."""

    UNTAGGED = frozenset({
        aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default, aten.alias.default, aten.detach.default,
        aten.type_as.default, aten.dropout.default,
    })

    def __contains__(self, target: object) -> bool:
        if target in self.UNTAGGED:
            return True
        return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


ELEMENTWISE = _Elementwise()

# Ops over non-pixel dims only; sparse on gathered tensors as they are. Value: index of the `dim` argument
# (checked not to be the batch or a pixel dim), or None where the op works on trailing dims.
PER_PIXEL_DIM_ARG = {
    aten.linear.default: None,
    aten.layer_norm.default: None,
    aten.rms_norm.default: None,
    aten.softmax.int: 1,
    aten._softmax.default: 1,
    aten.chunk.default: 2,
    aten.split.Tensor: 2,
    aten.split_with_sizes.default: 2,
    aten.unbind.int: 1,
    aten.cat.default: 1,
}

RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.unflatten.int}
PERMUTES = {aten.permute.default, aten.transpose.int}
UNSQUEEZES = {aten.unsqueeze.default, aten.squeeze.dim}

CONV = aten.conv2d.default
LINEAR = aten.linear.default
GROUP_NORM = aten.group_norm.default
SDPA = aten.scaled_dot_product_attention.default
UPSAMPLE_NEAREST = {aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default}
GETITEM = operator.getitem
SLICE = aten.slice.Tensor
# Reductions over listed dims (`dim` argument 1, `keepdim` argument 2): an RMSNorm written out (SD3.5's q/k norms)
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
STACK = aten.stack.default
EINSUM = aten.einsum.default  # a permutation (a transformer's unpatchify) is the only einsum with a layout rule

# No-ops on values that capture leaves in the graph and that the sparse variant drops.
METADATA_ASSERTS = {aten._assert_tensor_metadata.default}


def is_impure(node) -> bool:
    """`fx.Node.is_impure`, except for ops that FX keeps as random but that draw nothing in a captured inference
    graph: dropout that does not train and attention without dropout (identities of the values, so dead-code
    elimination may remove them); and impure, the IR ops that store what they are given (`ir.ops.WRITES`)."""
    if node.op != "call_function":
        return node.is_impure()
    if node.target in WRITES:
        return True
    if node.target is aten.dropout.default:
        if (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)) is False:
            return False
    if node.target is SDPA:
        if (node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)) == 0.0:
            return False
    return node.is_impure()
