"""The sparse path's data-movement kernels as registered PyTorch operators: ``torch.ops.fisedit.*``.

Graph programs (`runtime.program`) call these, never the Python functions behind them, so that a program is an
ordinary ATen-level graph: `torch.compile` and `torch.export` trace each op as one node (shapes from its fake
implementation) instead of tracing into Python that reads plan objects.

Each op takes only tensors and numbers. A gather geometry reaches it as its index tensors plus a few ints
(`GatherIndex` flattened by `index_args`); a `SpatialLayout` as ``kind, res, dims, shape`` (`layout_args`).

Kernels: each operator's implementation calls `kernels.<name>`, which picks per call by the tensors' device and
dtype (`kernels.select_backend`): the Triton kernel for CUDA tensors it supports, the plain-PyTorch reference
otherwise; ``FISEDIT_KERNELS`` overrides it (tests run the Triton kernels on CPU under Triton's interpreter).
Fake implementations are the references themselves, run on fake tensors: output shapes, dtypes and strides are
exactly the reference's, and every implementation returns the same strides.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils import flop_counter

from ..ir import GatherIndex, SpatialLayout, WindowCoords
from . import reference
from .onednn import _onednn_linear
from .registry import custom_op

# --- packing the IR's constants into op arguments --------------------------------------------------------------


def layout_args(layout: SpatialLayout) -> tuple[str, list[int], list[int], list[int]]:
    return layout.kind, list(layout.res), list(layout.dims), list(layout.shape)


def _layout(kind: str, res: list[int], dims: list[int], shape: list[int]) -> SpatialLayout:
    args = kind, tuple(res), tuple(dims), tuple(shape)
    try:
        return _layout_of(*args)
    except TypeError:  # symbolic sizes (a trace) are not hashable
        return SpatialLayout(*args)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4096)
def _layout_of(kind: str, res: tuple[int, ...], dims: tuple[int, ...], shape: tuple[int, ...]) -> SpatialLayout:
    """One `SpatialLayout` per argument tuple: its cached properties last across a program's calls."""
    return SpatialLayout(kind, res, dims, shape)  # type: ignore[arg-type]


INDEX_FIELDS = ("from_fresh", "fresh_index", "recorded_index", "inside", "fresh_at", "fresh_from", "source_recorded",
                "source_rows")


def _index(tensors: list[Optional[Tensor]], windows: list[int], all_inside: bool) -> GatherIndex:
    fields = dict(zip(INDEX_FIELDS, tensors))
    num_windows, height, width = windows
    coords = WindowCoords(num_windows, height, width, None, None, fields["inside"])  # type: ignore[arg-type]
    return GatherIndex(coords, all_inside=all_inside, **fields)  # type: ignore[arg-type]


def _dispatched(name: str):
    """`kernels.<name>`: the reference or the Triton kernel, picked per call by the tensors' device and dtype
    (`kernels.select_backend`). (Imported at call time: `kernels` is this module's package.)"""
    from .. import kernels

    return getattr(kernels, name)


# --- gathers -----------------------------------------------------------------------------------------------------


def _gather_pixels(
    fresh: Optional[Tensor], recorded: Tensor, index: list[Optional[Tensor]], windows: list[int], all_inside: bool,
    kind: str, res: list[int], dims: list[int], shape: list[int], fresh_windows: int,
) -> Tensor:
    """`reference.gather_pixels`: the windows of a gather geometry, read from the fresh (gathered) tensor and the
    recorded (full-size) one; `index` holds the `GatherIndex` tensors in `INDEX_FIELDS` order."""
    return _gather(fresh, recorded, index, windows, all_inside, kind, res, dims, shape, fresh_windows)


gather_pixels = custom_op("gather_pixels", _gather_pixels)


def _gather(fresh, recorded, index, windows, all_inside, kind, res, dims, shape, fresh_windows, *epilogue,
            name="gather_pixels"):
    gather_index, layout = _index(index, windows, all_inside), _layout(kind, res, dims, shape)
    out = _dispatched(name)(fresh, recorded, gather_index, layout, fresh_windows, *epilogue)
    # the reference's memory format: a region exit (one window over the whole map) is a contiguous map; the Triton
    # version returns it channels-last
    has_fresh = any(f is not None for f in fresh) if isinstance(fresh, list) else fresh is not None
    if has_fresh and reference.is_whole_map(gather_index, layout):
        return out.contiguous()
    return out


@gather_pixels.register_fake
def _(fresh, recorded, index, windows, all_inside, kind, res, dims, shape, fresh_windows):
    return reference.gather_pixels(fresh, recorded, _index(index, windows, all_inside),
                                   _layout(kind, res, dims, shape), fresh_windows)


def _gather_pixels_affine_silu(
    fresh: list[Optional[Tensor]], recorded: list[Tensor], index: list[Optional[Tensor]], windows: list[int],
    all_inside: bool, kind: str, res: list[int], dims: list[int], shape: list[int], fresh_windows: int,
    scale: Tensor, shift: Tensor,
) -> Tensor:
    """`reference.gather_pixels_affine_silu`: `gather_pixels` of one operand or of a concatenation's operands
    (`fresh`, `recorded`: one per operand; the layout is the concatenation's), then a recorded-statistics GroupNorm
    and SiLU."""
    return _gather(fresh, recorded, index, windows, all_inside, kind, res, dims, shape, fresh_windows, scale, shift,
                   name="gather_pixels_affine_silu")


gather_pixels_affine_silu = custom_op("gather_pixels_affine_silu", _gather_pixels_affine_silu)


@gather_pixels_affine_silu.register_fake
def _(fresh, recorded, index, windows, all_inside, kind, res, dims, shape, fresh_windows, scale, shift):
    return reference.gather_pixels_affine_silu(fresh, recorded, _index(index, windows, all_inside),
                                               _layout(kind, res, dims, shape), fresh_windows, scale, shift)


# --- write-back ----------------------------------------------------------------------------------------------------


def _scatter_pixels_(
    recorded: Tensor, fresh: Tensor, kind: str, res: list[int], dims: list[int], shape: list[int],
    positions: Tensor, fresh_windows: int,
) -> None:
    """Write the gathered `fresh` pixels into `recorded` at flat pixel `positions`, in place."""
    updated = reference.scatter_pixels_(recorded, fresh, _layout(kind, res, dims, shape), positions, fresh_windows)
    if updated is not recorded:  # a non-contiguous map was updated in a contiguous copy
        recorded.copy_(updated)


scatter_pixels_ = custom_op("scatter_pixels_", _scatter_pixels_, mutates_args=("recorded",))


@scatter_pixels_.register_fake
def _(recorded, fresh, kind, res, dims, shape, positions, fresh_windows):
    return None


# --- attention -----------------------------------------------------------------------------------------------------


def _active_query_attention(
    query: Tensor, key_fresh: Tensor, value_fresh: Tensor, key_recorded: Tensor, value_recorded: Tensor,
    positions: Tensor, scale: Optional[float],
) -> Tensor:
    """`reference.active_query_attention`, contiguous ``(B, heads, queries, head_dim)``."""
    return _dispatched("active_query_attention")(query, key_fresh, value_fresh, key_recorded, value_recorded, positions, scale).contiguous()


active_query_attention = custom_op("active_query_attention", _active_query_attention)


@active_query_attention.register_fake
def _(query, key_fresh, value_fresh, key_recorded, value_recorded, positions, scale):
    return query.new_empty((*query.shape[:-1], value_fresh.shape[-1]))


@flop_counter.register_flop_formula(torch.ops.fisedit.active_query_attention)
def _(query_shape, key_fresh_shape, value_fresh_shape, key_recorded_shape, value_recorded_shape, *args,
      out_shape=None, **kwargs) -> int:
    """Every active query against every token: `FlopCounterMode` (and so `macs`) counts it as attention."""
    return flop_counter.sdpa_flop_count(query_shape, key_recorded_shape, value_recorded_shape)


# --- GEMMs whose library is known at call time -------------------------------------------------------------------


def _matmul_rows(rows: Tensor, kernel: Tensor, bias: Optional[Tensor], gemm: str) -> Tensor:
    """`reference.matmul_rows` by the library `gemm` names, an argument: an eager program's GEMMs on gathered rows,
    whose library depends on the mask's row count (`runtime.program.Binding.gemm_library`). oneDNN's primitive is
    called as its registered operator's direct call, without the operator dispatch."""
    if gemm == "onednn":
        return _onednn_linear(rows, kernel, bias)
    return reference.matmul_rows(rows, kernel, bias, gemm)


matmul_rows = custom_op("matmul_rows", _matmul_rows)


@matmul_rows.register_fake
def _(rows, kernel, bias, gemm):
    return rows.new_empty((*rows.shape[:-1], kernel.shape[0]))


@flop_counter.register_flop_formula(torch.ops.fisedit.matmul_rows)
def _(rows_shape, *args, out_shape=None, **kwargs) -> int:
    """A matrix product, counted like the `F.linear` it is."""
    return 2 * math.prod(rows_shape) * out_shape[-1]
