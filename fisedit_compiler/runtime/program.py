"""Programs: a graph variant bound to one call state, as a self-contained graph.

The passes build IR graphs (`ir.ops`: ops with static arguments that name what a call reads). `bind` lowers
one for a call state, a mask plan and the flags of the call (record cross-attention maps, control, write back),
into a `Program`:

- its graph's inputs are the model's flattened inputs, then one placeholder per value the call reads (`Slot`s:
  a recorded tensor of the step, a source-run attention map, the token alignment, an index tensor of the plan);
- its outputs are the model's outputs, then every tensor the call records (`Program.writes`);
- it calls only ATen ops and registered kernels (`torch.ops.fisedit.*`); every plan-dependent decision was taken
  at bind time. So `torch.compile(program.gm, fullgraph=True)` traces it in one graph, and its eager run is the
  reference.

`Program.__call__` binds the slots from a step record and a plan, runs the graph and stores what it recorded.
A program depends on its plan only through the plan's structure (block sizes, which gathers are trivial or
touch the border, which library a GEMM takes), never on a plan object, so one program serves every mask whose plan
has the same structure (`Program.fits`). How many blocks and windows a resolution has is an argument of an eager
program (a slot, read from the plan at each call), so that masks of other sizes reuse it instead of paying a
lowering and code generation on their first call (150-250 ms on the shapes model's U-Net); a program for a compiler
(`inline_kernels`) takes them as constants, which the compiler specialises on.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..cost_model import CostConstants, load_constants
from ..ir import CacheRef, GatherIndex, WindowCoords, WindowSpec
from ..kernels.library import INDEX_FIELDS
from ..kernels.registry import DIRECT_CALLS
from .cache import StepNotRecordedError, StepRecord
from .mask_plan import MaskPlan
from .ops import LOWERINGS

# program node meta: the name of the IR node it was copied or lowered from (a copy's own name may differ: a
# lowering that ran before may have taken it)
LOWERED_FROM = "fisedit_lowered_from"


@dataclasses.dataclass(frozen=True)
class Recorded:
    """The step record's tensor at `ref` (`part` 0/1: a GroupNorm's mean/rstd)."""

    ref: CacheRef
    part: int | None = None


@dataclasses.dataclass(frozen=True)
class SourceMap:
    """The source run's tensor at `ref` (control calls: a cross-attention map, the layout features)."""

    ref: CacheRef


@dataclasses.dataclass(frozen=True)
class TokenAlignment:
    """(B, tokens) long: for each token of the edited prompt the source token it shares, or -1 (control calls)."""


@dataclasses.dataclass(frozen=True)
class PlanValue:
    """A tensor the mask plan provides (index tensors, flattened kernels), made by `make(plan)` and memoised on the
    plan; `key` identifies it."""

    key: Hashable
    make: Callable[[MaskPlan], torch.Tensor] = dataclasses.field(compare=False, hash=False)


Slot = Recorded | SourceMap | TokenAlignment | PlanValue


@dataclasses.dataclass(frozen=True)
class BoundIndex:
    """A `GatherIndex` as a program sees it: its tensors as graph values, its structure as constants."""

    tensors: list  # proxies (or None) in `kernels.library.INDEX_FIELDS` order
    windows: list  # num_windows (an int, or a graph value in an eager program), height, width
    all_inside: Any  # a bool, or a graph value in an eager program
    identity: bool
    empty: tuple[bool, ...] | None  # per field: None or no elements (a compiler's program; None in an eager one)

    def as_gather_index(self) -> GatherIndex:
        """A `GatherIndex` whose tensors are the program's values (for kernels written against one)."""
        fields = dict(zip(INDEX_FIELDS, self.tensors))
        coords = WindowCoords(*self.windows, None, None, fields["inside"])
        return GatherIndex(coords, all_inside=self.all_inside, identity=self.identity, **fields)

    def field(self, name: str):
        return self.tensors[INDEX_FIELDS.index(name)]


class Binding:
    """The state of one lowering: the program graph being built, its slots and writes, and the call state the
    lowerings may decide on (`plan`, `record_attention_maps`, `write_back`, `hold_layout`, `control_maps`).
    Lowerings see it as their first argument; `node` is the IR node being lowered."""

    def __init__(self, ir: fx.GraphModule, plan: MaskPlan | None, record_attention_maps: bool, write_back: bool,
                 inline_kernels: bool = False, hold_layout: bool = False, constants: CostConstants | None = None,
                 control_maps: bool = False):
        self.ir = ir
        self.inline_kernels = inline_kernels
        # block and window counts, and whether a gather's windows all lie inside the map: graph values (slots) of
        # an eager program, constants of a compiler's
        self.symbolic_counts = not inline_kernels
        self.plan = plan
        self.record_attention_maps = record_attention_maps
        self.hold_layout = hold_layout  # layout features are the source run's (`ir.ops.layout_features`)
        self.control_maps = control_maps  # controlled cross-attentions take the source run's maps
        self.write_back = write_back
        self.graph = fx.Graph()
        self.tracer = fx.proxy.GraphAppendingTracer(self.graph)
        self.slots: list[Slot] = []
        self.writes: list[Recorded] = []
        self.structure: dict[tuple, Any] = {}  # what of the plan the program depends on (`plan_fact`), see `fits`
        self.node: fx.Node | None = None
        self._slot_nodes: dict[Slot, fx.Node] = {}
        self._write_values: list[fx.Node] = []
        self._last_input: fx.Node | None = None
        # a dense program's (no plan): the compiled model's, else loaded at first use
        self._device_constants: CostConstants | None = constants

    # --- what lowerings read ----------------------------------------------------------------------------------

    def dense_value(self, arg: int | None = None) -> torch.Tensor:
        """The dense (captured) value, a fake tensor, of the IR node's argument `arg` (None: of the node itself)."""
        node = self.node if arg is None else self.node.args[arg]
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.node.name}: {'its value' if arg is None else f'argument {arg}'} has no recorded "
                            "shape")
        return value

    def dense_shape(self, arg: int) -> tuple[int, ...]:
        """The dense (captured) shape of the IR node's argument `arg`."""
        return tuple(self.dense_value(arg).shape)

    def constant(self, arg: int) -> torch.Tensor:
        """The tensor of the IR node's argument `arg`, a parameter or buffer (`get_attr`)."""
        node = self.node.args[arg]
        if node.op != "get_attr":
            raise TypeError(f"{self.node.name}: argument {arg} is not a parameter")
        value = self.ir
        for name in node.target.split("."):
            value = getattr(value, name)
        return value

    def recorded(self, ref: CacheRef):
        if ref.kind == "group_norm_stats":
            return self._input(Recorded(ref, 0)), self._input(Recorded(ref, 1))
        return self._input(Recorded(ref))

    def source(self, ref: CacheRef):
        return self._input(SourceMap(ref))

    def token_alignment(self):
        return self._input(TokenAlignment())

    def plan_value(self, key: Hashable, make: Callable[[MaskPlan], torch.Tensor]):
        return self._input(PlanValue(key, make))

    def _need_plan(self) -> MaskPlan:
        if self.plan is None:
            raise RuntimeError(f"{self.node.name} reads a mask plan, and this program is bound without one")
        return self.plan

    def _fact(self, key: tuple) -> Any:
        """`plan_fact(plan, key)`, noted as part of the program's structure."""
        if key not in self.structure:
            self.structure[key] = plan_fact(self._need_plan(), key)
        return self.structure[key]

    def num_blocks(self, res):
        """How many blocks the plan has at `res`: a constant, or a graph value (`symbolic_counts`)."""
        return self._varying(("num_blocks", tuple(res)))

    def _varying(self, key: tuple):
        """`plan_fact(plan, key)` of a fact that differs between masks of one structure: a constant of a compiler's
        program (part of its structure), a graph value of an eager one (`symbolic_counts`)."""
        if self.symbolic_counts:
            self._need_plan()
            return self.plan_value(key, functools.partial(plan_fact, key=key))
        return self._fact(key)

    def block(self, res) -> int:
        return self._fact(("block", tuple(res)))

    def conv_algorithm(self, channels: int, block: int, res) -> str:
        return self._fact(("conv_algorithm", channels, block, tuple(res)))

    def gemm_library(self, rows: int, kernel_elements: int, dtype: torch.dtype, res=None):
        """The library of a GEMM of `rows` rows (per pixel of the plan's blocks at `res`, if given: a gathered
        tensor's rows depend on the mask, and an eager program's library is then a graph value)."""
        if self.plan is None:  # a dense program (record, control): the constants of the device it computes on
            if res is not None:
                raise RuntimeError(f"{self.node.name} has gathered rows, and this program is bound without a plan")
            if self._device_constants is None:
                self._device_constants = load_constants(self.dense_value().device)
            return self._device_constants.gemm_library(rows, kernel_elements, dtype)
        key = ("gemm_library", rows, kernel_elements, dtype, None if res is None else tuple(res))
        return self._fact(key) if res is None else self._varying(key)

    def index(self, spec: WindowSpec, from_gathered: bool) -> BoundIndex:
        height, width, identity, absent = self._fact(("index", spec, from_gathered))
        # which index tensors have no elements: a compiler's program leaves out the work on them
        empty = None if self.symbolic_counts else self._fact(("index_empty", spec, from_gathered))
        index = self.plan.gather_index(spec, from_gathered)
        tensors = [None if getattr(index, f) is None else
                   self.plan_value(("index", spec, from_gathered, f), _index_field(spec, from_gathered, f))
                   for f in INDEX_FIELDS]
        return BoundIndex(tensors, [self._varying(("num_windows", spec, from_gathered)), height, width],
                          self._varying(("all_inside", spec, from_gathered)), identity, empty)

    def call(self, function: Callable[..., Any], *args):
        """A graph node calling `function` (not traced into: it runs at each call, on the call's values)."""
        return self.tracer.create_proxy("call_function", function, args, {})

    # --- what lowerings produce -----------------------------------------------------------------------------

    def write(self, ref: CacheRef, value) -> None:
        parts = value if isinstance(value, tuple) else (value,)
        for i, part in enumerate(parts):
            self.writes.append(Recorded(ref, i if isinstance(value, tuple) else None))
            self._write_values.append(part.node)

    def unpack(self, proxy, n: int) -> tuple:
        return tuple(proxy[i] for i in range(n))

    def _input(self, slot: Slot):
        if slot not in self._slot_nodes:
            with self.graph.inserting_after(self._last_input):
                node = self.graph.placeholder(_slot_name(slot, len(self.slots)))
            self._last_input = node
            self._slot_nodes[slot] = node
            self.slots.append(slot)
        return fx.Proxy(self._slot_nodes[slot], self.tracer)

    # --- lowering -----------------------------------------------------------------------------------------------

    def lower(self) -> tuple[dict[str, Any], fx.Graph, int]:
        """The program's root (`_flat_attributes`) and graph, and how many of its outputs are the model's."""
        env: dict[fx.Node, Any] = {}
        graph = self.graph
        num_outputs = None
        for node in self.ir.graph.find_nodes(op="placeholder"):  # first: passes may insert nodes among them
            env[node] = graph.node_copy(node, env.__getitem__)
            self._last_input = env[node]
        for node in self.ir.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = pytree.tree_leaves(fx.node.map_arg(node.args[0], env.__getitem__))
                num_outputs = len(outputs)
                graph.output((*outputs, *self._write_values))
            elif node.op == "call_function" and node.target in LOWERINGS:
                env[node] = self._lower_node(node, env)
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
                env[node].meta[LOWERED_FROM] = node.name
        return self._flat_attributes(), graph, num_outputs

    def _flat_attributes(self) -> dict[str, Any]:
        """The program's root: the IR's parameters, buffers and constants that the graph reads, under flat names
        (its get_attr nodes renamed to them), and the modules it calls. A dotted target such as
        ``model.down_blocks.0.resnets.0.norm1.weight`` would be read through every module on its path at every call
        (a tiny U-Net's sparse program reads 440 of them). The tensors are the model's own."""
        root: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr":
                value = functools.reduce(getattr, node.target.split("."), self.ir)
                base = "_".join(node.target.split("."))
                flat = base = base if base.isidentifier() else f"attr_{base}"
                n = 1
                while flat in root and root[flat] is not value:
                    flat, n = f"{base}_{n}", n + 1
                root[flat] = value
                node.target = flat
            elif node.op == "call_module":
                root[node.target] = self.ir.get_submodule(node.target)
        return root

    def _lower_node(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        self.node = node
        last = self.graph._root.prev  # the last node so far: what comes after it is this node's lowering
        args, kwargs = fx.node.map_aggregate(
            (node.args, node.kwargs), lambda a: fx.Proxy(env[a], self.tracer) if isinstance(a, fx.Node) else a)
        result = LOWERINGS[node.target](self, *args, **kwargs)
        new = last.next
        while new is not self.graph._root:
            if new.op != "placeholder":
                new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
                new.meta[LOWERED_FROM] = node.name
            new = new.next
        if isinstance(result, fx.Proxy):
            return result.node
        if result is None:
            return None
        raise TypeError(f"the lowering of {node.target.__name__} returned {type(result).__name__}")


def plan_fact(plan: MaskPlan, key: tuple) -> Any:
    """What a program reads of its plan: ("num_blocks", res) and ("block", res) of a resolution's layout,
    ("conv_algorithm", channels, block, res), how its cost constants say to convolve windows at res,
    ("gemm_library", rows, kernel elements, dtype, res), which library multiplies `rows` rows (per pixel of the
    blocks at `res` unless it is None), ("num_windows", spec, from_gathered), a gather's window count,
    ("all_inside", spec, from_gathered), whether its windows all lie inside the map, ("index_empty", spec,
    from_gathered), which of its tensors are absent or empty, or ("index", spec, from_gathered), the rest of a
    gather index's structure (`_index_structure`). The counts and `all_inside` are constants of a compiler's program
    and arguments of an eager one (`Binding.symbolic_counts`), which does not read "index_empty"; the rest are
    constants."""
    if key[0] == "num_blocks":
        return plan.layout(key[1]).num_blocks
    if key[0] == "block":
        return plan.layout(key[1]).block
    if key[0] == "conv_algorithm":
        return plan.constants_at(key[3]).conv_algorithm(key[1], key[2])
    if key[0] == "gemm_library":
        rows, kernel_elements, dtype, res = key[1:]
        rows = rows if res is None else rows * plan.layout(res).num_pixels
        return plan.constants.gemm_library(rows, kernel_elements, dtype)
    index = plan.gather_index(key[1], key[2])
    if key[0] == "num_windows":
        return index.windows.num_windows
    if key[0] == "all_inside":
        return bool(index.all_inside)
    if key[0] == "index_empty":
        return tuple(getattr(index, f) is None or getattr(index, f).numel() == 0 for f in INDEX_FIELDS)
    return _index_structure(index)


def _index_structure(index: GatherIndex) -> tuple:
    """What every program takes as constants of a gather index: its windows' size, whether the gather is the
    identity, which index tensors are absent."""
    c = index.windows
    return c.height, c.width, bool(index.identity), tuple(getattr(index, f) is None for f in INDEX_FIELDS)


def _index_field(spec: WindowSpec, from_gathered: bool, field: str) -> Callable[[MaskPlan], torch.Tensor]:
    return lambda plan: getattr(plan.gather_index(spec, from_gathered), field)


def _slot_name(slot: Slot, n: int) -> str:
    if isinstance(slot, (Recorded, SourceMap)):
        kind = "recorded" if isinstance(slot, Recorded) else "source"
        return f"{kind}_{n}"
    if isinstance(slot, TokenAlignment):
        return "token_alignment"
    return f"plan_{n}"


@dataclasses.dataclass
class Program:
    """A variant bound to a call state; see the module docstring. `gm(*inputs, *slots)` returns the model's
    `num_outputs` outputs, then the `writes`."""

    root: dict[str, Any]  # the parameters and modules the graph reads, by flat name
    graph: fx.Graph  # calling the functions behind the registered kernels (`direct`)
    num_outputs: int
    slots: list[Slot]
    writes: list[Recorded]
    structure: tuple[tuple[tuple, Any], ...]  # (key, value) of `plan_fact`
    _compiled: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict, repr=False)
    _fitted: weakref.ref | None = dataclasses.field(default=None, repr=False)  # the last plan `fits` accepted

    @functools.cached_property
    def gm(self) -> fx.GraphModule:
        """The program as a graph module calling the registered kernels (`torch.ops.fisedit.*`), one opaque node
        each: what `torch.compile` and `torch.export` trace. Made at first use (a copy of `graph` with the
        operators for the functions): eager calls run `direct`, and Python code generation takes a tenth of a
        second for a small U-Net's sparse program, which a new mask's first call would pay twice."""
        operators = {function: op for op, function in DIRECT_CALLS.items()}
        graph = fx.Graph()
        graph.output(graph.graph_copy(self.graph, {}))
        for node in graph.nodes:
            if node.op == "call_function" and node.target in operators:
                node.target = operators[node.target]
        return fx.GraphModule(self.root, graph)

    def direct(self) -> fx.GraphModule:
        """The program calling the Python functions behind its registered kernels instead of the operators
        (`kernels.registry.DIRECT_CALLS`): the same values and MACs without the operator dispatch, which is what
        eager calls run."""
        return self._direct

    @functools.cached_property
    def _direct(self) -> fx.GraphModule:
        return fx.GraphModule(self.root, self.graph)

    def compiled(self, backend: str | None) -> Callable[..., Any] | None:
        """`torch.compile(gm, backend=backend, fullgraph=True)`, made once per backend (None: None, run eagerly).
        Compilation happens at the first call; a graph break is an error, never a silent fallback."""
        if backend is None:
            return None
        if backend not in self._compiled:
            self._compiled[backend] = torch.compile(self.gm, backend=backend, fullgraph=True, dynamic=False)
        return self._compiled[backend]

    def fits(self, plan: MaskPlan | None) -> bool:
        """Whether this program computes `plan`'s call: the plan has the structure it was bound to. (The last plan
        that fitted is remembered by a weak reference: an edit asks once per sparse step with the same plan.)"""
        if self._fitted is not None and self._fitted() is plan is not None:
            return True
        fits = all(plan_fact(plan, key) == value for key, value in self.structure)
        if fits and plan is not None:
            self._fitted = weakref.ref(plan)
        return fits

    def by_ir_node(self, values: dict[str, Any]) -> dict[str, Any]:
        """Per-node values of a program run (e.g. `macs.node_macs`) summed per IR node, which each program node
        names in `meta[LOWERED_FROM]`."""
        folded: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.name in values:
                name = node.meta.get(LOWERED_FROM, node.name)
                folded[name] = folded.get(name, 0) + values[node.name]
        return folded

    def arguments(self, inputs: dict[str, Any], step: StepRecord | None = None, plan: MaskPlan | None = None,
                  source: StepRecord | None = None, token_alignment: torch.Tensor | None = None) -> list[Any]:
        """The graph's arguments for a call: the model's inputs, flattened, then the slots' values."""
        values = list(pytree.tree_leaves(inputs))
        for slot in self.slots:
            values.append(_slot_value(slot, step, plan, source, token_alignment))
        return values

    def __call__(self, inputs: dict[str, Any], step: StepRecord | None = None, plan: MaskPlan | None = None,
                 source: StepRecord | None = None, token_alignment: torch.Tensor | None = None,
                 runner: Callable[..., Any] | None = None) -> tuple[torch.Tensor, ...]:
        """Run the program (with `runner`, e.g. a `torch.compile` of `gm`, if given; else eagerly, `direct`) and
        store what it records into `step`; returns the model's outputs."""
        args = self.arguments(inputs, step, plan, source, token_alignment)
        result = (self.direct() if runner is None else runner)(*args)
        outputs, written = result[:self.num_outputs], result[self.num_outputs:]
        if self.writes:
            # a recorded tensor that is also an output (the model's last layer) is stored as a copy: write-back
            # updates recorded tensors in place, which must never change what a caller already holds
            returned = {t.untyped_storage().data_ptr() for t in outputs if isinstance(t, torch.Tensor)}
            parts: dict[CacheRef, dict[int | None, torch.Tensor]] = {}
            for write, value in zip(self.writes, written):
                value = value.detach()
                if value.untyped_storage().data_ptr() in returned:
                    value = value.clone()
                parts.setdefault(write.ref, {})[write.part] = value
            for ref, values in parts.items():
                step[ref] = values[None] if None in values else (values[0], values[1])
        return tuple(outputs)


def _slot_value(slot: Slot, step, plan, source, token_alignment) -> Any:
    if isinstance(slot, Recorded):
        if slot.ref not in step:
            raise StepNotRecordedError(
                f"the recorded step has no {slot.ref}, which this variant reads: the step was recorded by a U-Net "
                "compiled with another policy or another version of fisedit-compiler; record the source run again "
                "with this one")
        value = step[slot.ref]
        return value if slot.part is None else value[slot.part]
    if isinstance(slot, SourceMap):
        value = source.get(slot.ref) if source is not None else None
        if value is None:
            raise RuntimeError(
                "this step has no recorded cross-attention maps to control with: record the source run with "
                "record(attention_maps=k) for at least as many steps as run under control"
            )
        return value
    if isinstance(slot, TokenAlignment):
        return token_alignment
    return plan.value(slot.key, slot.make)


def bind(ir: fx.GraphModule, plan: MaskPlan | None = None, record_attention_maps: bool = False,
         write_back: bool = False, inline_kernels: bool = False, hold_layout: bool = False,
         constants: CostConstants | None = None, control_maps: bool = False) -> Program:
    """Lower the IR graph `ir` for a call with this plan and these flags; see the module docstring. With
    `inline_kernels`, gathers are ATen selections (`kernels.reference.gather_pixels_by_selection`) and active-query
    attention the reference's ATen ops, which a compiler fuses with what surrounds them, instead of registered
    operators (the same values). `constants`: the cost constants a dense program (no plan) chooses libraries with
    (default: the device's, loaded at first use). `control_maps`: its controlled cross-attentions (a control
    variant's, or a sparse variant's) take the source run's maps for shared tokens; without it they run stock."""
    binding = Binding(ir, plan, record_attention_maps, write_back, inline_kernels, hold_layout, constants,
                      control_maps)
    root, graph, num_outputs = binding.lower()
    for node in graph.nodes:  # the functions behind the registered kernels (`Program.gm` has the operators)
        if node.op == "call_function" and node.target in DIRECT_CALLS:
            node.target = DIRECT_CALLS[node.target]
    return Program(root, graph, num_outputs, binding.slots, binding.writes, tuple(binding.structure.items()))
