"""One dynamo graph as the fisedit backend sees it: a `FisEditGraph`, and how it is lowered into graph variants.

dynamo hands the backend a torch-level `fx.GraphModule`; nothing is lowered then. Inside `record()`/`sparse()` the
first call of an input signature wraps the graph as a module called like a U-Net, with keyword inputs (the
latents as `sample`), and `build_variants` captures it (non-strict `torch.export`) through a small adapter of the
graph whose inputs with pixels are the ones the model's adapter named, found by identity (`backend._Call`).
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .adapters import ModelAdapter
from .build import build_variants
from .ir import InputLayout
from .ir.signature import InputSignature
from .policy import Policy
from .runtime.executor import Variants


class FisEditGraph:
    """What the backend returns for one dynamo graph: called by dynamo with the graph's flat inputs."""

    def __init__(self, gm: fx.GraphModule, calls: contextvars.ContextVar[Any]):
        self.graph_module = gm
        self.calls = calls
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_names = [n.name for n in placeholders]
        # Python numbers that dynamo passes as 0-d tensors and reads with .item() (floats under dynamic=True): their
        # values become constants of the lowered graph and part of its input signature, since export would
        # otherwise trace them as unknown data and fail on the first shape check that uses one.
        self.scalar_inputs = {
            n.name: n.meta["example_value"].dtype for n in placeholders
            if n.users and all(u.op == "call_method" and u.target == "item" for u in n.users)
            and isinstance(n.meta.get("example_value"), torch.Tensor)
        }
        self.break_reason = _graph_break(gm)
        # the inputs with pixels, by name, per input signature (what `build_graph_variants` lowers the graph with)
        self.layouts: dict[InputSignature, dict[str, InputLayout]] = {}

    def __call__(self, *args: Any) -> Any:
        call = self.calls.get()
        if call is None:  # outside record()/sparse(): dynamo's graph as it is
            return self.graph_module(*args)
        return call.run(self, args)

    def named_inputs(self, args: tuple, found: dict[int, InputLayout]) -> dict[str, Any]:
        """The graph's inputs by name, the latents as `sample` (readable dump folder names), given the inputs with
        pixels (`found`, by position); the first call of a signature notes their layouts."""
        names = [("sample" if found[i].latents else name) if i in found else name
                 for i, name in enumerate(self.input_names)]
        inputs = {name: arg.item() if name in self.scalar_inputs else arg for name, arg in zip(names, args)}
        self.layouts.setdefault(InputSignature.of(inputs), {
            names[i]: dataclasses.replace(layout, path=names[i]) for i, layout in found.items()})
        return inputs


def build_graph_variants(inputs: dict[str, Any], graph: FisEditGraph, policy: Policy) -> Variants:
    """The variants of a dynamo graph for these inputs (see `FisEditGraph.named_inputs`)."""
    lowered = _GraphCall(graph.graph_module, list(inputs), graph.scalar_inputs)
    return build_variants(_GraphAdapter(lowered, graph.layouts[InputSignature.of(inputs)]), inputs, policy)


class _GraphCall(nn.Module):
    """A dynamo graph called like a U-Net, with keyword inputs, so that `capture` lowers it as it lowers a U-Net:
    to an ATen graph with one placeholder per input and the latents as `inputs_sample`."""

    def __init__(self, gm: fx.GraphModule, names: list[str], scalar_inputs: dict[str, torch.dtype]):
        super().__init__()
        self.graph_module = gm
        self.names = names
        self.scalar_inputs = scalar_inputs

    def forward(self, return_dict: bool = False, **inputs: Any) -> Any:
        args = [torch.tensor(inputs[n], dtype=self.scalar_inputs[n]) if n in self.scalar_inputs else inputs[n]
                for n in self.names]
        return self.graph_module(*args)


class _GraphAdapter(ModelAdapter):
    """The adapter of a dynamo graph lowered as a `_GraphCall`: its inputs are the graph's, by name; those with
    pixels are the ones the model's own adapter named, found by identity in `_Call.run`."""

    latents = "sample"

    def __init__(self, graph: _GraphCall, layouts: dict[str, InputLayout]):
        self.layouts = layouts
        super().__init__(graph)

    def check_signature(self) -> None:  # the graph takes whatever dynamo passes it
        pass

    def input_layouts(self, inputs: dict[str, Any]) -> list[InputLayout]:
        return [self.layouts.get(name, InputLayout(name, None)) for name in inputs]

    def call(self, inputs: dict[str, Any]) -> Any:
        return self.model(**inputs)


def _graph_break(gm: fx.GraphModule) -> str | None:
    """Where dynamo broke the graph after `gm`, if it did (dynamo notes why it compiled each graph)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = " ".join(str(reason.reason).split())
    stack = getattr(reason, "user_stack", None)
    if stack:
        frame = stack[-1]
        text += f" (at {frame.filename}:{frame.lineno}, in {frame.name})"
    return text
