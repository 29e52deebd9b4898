"""Find sparse regions: mark the nodes that compute on gathered blocks, and group them into regions.

    %conv2d_1 : aten.conv2d(%silu, ...)   @32x32   -> sparse, region 0
    %linear_4 : aten.linear(%ln, ...)      @32x32   -> sparse, region 0
    %conv2d_9 : aten.conv2d(%silu_7, ...)  @8x8     -> dense (below Policy.max_sparse_downscale)

A node is sparse when it has pixels at a sparse resolution and a sparse rule exists for its op. A region is a
maximal connected subgraph of sparse nodes (networkx weakly connected components): gathers go on its inputs and
scatters on its outputs (`insert_region_boundaries`). A node at a sparse resolution that no rule covers is an
error naming the node and the op: silently computing it densely on gathered data would be wrong.

Joint sequences (a diffusion transformer's image and text tokens, `SpatialLayout.tokens`) are sparse like any
token sequence: gathered, they hold the active pixels and all their other tokens (a gather or scatter moves the
pixels only). Slicing the text tokens out of a gathered joint sequence is sparse although its output has no pixels.
Constants with pixels (a positional embedding, rotary embeddings) are computed at full size and gathered where a
region reads them.
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from ..ir import LAYOUT, REGION, SPARSE, SpatialLayout, latent_input
from ..ir import ops as ir_ops
from ..policy import Policy
from . import ops
from .annotate_spatial_layout import UnknownLayout
from .manager import PassError

FULL_INPUTS = "fisedit_full_inputs"  # node.meta key: input nodes a sparse node needs at full size


class UnsupportedOpError(PassError, NotImplementedError):
    """A graph node at a sparse resolution that no pass knows how to make sparse."""


def _layout(node: object) -> SpatialLayout | None:
    layout = node.meta.get(LAYOUT) if isinstance(node, fx.Node) else None
    return layout if isinstance(layout, SpatialLayout) else None


def sparse_rule(node: fx.Node, policy: Policy, is_sparse_res) -> str | None:
    """Why `node` cannot run sparse (a reason for a dense decision or an error), or None if it can.

    Returns "dense" for nodes that legitimately stay dense at a sparse resolution (by policy, or because their
    input is at a dense resolution)."""
    target = node.target
    if target is ir_ops.reused:  # a deep level's output from the last full call: full size, gathered from
        return "dense"
    first = _layout(node.args[0]) if node.args else None
    if target is ops.CONV or target in ops.UPSAMPLE_NEAREST:
        return None if first is not None and is_sparse_res(first.res) else "dense"
    if target is ops.GROUP_NORM:
        return None if policy.norm_stats == "recorded" else "dense"
    if target is ops.SDPA:
        self_attention = _layout(node.args[1]) is not None
        return "dense" if self_attention and policy.attention == "dense" else None
    if target is ops.EINSUM:
        return "dense"  # a permutation of the whole output (unpatchify): after the scatter
    if target in ops.RESHAPES and first is not None and first.res != node.meta[LAYOUT].res:
        return "dense"  # unfolds pixels into a finer map: no block structure to keep
    if (target in ops.ELEMENTWISE or target in ops.PER_PIXEL_DIM_ARG or target in ops.RESHAPES
            or target in ops.PERMUTES or target in ops.UNSQUEEZES or target is ops.GETITEM or target is ops.SLICE
            or target is ops.STACK or target in ops.REDUCTIONS):
        return None
    return f"no sparse rule for {target}"


def full_inputs(node: fx.Node, policy: Policy) -> set[fx.Node]:
    """Inputs that a sparse node reads at full size: keys and values of active-query self-attention."""
    if node.target is ops.SDPA and policy.attention == "active_queries" and _layout(node.args[1]) is not None:
        return {node.args[1], node.args[2]}
    return set()


def _joint(node: object) -> bool:
    layout = _layout(node)
    return layout is not None and layout.joint


def find_sparse_regions(gm: fx.GraphModule, policy: Policy) -> int:
    """Set `meta[SPARSE]`, `meta[REGION]` and `meta[FULL_INPUTS]`; returns the number of regions."""
    latent = latent_input(gm).meta[LAYOUT].res

    def is_sparse_res(res: tuple[int, int]) -> bool:
        return policy.is_sparse_resolution(res, latent)

    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        layout = node.meta.get(LAYOUT)
        node.meta[SPARSE] = False
        spatial_inputs = [a for a in node.all_input_nodes if a.meta.get(LAYOUT) is not None]
        if layout is None and node.op == "call_function" and any(_joint(a) and a.meta[SPARSE] for a in spatial_inputs):
            layout = node.args[0].meta[LAYOUT]  # text tokens sliced out of a gathered joint sequence: sparse
        if node.op != "call_function" or layout is None or not is_sparse_res(layout.res):
            continue
        if not spatial_inputs:
            continue  # a constant with pixels: computed at full size, gathered where a region reads it
        reason = layout.reason if isinstance(layout, UnknownLayout) else sparse_rule(node, policy, is_sparse_res)
        if reason == "dense":
            continue
        if reason is not None:
            h, w = layout.res
            raise UnsupportedOpError(
                f"node {node.name!r} ({node.target}) at resolution {h}x{w} cannot run sparse: {reason}. "
                f"Lower Policy.max_sparse_downscale (now {policy.max_sparse_downscale}) to keep this resolution "
                "dense, or add a sparse rule for the op."
            )
        node.meta[SPARSE] = True
        node.meta[FULL_INPUTS] = full_inputs(node, policy)
        graph.add_node(node)
        for user in node.all_input_nodes:
            if user.meta.get(SPARSE):
                graph.add_edge(user, node)
    regions = list(nx.weakly_connected_components(graph))
    for region_id, nodes in enumerate(sorted(regions, key=lambda r: min(n.name for n in r))):
        for node in nodes:
            node.meta[REGION] = region_id
    return len(regions)


def every_sparse_node_in_a_region(gm: fx.GraphModule) -> list[str]:
    """Postcondition: every node is marked sparse or not, and every sparse node belongs to a region."""
    return [f"{n.name} is not marked" if SPARSE not in n.meta else f"{n.name} is sparse but in no region"
            for n in gm.graph.nodes if SPARSE not in n.meta or (n.meta[SPARSE] and REGION not in n.meta)]
