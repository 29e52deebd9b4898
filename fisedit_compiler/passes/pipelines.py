"""The pass pipelines, in order: the one place the order of the passes is written (docs link here).

Each variant of a captured graph is made by one pipeline, run by `PassManager` (`passes/manager.py`), which checks
each pass's requirements (passes that must have run before it) and postcondition:

- `sparse_passes`: the sparse variant, computing only a mask's active blocks and reading the rest from the record
  (its cross-attentions under control in the calls that ask for it); with temporal reuse also the reuse calls'
  variant;
- `record_passes`: the record variant, the captured graph saving what the sparse variant reads;
- `control_passes`: the control variant, dense with Prompt-to-Prompt cross-attention control, recording like
  `record`.
"""

from __future__ import annotations

import functools

import torch.fx as fx

from ..ir import CacheRef
from ..policy import Policy
from . import ops as pass_ops
from .annotate_spatial_layout import annotate_spatial_layout, every_node_annotated
from .broadcast_over_blocks import broadcast_over_blocks, per_item_operands_repeated
from .cached_group_norm import cached_group_norm, no_sparse_group_norm
from .control_cross_attention import control_cross_attention
from .find_sparse_regions import every_sparse_node_in_a_region, find_sparse_regions
from .fuse_gather_norm_silu import fuse_gather_norm_silu
from .insert_cache_write_back import insert_cache_write_back
from .insert_record_taps import insert_record_taps
from .insert_region_boundaries import insert_region_boundaries, regions_entered_and_left_through_boundaries
from .insert_reuse_taps import insert_reuse_taps
from .manager import FxPass
from .record_cross_attention_maps import record_cross_attention_maps
from .relayout_gathered import no_dense_reshape_of_blocks, relayout_gathered
from .reuse_deep_levels import reuse_deep_levels, reuse_taps_and_reads
from .select_linear_library import no_aten_linear, select_linear_library
from .sparse_attention import sparse_attention
from .sparse_conv import no_padded_conv_on_blocks, sparse_conv
from .sparse_upsample import no_dense_upsample_of_blocks, sparse_upsample
from .tap_layout_features import layout_features_tapped, tap_layout_features


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Drop nodes whose values no longer reach the output (e.g. originals replaced by window versions)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=pass_ops.is_impure)
    return before - len(gm.graph.nodes)


ANNOTATE = FxPass("annotate_spatial_layout", annotate_spatial_layout, postcondition=every_node_annotated)
# dense variants: their linear layers take the library the cost constants name, as the sparse variant's do
DENSE_LINEAR_LIBRARY = FxPass("select_linear_library", select_linear_library, ("annotate_spatial_layout",),
                              no_aten_linear)


def sparse_passes(policy: Policy, reuse_call: bool = False) -> list[FxPass]:
    """The pass pipeline that turns a captured U-Net into its sparse variant, in order. With temporal reuse
    (`Policy.deep_reuse_interval` > 1) the sparse variant is the full calls' (handing their deep levels' outputs
    on), and `reuse_call` gives the reuse calls' (taking them)."""
    temporal = []
    if reuse_call:
        temporal = [FxPass("reuse_deep_levels", functools.partial(reuse_deep_levels, policy=policy),
                           ("annotate_spatial_layout",), reuse_taps_and_reads)]
    elif policy.deep_reuse_interval > 1:
        temporal = [FxPass("insert_reuse_taps", functools.partial(insert_reuse_taps, policy=policy),
                           ("annotate_spatial_layout",), reuse_taps_and_reads)]
    return [
        ANNOTATE,
        *temporal,
        FxPass("find_sparse_regions", functools.partial(find_sparse_regions, policy=policy),
               ("annotate_spatial_layout",), every_sparse_node_in_a_region),
        FxPass("insert_region_boundaries", insert_region_boundaries, ("find_sparse_regions",),
               regions_entered_and_left_through_boundaries),
        FxPass("cached_group_norm", cached_group_norm, ("insert_region_boundaries",), no_sparse_group_norm),
        # after cached_group_norm: conv windows are pulled back through the rewritten GroupNorms
        FxPass("sparse_conv", sparse_conv, ("cached_group_norm",), no_padded_conv_on_blocks),
        FxPass("sparse_upsample", sparse_upsample, ("sparse_conv",), no_dense_upsample_of_blocks),
        FxPass("relayout_gathered", relayout_gathered, ("insert_region_boundaries",), no_dense_reshape_of_blocks),
        # after sparse_conv: the window chains it builds need their operands repeated too
        FxPass("broadcast_over_blocks", broadcast_over_blocks, ("sparse_conv",), per_item_operands_repeated),
        FxPass("sparse_attention", sparse_attention, ("insert_region_boundaries",)),
        # (programs bound for controlled calls take the source's maps; others run the stock attention)
        FxPass("control_cross_attention", control_cross_attention, ("insert_region_boundaries",)),
        FxPass("select_linear_library", select_linear_library, ("insert_region_boundaries",), no_aten_linear),
        # after broadcast_over_blocks: it may have repeated the GroupNorm's operands
        FxPass("fuse_gather_norm_silu", fuse_gather_norm_silu, ("sparse_conv", "broadcast_over_blocks")),
        FxPass("eliminate_dead_code", eliminate_dead_code),
        # last: its nodes have no users, and only calls that ask for it write
        FxPass("insert_cache_write_back", insert_cache_write_back, ("eliminate_dead_code",)),
    ]


def _layout_tap(layout_module: str | None) -> list[FxPass]:
    if layout_module is None:  # a model without layout features: control calls cannot hold its layout
        return []
    return [FxPass("tap_layout_features", functools.partial(tap_layout_features, module=layout_module),
                   ("annotate_spatial_layout",), layout_features_tapped)]


def record_passes(refs: set[CacheRef], layout_module: str | None = None) -> list[FxPass]:
    """The record variant: the captured graph, saving what the sparse variant reads, and what control calls read
    (cross-attention maps, the output of the adapter's `layout_module`)."""
    return [
        ANNOTATE,
        FxPass("record_cross_attention_maps", record_cross_attention_maps, ("annotate_spatial_layout",)),
        *_layout_tap(layout_module),
        DENSE_LINEAR_LIBRARY,
        FxPass("insert_record_taps", functools.partial(insert_record_taps, refs=refs)),
    ]


def control_passes(refs: set[CacheRef], layout_module: str | None = None) -> list[FxPass]:
    """The control variant: dense, with Prompt-to-Prompt cross-attention control and (for its first calls) the
    source run's layout features, recording like `record` so that an edit run can become the source of the next
    edit."""
    return [
        ANNOTATE,
        FxPass("control_cross_attention", control_cross_attention, ("annotate_spatial_layout",)),
        *_layout_tap(layout_module),
        DENSE_LINEAR_LIBRARY,
        FxPass("insert_record_taps", functools.partial(insert_record_taps, refs=refs)),
    ]
