"""The vocabulary the passes and the runtime share: where a tensor's spatial dims are, and what the cache holds.

A *spatial* tensor carries the latent image's pixels at some resolution `res = (H, W)`, in one of two forms:

- ``map``: two dims hold H and W (NCHW has them at 2, 3; NHWC at 1, 2).
- ``seq``: one dim holds the H*W pixels flattened row-major (tokens ``B x HW x C``, heads ``B x h x HW x d``).
  A *joint* sequence (a diffusion transformer's text and image tokens, concatenated for joint attention) holds
  `tokens = (before, after)` tokens without pixels around the pixels in that dim.

Dim 0 is always the batch. In a sparse call, a spatial tensor at a sparse resolution is *gathered*: only the pixels
of the active blocks are present. A gathered ``map`` tensor folds the blocks into the batch,
``(B * num_blocks, ..., b, b, ...)``; a gathered ``seq`` tensor replaces its pixel dim by the active pixels in
block-major order. Both orders agree, so ``map`` <-> ``seq`` relayouts of gathered tensors are the same reshapes
as in the dense graph.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

KEY = "fisedit_key"  # node meta key: the node's stable identity (module path, op, ordinal), see capture.py
INPUT = "fisedit_input"  # placeholder meta key: InputLayout, from the model adapter (see capture.py)
LAYOUT = "fisedit_layout"  # node.meta key: SpatialLayout, or None for tensors without pixels
SPARSE = "fisedit_sparse"  # node.meta key: True where the node computes on gathered values
REGION = "fisedit_region"  # node.meta key: id of the sparse region (connected component) the node is in


def graph_constant(cls: type) -> type:
    """Class decorator: let instances appear as arguments in generated graph code.

    FX writes a node's non-node arguments into the module's Python code with `repr`; a dataclass's repr is
    evaluable once its class name is a global there.
    """
    from torch.fx.graph import _register_custom_builtin

    _register_custom_builtin(cls.__name__, f"from {cls.__module__} import {cls.__name__}", cls)
    return cls


@graph_constant
@dataclasses.dataclass(frozen=True)
class SpatialLayout:
    """Where the pixels of a tensor are. `shape` is the dense shape; `dims` the pixel dims (2 for map, 1 for seq)."""

    kind: Literal["map", "seq"]
    res: tuple[int, int]
    dims: tuple[int, ...]
    shape: tuple[int, ...]
    tokens: tuple[int, int] = (0, 0)  # a joint sequence's tokens without pixels, before and after the pixels

    def __post_init__(self) -> None:
        if self.shape and self.shape[0] == 0:
            raise ValueError("spatial tensors need a batch dim")
        if self.tokens != (0, 0) and self.kind != "seq":
            raise ValueError("only a token sequence (kind 'seq') holds tokens without pixels")

    @property
    def joint(self) -> bool:
        """A joint sequence: pixels and tokens without pixels in the pixel dim (see the module docstring)."""
        return self.tokens != (0, 0)

    # (cached: kernels read them several times per call; a frozen dataclass's fields never change)
    @property
    def rows_of_pixels(self) -> bool:
        """A token sequence of pixels alone at dim -2, as attention takes it: (B, heads, pixels, head_dim)."""
        return self.kind == "seq" and self.dims[0] == len(self.shape) - 2 and not self.joint

    @functools.cached_property
    def rest_dims(self) -> tuple[int, ...]:
        """The dims that are neither batch nor pixels, in order."""
        return tuple(d for d in range(1, len(self.shape)) if d not in self.dims)

    @functools.cached_property
    def rest_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[d] for d in self.rest_dims)

    @functools.cached_property
    def rest_numel(self) -> int:
        return math.prod(self.rest_shape)

    def describe(self) -> str:
        h, w = self.res
        joint = f"+{self.tokens[0]}/{self.tokens[1]}" if self.joint else ""
        return f"{self.kind}{list(self.dims)}@{h}x{w}{joint}"

    def with_rest_size(self, size: int) -> SpatialLayout:
        """This layout with `size` elements in its one non-pixel dim (a map's channels): an operand of a
        concatenation along that dim, or the concatenation of operands."""
        if len(self.rest_dims) != 1:
            raise ValueError(f"{self.describe()} of shape {self.shape} has {len(self.rest_dims)} non-pixel dims: "
                             "only a layout with one (a map's channels) concatenates")
        shape = list(self.shape)
        shape[self.rest_dims[0]] = size
        return dataclasses.replace(self, shape=tuple(shape))


def concatenated(layouts: Sequence[SpatialLayout]) -> SpatialLayout:
    """The layout of `layouts`' tensors concatenated along their one non-pixel dim (see `with_rest_size`)."""
    first = layouts[0]
    if len(layouts) == 1:
        return first
    if any((l.kind, l.res, l.dims) != (first.kind, first.res, first.dims) for l in layouts):
        raise ValueError(f"layouts {[l.describe() for l in layouts]} differ in their pixels: they do not concatenate")
    return first.with_rest_size(sum(l.rest_numel for l in layouts))


# What a recorded tensor is for: a node's output that sparse calls read outside their blocks (scatter targets and
# halo inputs), the keys and values of self-attention (read by active-query attention), a GroupNorm's statistics
# (sparse calls), a cross-attention map or the layout features (control calls: `passes/tap_layout_features.py`).
# "reused": a deep level's output that a full sparse call hands to the reuse calls after it
# (`Policy.deep_reuse_interval`); never recorded, it lives in the run's mode.
CacheKind = Literal["output", "attention_kv", "group_norm_stats", "attention_map", "layout", "reused"]
ACTIVATION_KINDS = ("output", "attention_kv")  # recorded node outputs, which write-back keeps current
# What control calls read of the source run: recorded in a run's first steps only, and kept together.
CONTROL_KINDS = frozenset({"attention_map", "layout"})


@graph_constant
@dataclasses.dataclass(frozen=True)
class CacheRef:
    """A tensor that later calls read from the record cache (see `CacheKind`). `key` is the node's stable identity
    (`cache_key`), the same in every variant and every capture of the model, whatever the passes do to the node's
    FX name."""

    key: str
    kind: CacheKind = "output"

    @staticmethod
    def of(node: torch.fx.Node, kind: CacheKind = "output") -> CacheRef:
        return CacheRef(cache_key(node), kind)


def cache_key(node: torch.fx.Node) -> str:
    """The stable identity of a captured node: ``<module path>:<op>#<ordinal within that module>``."""
    key = node.meta.get(KEY)
    if key is None:
        raise ValueError(f"node {node.name!r} has no stable key: only nodes of the captured graph (and nodes a pass "
                         "rewrites in their place) can be recorded")
    return key



@dataclasses.dataclass(frozen=True)
class InputLayout:
    """One flattened input of a model call (a pytree leaf, in flattening order, which is the captured graph's
    placeholder order): its path, its pixel layout (None for inputs without pixels), whether it is the latents, and
    whether it is the prompt's embedding (`text`: the keys of the cross-attentions whose maps Prompt-to-Prompt
    control records and injects; an IP-Adapter's image tokens are not). Model adapters make these; `capture` puts
    them on the placeholders."""

    path: str
    layout: SpatialLayout | None
    latents: bool = False
    text: bool = False


def reads_input(node: torch.fx.Node, which: Callable[[InputLayout], bool]) -> bool:
    """Whether `node`'s value depends on a model input whose `InputLayout` satisfies `which` (inputs with pixels,
    the prompt's embedding, ...)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder" and n.meta.get(INPUT) is not None and which(n.meta[INPUT]):
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def latent_input(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The placeholder holding the latents (whose resolution is the latent resolution)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and getattr(node.meta.get(INPUT), "latents", False):
            return node
    raise ValueError("the graph has no latents input: capture it with fisedit_compiler.capture and a model adapter")


def tensor_meta(node: torch.fx.Node) -> torch.Tensor | None:
    """The fake tensor recorded for a node at capture, or None for non-tensor values."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None
