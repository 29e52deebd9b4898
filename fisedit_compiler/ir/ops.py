"""The IR's op vocabulary: the ops that passes put into graph variants, besides ATen ops.

An IR op takes static arguments (layouts, gather geometries, cache references) that say *what* a call reads, not
the values. Each op is declared here by its signature and what it computes, and nothing else: an IR graph does not
run by itself, and calling an op outside a program raises. The passes build and recognise nodes by these ops
(``node.target is ops.gather_windows``); the runtime registers how each op is lowered into a program
(`runtime.ops.register_lowering`, a table keyed by these ops, as torch._inductor's lowerings are keyed by ATen
ops), which `runtime.program.bind` runs per call state. A new op is one declaration here and one lowering there.

- `IR_OPS`: every op, by name.
- `WRITES`: the ops that a graph calls for what they store, not for a value: dead-code elimination keeps them
  (`passes.ops.is_impure`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .graph import CacheRef, SpatialLayout
from .index import ConvWindows, WindowSpec

# name -> op, in the order of declaration
IR_OPS: dict[str, Callable] = {}

# IR ops that a graph calls for what they store, not for a value: dead-code elimination keeps them.
WRITES: set[Callable] = set()


def ir_op(declaration: Callable | None = None, *, writes: bool = False) -> Callable:
    """Declare an IR op by a function whose signature and docstring are the op's (its body is never run).

    The op (what graphs call) has the declaration's name, module, signature and docstring, and only refuses to run
    unbound. ``@ir_op(writes=True)``: the op is called for what it stores (`WRITES`)."""
    if declaration is None:
        return functools.partial(ir_op, writes=writes)
    name = declaration.__name__
    if name in IR_OPS:
        raise ValueError(f"IR op {name} is declared twice")

    @functools.wraps(declaration)
    def op(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} is an op of a fisedit IR graph, which does not run by itself: call the compiled model, or bind "
            "the variant into a program with fisedit_compiler.runtime.program.bind"
        )

    IR_OPS[name] = op
    if writes:
        WRITES.add(op)
    return op


# --- record variant ---------------------------------------------------------------------------------------------


@ir_op
def record(value, ref: CacheRef) -> None:
    """Save a node's output for later sparse calls (a program output)."""


@ir_op
def group_norm_recording_stats(x, num_groups: int, weight, bias, eps: float, ref: CacheRef):
    """GroupNorm that also saves its per-(batch item, group) mean and rstd."""


# --- sparse variant ---------------------------------------------------------------------------------------------


@ir_op
def gather_active(full, layout: SpatialLayout):
    """Region entry: the active blocks of a full-size tensor computed in this call."""


@ir_op
def gather_windows(source, ref: CacheRef | None, layout: SpatialLayout, spec: WindowSpec):
    """Windows (e.g. conv inputs with halo) of a gathered tensor whose inactive pixels are recorded at `ref`;
    with `ref=None`, of a full-size tensor."""


@ir_op
def scatter_into_recorded(fresh, ref: CacheRef, layout: SpatialLayout):
    """Region exit: the full-size tensor, fresh on the active blocks and recorded elsewhere."""


@ir_op
def gather_windows_norm_silu(sources: list, refs: list[CacheRef | None], layouts: list[SpatialLayout],
                             spec: WindowSpec, num_groups: int, weight, bias, stats_ref: CacheRef,
                             channels: tuple[int, int, int] | None = None, offset=None):
    """`gather_windows` of `sources` (with `refs` and `layouts`: the operands of a concatenation along the
    channels, or one), GroupNorm with the source run's statistics and SiLU in one kernel, zero outside the image
    (the following convolution's padding). `channels` (first, end, total): the operands hold that slice of the
    normalised channels (None: all of them). `offset`: a (B or 1, C, 1, 1) value added to the windows before the
    GroupNorm (a resnet's time embedding), folded into its shift."""


@ir_op
def zero_outside_image(windows, layout: SpatialLayout, spec: WindowSpec):
    """Zero window pixels that lie outside the map (a convolution's zero padding), after ops that made them
    non-zero."""


@ir_op
def conv_windows(windows, weight, bias, stride: list[int], dilation: list[int], groups: int, spec: ConvWindows):
    """A convolution over a batch of input windows (with halo) without padding: one output block per window, by
    the device's measured algorithm for its channels and block size (`CostConstants.conv_algorithm`)."""


@ir_op
def linear_by_library(x, weight, bias, layout: SpatialLayout | None):
    """A linear layer as one GEMM by the library the cost constants name for its size and dtype
    (`CostConstants.gemm_library`). `layout` is the output's where it is gathered: its rows are then those of the
    active pixels, a plan's block counts."""


@ir_op
def group_norm_recorded_stats(x, num_groups: int, weight, bias, ref: CacheRef):
    """GroupNorm with the source run's statistics: a per-channel affine map that runs on gathered blocks."""


@ir_op
def repeat_over_blocks(value, like):
    """Line a per-batch-item operand up with a gathered map tensor, whose batch dim holds B x blocks rows."""


@ir_op
def relayout_gathered(x, source: SpatialLayout, target: SpatialLayout):
    """A reshape of a gathered tensor: `source` and `target` are the dense layouts before and after."""


@ir_op
def active_query_attention(query, key, value, key_ref: CacheRef, value_ref: CacheRef,
                           layout: SpatialLayout, scale: float | None = None):
    """Self-attention of active queries against every token: fresh keys/values for active tokens, recorded ones
    for the rest. `layout` is the keys' (B, heads, tokens, head_dim) layout."""


@ir_op
def write_back(fresh, ref: CacheRef, layout: SpatialLayout) -> None:
    """In programs that write back, store a gathered node's fresh active pixels into its recorded tensor (an input
    the program updates in place), so the cache holds this run's activations (continuous editing). Safe mid-step:
    recorded values are only read at inactive pixels, which this never touches."""


# --- temporal reuse of deep levels (Policy.deep_reuse_interval) --------------------------------------------------


@ir_op(writes=True)
def keep_for_reuse(value, ref: CacheRef) -> None:
    """Full sparse calls: hand a deep level's output (full size) to the reuse calls that follow (a program
    output, which the run's mode keeps)."""


@ir_op
def reused(ref: CacheRef, layout: SpatialLayout):
    """Reuse calls: a deep level's output as the last full call computed it, in place of computing the level.
    `layout`: the replaced node's."""


# --- cross-attention maps (record, control and sparse variants) ------------------------------------------------


@ir_op
def cross_attention_recording_map(query, key, value, ref: CacheRef, scale: float | None = None):
    """Cross-attention that saves its attention map (B, heads, pixels, tokens) in programs that record maps.

    Those compute softmax(QK^T)V explicitly, exactly as `controlled_cross_attention` does, so that a control run of
    the same prompt reproduces the source run bit for bit."""


@ir_op
def controlled_cross_attention(query, key, value, ref: CacheRef, scale: float | None = None):
    """Prompt-to-Prompt cross-attention control: for every token the edited prompt shares with the source prompt
    (the token alignment input: for each token the source token, or -1 for a new token) the source run's attention
    map column replaces the fresh one."""


@ir_op
def controlled_active_cross_attention(query, key, value, ref: CacheRef, layout: SpatialLayout,
                                      scale: float | None = None):
    """`controlled_cross_attention` of active queries (sparse calls under control): the source run's map rows of
    the active pixels replace the fresh map's columns of shared tokens. `layout` is the queries' (B, heads, pixels,
    head_dim) layout."""


# --- layout features (record and control variants) ------------------------------------------------------------


@ir_op
def layout_features(value, ref: CacheRef):
    """The model's layout features (a U-Net's mid block output: where the objects are). Programs that hold the
    layout (control calls of a swap edit, `ControlMode.hold_layout`) return the source run's instead of `value`;
    programs that record cross-attention maps record what they return, beside the maps."""
