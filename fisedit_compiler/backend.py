"""The ``fisedit`` torch.compile backend: FISEdit's record and sparse calls for a U-Net compiled with dynamo.

    compiled = torch.compile(pipe.unet, backend="fisedit")       # default Policy
    compiled = torch.compile(pipe.unet, backend=fisedit.backend(fisedit.Policy(block_size=4)))
    pipe.unet = compiled
    with fisedit.record(compiled):                 # source run: dense, records what sparse calls need
        pipe(prompt_embeds=e, latents=z)
    with fisedit.sparse(compiled, mask) as session:   # edit run: recomputes only the region of the mask
        pipe(prompt_embeds=e2, latents=z)
    session.cache.nbytes, session.active_pixels()

Outside `record()` and `sparse()` a call runs dynamo's graph as it is (dense). The backend is registered under
the name "fisedit" through the ``torch_dynamo_backends`` entry point (so ``backend="fisedit"`` works without
importing this package first) and when this module is imported.

One implementation, two entry points. Inside `record()`/`sparse()`, the first call of each input signature lowers
dynamo's graph with `capture` (non-strict `torch.export` of the graph, called with the call's real inputs), and
`build_variants` runs the same pass pipelines as `fisedit.compile`. The model's adapter says which of the call's
inputs carry pixels; the graph inputs that *are* those tensors get their layouts.
Each call then goes through `CompiledUNet.forward` itself (modes, mask checks, step keys, record cache, runtime
context), which runs the variant of the dynamo graph instead of a variant of its own capture. Results are those of
`fisedit.compile` on the same inputs.

How a graph finds its call: `record()`/`sparse()` wrap the compiled module's `forward` for the duration of the
block; the wrapper notes the call's arguments in a context variable, and the graph that dynamo runs inside the
call reads them. The latents (and any other input with pixels) are the graph inputs that *are* the call's tensors,
so no dynamo naming convention is relied on. A U-Net that dynamo splits at a graph break cannot run record or sparse calls (a piece
after the break does not see the latents, and would compute dense): `GraphBreakError` names the break.
See docs/backend.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo
import torch.fx as fx
from torch import nn

from .adapters import ModelAdapter
from .capture import InputSignature
from .ir import InputLayout
from .compiler import CompiledUNet, Variants, build_variants
from .policy import Policy
from .runtime.cache import RecordCache

BACKEND_NAME = "fisedit"


class GraphBreakError(RuntimeError):
    """dynamo split a U-Net call into several graphs, and record or sparse calls need it in one."""


def backend(
    policy: Policy | None = None, adapter: type[ModelAdapter] | None = None,
) -> Callable[[fx.GraphModule, list], FisEditGraph]:
    """A torch.compile backend that makes FISEdit record/sparse variants with `policy`:
    ``torch.compile(unet, backend=fisedit.backend(policy))``. ``backend="fisedit"`` is ``backend()``. `adapter`:
    the model adapter class, if the model's class has no registered one (see `fisedit.compile`)."""
    policy = policy or Policy()

    def fisedit_backend(gm: fx.GraphModule, example_inputs: list) -> FisEditGraph:
        # Nothing is lowered here: dense calls run `gm` as it is, and record/sparse calls lower it per input
        # signature on first use, from the call's real inputs (dynamo may recompile with other shapes).
        return FisEditGraph(gm, policy)

    fisedit_backend.fisedit_policy = policy  # how `session()` finds the policy of a compiled module
    fisedit_backend.fisedit_adapter = adapter
    return fisedit_backend


fisedit_backend = backend()  # what backend="fisedit" names (the entry point's target)


class FisEditGraph:
    """What the backend returns for one dynamo graph: called by dynamo with the graph's flat inputs."""

    def __init__(self, gm: fx.GraphModule, policy: Policy):
        self.graph_module = gm
        self.policy = policy
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
        self._variants: dict[InputSignature, Variants] = {}

    def __call__(self, *args: Any) -> Any:
        call = _current_call.get()
        if call is None:  # outside record()/sparse(): dynamo's graph as it is
            return self.graph_module(*args)
        return call.run(self, args)

    def variants(self, inputs: dict[str, Any], layouts: dict[str, InputLayout]) -> Variants:
        """The graph variants for these inputs (by graph input name, the latents as `sample`; see `_Call.run`),
        lowered and compiled on first use. `layouts`: the inputs with pixels, by name."""
        signature = InputSignature.of(inputs)
        if signature not in self._variants:
            lowered = _GraphCall(self.graph_module, list(inputs), self.scalar_inputs)
            self._variants[signature] = build_variants(_GraphAdapter(lowered, layouts), inputs, self.policy)
        return self._variants[signature]


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


# --- record and sparse calls -------------------------------------------------------------------------------------


class _GraphModes(CompiledUNet):
    """A `CompiledUNet` whose `forward` (modes, checks, step keys, record cache, call contexts) runs as it is, on
    the variants of the dynamo graph being called rather than on a capture of the U-Net."""

    def __init__(self, module: nn.Module, policy: Policy, adapter: type[ModelAdapter] | None):
        super().__init__(module, policy, adapter)
        self.running: _RunningGraph | None = None

    def variants(self, inputs: dict[str, Any]) -> _RunningGraph:
        # `forward` asks for the variants of the U-Net's inputs; the graph's variants and inputs are in `running`
        if self.running is None:
            raise RuntimeError("a module compiled with the fisedit backend is called through its graphs only")
        return self.running


class _RunningGraph:
    """What `_GraphModes.variants` gives `CompiledUNet.forward`: running a variant (``.run_record(inputs, ...)``,
    ...) with the U-Net's inputs runs the graph's variant on the graph's inputs, and keeps the graph's whole output
    for dynamo (`forward` returns the latents only)."""

    def __init__(self, variants: Variants, inputs: dict[str, Any]):
        self.variants = variants
        self.inputs = inputs
        self.output: Any = None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.variants, name)  # run_record, run_control, run_sparse

        def run(unet_inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self.output = method(self.inputs, *args, **kwargs)
            return self.output

        return run


class Session:
    """The record cache and modes of one module compiled with the fisedit backend; `record()` and `sparse()`
    yield it. Modes, mask checks, step keys and the cache are `CompiledUNet`'s (one implementation)."""

    def __init__(self, module: nn.Module, policy: Policy, adapter: type[ModelAdapter] | None = None):
        self.policy = policy
        self.modes = _GraphModes(module, policy, adapter)
        self.adapter = self.modes.adapter

    @property
    def cache(self) -> RecordCache:
        """The recorded source run: `cache.steps`, `cache.nbytes`, `cache.clear()`."""
        return self.modes.cache

    def active_pixels(self) -> torch.Tensor:
        """Inside `sparse()`: the (H, W) bool map of the latent pixels that sparse calls recompute."""
        return self.modes.active_pixels()

    def pixel_inputs(self, args: tuple, kwargs: dict) -> dict[int, InputLayout]:
        """The tensors of a call with these arguments that carry pixels (the latents among them), by `id`."""
        inputs, _ = self.adapter.bind(args, kwargs)
        leaves = torch.utils._pytree.tree_leaves(inputs)
        return {id(t): layout for t, layout in zip(leaves, self.adapter.input_layouts(inputs)) if layout.layout}


class _Call:
    """One call of a compiled module inside `record()`/`sparse()`: its arguments, and the fisedit graphs that
    dynamo ran for it (one, unless the U-Net was split)."""

    def __init__(self, session: Session, args: tuple, kwargs: dict):
        self.session = session
        self.args = args
        self.kwargs = kwargs
        self.pixel_inputs = session.pixel_inputs(args, kwargs)
        self.graphs: list[FisEditGraph] = []

    def run(self, graph: FisEditGraph, args: tuple) -> Any:
        found = {i: self.pixel_inputs[id(a)] for i, a in enumerate(args) if id(a) in self.pixel_inputs}
        if self.graphs or not any(layout.latents for layout in found.values()):
            raise GraphBreakError(self._split_message(graph))
        self.graphs.append(graph)
        names = [("sample" if found[i].latents else name) if i in found else name  # readable dump folder names
                 for i, name in enumerate(graph.input_names)]
        inputs = {name: arg.item() if name in graph.scalar_inputs else arg for name, arg in zip(names, args)}
        layouts = {names[i]: dataclasses.replace(layout, path=names[i]) for i, layout in found.items()}
        running = _RunningGraph(graph.variants(inputs, layouts), inputs)
        modes = self.session.modes
        modes.running = running
        try:
            modes(*self.args, **{**self.kwargs, "return_dict": False})
        finally:
            modes.running = None
        return running.output

    def _split_message(self, graph: FisEditGraph) -> str:
        breaks = [g.break_reason for g in [*self.graphs, graph] if g.break_reason]
        where = "; ".join(breaks) if breaks else "dynamo gave no reason; torch._dynamo.explain(unet)(...) lists breaks"
        return (
            f"torch.compile split the U-Net call into several graphs (graph break: {where}). The fisedit backend "
            "runs record() and sparse() calls on the whole U-Net in one graph: remove the graph break "
            "(torch.compile(unet, backend='fisedit', fullgraph=True) raises at it) or use fisedit.compile(unet). "
            "Calls outside record() and sparse() run the graphs as they are."
        )

    def check_ran(self) -> None:
        if not self.graphs:
            raise RuntimeError(
                "the compiled U-Net ran without a fisedit graph (dynamo ran it eagerly, e.g. after reaching its "
                "recompile limit, see torch._dynamo.config.recompile_limit), so nothing was recorded or computed "
                "sparsely"
            )


_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("fisedit_backend_call", default=None)
_sessions: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()


def _backend_policy(compiled: nn.Module) -> Policy | None:
    """The policy of the fisedit backend a module was compiled with, or None if it was not."""
    return _backend_option(compiled, "fisedit_policy")


def _backend_option(compiled: nn.Module, name: str) -> Any:
    """An attribute of the fisedit backend function a module was compiled with, or None."""
    callback = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    if callback is None:
        return None
    fn = callback
    while hasattr(fn, "_torchdynamo_orig_backend"):  # dynamo's wrappers around the backend, as innermost_backend
        fn = fn._torchdynamo_orig_backend
    fn = getattr(fn, "compiler_fn", fn)  # torch.compile's wrapper around a backend given as a callable
    return getattr(fn, name, None)


def session(compiled: nn.Module) -> Session:
    """The session (record cache, modes) of a module compiled with ``torch.compile(unet, backend="fisedit")``."""
    if compiled not in _sessions:
        policy = _backend_policy(compiled)
        if not isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) or policy is None:
            raise TypeError(
                f"fisedit.record() and fisedit.sparse() take the module that torch.compile(unet, backend='fisedit') "
                f"returns, got {type(compiled).__name__}"
                + (" compiled with another backend" if isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
                   else "")
                + "; for an uncompiled U-Net use fisedit.compile(unet)"
            )
        _sessions[compiled] = Session(compiled._orig_mod, policy, _backend_option(compiled, "fisedit_adapter"))
    return _sessions[compiled]


@contextlib.contextmanager
def _routed(compiled: nn.Module, s: Session) -> Iterator[None]:
    """Route the calls of `compiled` to `s` while the block runs (see the module docstring)."""
    dynamo_forward = compiled.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        call = _Call(s, args, kwargs)
        token = _current_call.set(call)
        try:
            output = dynamo_forward(*args, **kwargs)
        finally:
            _current_call.reset(token)
        call.check_ran()
        return output

    compiled.forward = forward
    try:
        yield
    finally:
        compiled.forward = dynamo_forward


@contextlib.contextmanager
def record(compiled: nn.Module) -> Iterator[Session]:
    """Calls of `compiled` inside record the source run, as `CompiledUNet.record()` does."""
    s = session(compiled)
    with s.modes.record(), _routed(compiled, s):
        yield s


@contextlib.contextmanager
def sparse(compiled: nn.Module, mask: torch.Tensor) -> Iterator[Session]:
    """Calls of `compiled` inside compute only the region of `mask`, as `CompiledUNet.sparse(mask)` does."""
    s = session(compiled)
    with s.modes.sparse(mask), _routed(compiled, s):
        yield s


def _register() -> None:
    """Register backend="fisedit" on import, for checkouts that are not pip-installed (no entry point).

    When dynamo finds the entry point, it registers the backend itself as it loads this module, and a second
    registration of the name would fail as a duplicate: register only if dynamo knows neither."""
    from torch._dynamo.backends import registry

    registered = getattr(registry, "_COMPILER_FNS", {})  # dynamo's private tables: empty if they move
    entry_points = getattr(registry, "_BACKENDS", {})  # name -> entry point found (or None once registered)
    if BACKEND_NAME in registered or entry_points.get(BACKEND_NAME) is not None:
        return
    torch._dynamo.register_backend(fisedit_backend, name=BACKEND_NAME)


_register()
