"""Reuse deep levels: temporal reuse stacked on the spatial one (`Policy.deep_reuse_interval`).

The deep, low-resolution levels of a U-Net change little from one denoising step to the next (DeepCache's
observation; EEdit's temporal redundancy), and in a sparse call they are where the mask, pooled down, covers most of
the map. Of every `deep_reuse_interval` sparse calls of a run the first is *full* and the others *reuse* its deep
levels: they compute only the levels whose maps are less than `deep_reuse_downscale` times smaller than the latents
(for SD, the first down block and the last up block), on their active blocks as always.

The cut is where a deep value flows into a fine one (`deep_outputs`: the inputs of the up path's upsamplers):

    full variant (passes.insert_reuse_taps)            reuse variant (this pass)
    %m : aten.add(%a, %b)          @32x32 (deep)       %m : reused(cache[m:reused], layout)   @32x32
    %_ : keep_for_reuse(%m, cache[m:reused])           %up : aten.upsample_nearest2d(%m, ...) @64x64
    %up : aten.upsample_nearest2d(%m, ...) @64x64      (everything that only fed %m: removed)

`keep_for_reuse` reads %m at full size (a sparse %m is scattered into its recorded value, so the record variant
records it) and hands it to the run's mode; `reused` is a dense producer that the region gathers from like any
other. Both passes run right after `annotate_spatial_layout`; this one removes what only fed the deep outputs.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import KEY, LAYOUT, CacheRef, SpatialLayout, latent_input
from ..ir import ops as ir_ops
from ..policy import Policy
from . import ops
from .annotate_spatial_layout import UnknownLayout
from .manager import PassError


class DeepReuseError(PassError, ValueError):
    """A model whose levels the policy's temporal reuse cannot cut (none deep enough, or one of unknown layout)."""


def _deep(node: fx.Node, latent: tuple[int, int], downscale: int) -> bool:
    layout = node.meta.get(LAYOUT)
    if not isinstance(layout, (SpatialLayout, UnknownLayout)):
        return False
    return all(r * downscale <= size for r, size in zip(layout.res, latent))


def deep_outputs(gm: fx.GraphModule, policy: Policy) -> list[fx.Node]:
    """The deep nodes (maps at least `deep_reuse_downscale` times smaller than the latents) that a node outside the
    deep levels reads: what a reuse call takes from the last full call instead of computing."""
    latent = latent_input(gm).meta[LAYOUT].res
    cut = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _deep(node, latent, policy.deep_reuse_downscale):
            continue
        if any(not _deep(user, latent, policy.deep_reuse_downscale) for user in node.users):
            if not isinstance(node.meta[LAYOUT], SpatialLayout):
                raise DeepReuseError(f"node {node.name!r} leaves the deep levels with an unknown pixel layout "
                                     f"({node.meta[LAYOUT].reason}): its value cannot be reused")
            cut.append(node)
    if not cut:
        raise DeepReuseError(
            f"no level of this model is {policy.deep_reuse_downscale} or more times smaller than its latents "
            f"{latent}: lower Policy.deep_reuse_downscale, or turn temporal reuse off (deep_reuse_interval=1)")
    return cut


def reuse_deep_levels(gm: fx.GraphModule, policy: Policy) -> int:
    """The reuse variant: every deep output becomes `reused`, and the deep levels, now unread, are removed."""
    cut = deep_outputs(gm, policy)
    for node in cut:
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ir_ops.reused, (CacheRef.of(node, "reused"), node.meta[LAYOUT]))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", LAYOUT, KEY)})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code(is_impure_node=ops.is_impure)  # the deep levels' dropouts (identities) too
    gm.recompile()
    return len(cut)


def reuse_taps_and_reads(gm: fx.GraphModule) -> list[str]:
    """Postcondition (either variant): every reused value is a full-size map that the graph still uses."""
    problems = []
    for node in gm.graph.nodes:
        if node.target is ir_ops.keep_for_reuse and not isinstance(node.args[0].meta.get(LAYOUT), SpatialLayout):
            problems.append(f"{node.name} keeps a value without a pixel layout")
        if node.target is ir_ops.reused and not node.users:
            problems.append(f"{node.name} is reused but read by nothing")
    return problems
