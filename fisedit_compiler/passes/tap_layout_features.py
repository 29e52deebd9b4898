"""Tap layout features: the record and control variants route the model's layout features through one op.

    %m : aten.div(%h, 1.0)        (the last op of `mid_block`, read by `up_blocks.0`)
->
    %m : aten.div(%h, 1.0)
    %held : layout_features(%m, cache[m:layout])       (every reader of %m reads %held)

Where a picture's objects are is decided in its first denoising steps, and a U-Net's deepest level carries it. On
a model whose objects grow where the initial noise already leans towards the prompt's colour (the embedded shapes
model), a word swap moves the object: "a red circle" -> "a blue circle" drew the blue circle elsewhere, even with
every cross-attention map injected, while taking the mid block's output from the source run for the first steps
kept it in place and let the finer levels, which read the edited prompt, recolour it. So `layout_features` returns
the source run's value in control calls that hold the layout (`ControlMode.hold_layout`), and records its value
in calls that record cross-attention maps, beside them (record calls, and control calls whose run becomes the next
source).

Which module's output is the layout is the adapter's to say (`ModelAdapter.layout_module`: "mid_block" for
`UNet2DConditionModel`); the pass finds its output by the nodes' stable keys (`<module path>:<op>#<n>`).
"""

from __future__ import annotations

import torch.fx as fx

from ..ir import KEY, LAYOUT, CacheRef, SpatialLayout
from ..ir import ops as ir_ops
from .manager import PassError


class LayoutModuleError(PassError, ValueError):
    """The adapter's layout module is not in the graph, or has no single spatial output."""


def _inside(node: fx.Node, module: str) -> bool:
    key = node.meta.get(KEY, "")
    return key.startswith(f"{module}:") or key.startswith(f"{module}.")


def layout_output(gm: fx.GraphModule, module: str) -> fx.Node:
    """The output of `module` (a dotted module path): its one spatial node that a node outside it reads."""
    inside = [node for node in gm.graph.nodes if node.op == "call_function" and _inside(node, module)]
    if not inside:
        raise LayoutModuleError(f"the layout module {module!r} ran no op in the captured graph")
    outputs = [node for node in inside
               if isinstance(node.meta.get(LAYOUT), SpatialLayout)
               and any(not _inside(user, module) for user in node.users)]
    if len(outputs) != 1:
        names = [node.name for node in outputs] or "none"
        raise LayoutModuleError(f"the layout module {module!r} should have one spatial output, found {names}")
    return outputs[0]


def tap_layout_features(gm: fx.GraphModule, module: str) -> int:
    """Route every read of `module`'s output through `layout_features`."""
    node = layout_output(gm, module)
    with gm.graph.inserting_after(node):
        tap = gm.graph.call_function(ir_ops.layout_features, (node, CacheRef.of(node, "layout")))
    tap.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", LAYOUT)})
    # the tap's value is what the rest of the graph computes from, so record taps (which find nodes by key) save it
    tap.meta[KEY] = node.meta.pop(KEY)
    node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    gm.recompile()
    return 1


def layout_features_tapped(gm: fx.GraphModule) -> list[str]:
    """Postcondition: one tap, and its value is what the rest of the graph reads."""
    taps = [node for node in gm.graph.nodes if node.target is ir_ops.layout_features]
    if len(taps) != 1:
        return [f"{len(taps)} layout_features taps, expected 1"]
    return [] if taps[0].users else [f"{taps[0].name} is read by nothing"]
