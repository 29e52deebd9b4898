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

One implementation, two entry points: a compiled module's `Session` holds an `Executor` (`runtime/executor.py`),
as `CompiledUNet` does, whose variants are built per dynamo graph and input signature by `build_variants` from
the graph (lowered with `capture`, non-strict `torch.export`, called with the call's real inputs). Step keys, mask
checks, the record cache and the runs are the same code as `fisedit.compile`'s; results are the same.

How a graph finds its call: while `record()`/`sparse()` last, forward hooks on the compiled module (public
`nn.Module` hooks, outside dynamo's frame) note each call's arguments for the graphs dynamo runs inside it. The
latents (and any other input with pixels) are the graph inputs that *are* the call's tensors, so no dynamo naming
convention is relied on. A U-Net that dynamo splits at a graph break cannot run record or sparse calls (a piece
after the break does not see the latents, and would compute dense): `GraphBreakError` names the break.
See docs/backend.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo
import torch.fx as fx
from torch import nn

from .adapters import ModelAdapter
from .compiler import make_adapter, parameter_device, sparse_mode
from .dump import dump_dynamo_graph
from .dynamo_graph import FisEditGraph, build_graph_variants
from .ir import InputLayout
from .policy import Policy
from .runtime.cache import RecordCache
from .runtime.executor import Executor
from .runtime.run import RecordMode, Run
from .runtime.tiered_store import make_store

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
    calls: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("fisedit_backend_call", default=None)

    def fisedit_backend(gm: fx.GraphModule, example_inputs: list) -> FisEditGraph:
        # Nothing is lowered here: dense calls run `gm` as it is, and record/sparse calls lower it per input
        # signature on first use, from the call's real inputs (dynamo may recompile with other shapes). With dumps
        # on, the graph as given is written now, so that a plain call leaves it behind too.
        dump_dynamo_graph(policy, gm, example_inputs)
        return FisEditGraph(gm, calls)

    # what `session()` reads back from the compiled module
    fisedit_backend.fisedit_policy, fisedit_backend.fisedit_adapter = policy, adapter
    fisedit_backend.fisedit_calls = calls  # the call (of this thread or task) the graphs run inside
    return fisedit_backend


fisedit_backend = backend()  # what backend="fisedit" names (the entry point's target)


# --- record and sparse calls -------------------------------------------------------------------------------------


class Session:
    """The record cache, runs and executor of one module compiled with the fisedit backend; `record()` and
    `sparse()` yield it. Its executor keeps variants per dynamo graph and input signature."""

    def __init__(self, module: nn.Module, policy: Policy, adapter: type[ModelAdapter] | None,
                 calls: contextvars.ContextVar[_Call | None]):
        self.adapter = make_adapter(module, adapter)
        self.calls = calls
        self.executor = Executor(functools.partial(build_graph_variants, policy=policy), policy,
                                 self.adapter.channels(), device=functools.partial(parameter_device, module),
                                 output_downscale=self.adapter.output_downscale())
        self.cache = RecordCache(policy.storage_dtype, make_store(policy))  # the recorded source run
        self.run: Run | None = None

    @property
    def policy(self) -> Policy:
        """The policy the module was compiled with (its executor's)."""
        return self.executor.policy

    def active_pixels(self) -> torch.Tensor:
        """Inside `sparse()`: the (H, W) bool map of the latent pixels that sparse calls recompute."""
        plan = self.run.plan if self.run is not None else None
        if plan is None:
            raise RuntimeError("active_pixels() is only defined inside sparse(mask)")
        return plan.recomputed_pixels()

    def pixel_inputs(self, inputs: dict[str, Any]) -> dict[int, InputLayout]:
        """The tensors of a call's bound inputs that carry pixels (the latents among them) or the prompt, by `id`."""
        leaves = torch.utils._pytree.tree_leaves(inputs)
        return {id(t): layout for t, layout in zip(leaves, self.adapter.input_layouts(inputs))
                if layout.layout or layout.text}

    @contextlib.contextmanager
    def routed(self, compiled: nn.Module, mode) -> Iterator[Session]:
        """A run in `mode`: while it lasts, hooks on `compiled` note each call's arguments for the graphs dynamo
        runs inside it (see the module docstring)."""
        if self.run is not None:
            raise RuntimeError("already inside a run of this compiled module: record() and sparse() do not nest")
        tokens: list[contextvars.Token] = []

        def before(module, args, kwargs):
            tokens.append(self.calls.set(_Call(self, args, kwargs)))

        def after(module, args, kwargs, output):
            call = self.calls.get()
            self.calls.reset(tokens.pop())
            if output is not None:  # None: the call raised (the hook runs anyway, `always_call`)
                call.check_ran()

        handles = [compiled.register_forward_pre_hook(before, with_kwargs=True),
                   compiled.register_forward_hook(after, with_kwargs=True, always_call=True)]
        try:
            with self.executor.run(mode, self.cache) as run:
                self.run = run
                yield self
        finally:
            self.run = None
            for handle in handles:
                handle.remove()


class _Call:
    """One call of a compiled module inside `record()`/`sparse()`: its arguments, and the fisedit graphs that
    dynamo ran for it (one, unless the U-Net was split)."""

    def __init__(self, session: Session, args: tuple, kwargs: dict):
        self.session = session
        self.inputs, _ = session.adapter.bind(args, kwargs)
        self.pixel_inputs = session.pixel_inputs(self.inputs)
        self.graphs: list[FisEditGraph] = []

    def run(self, graph: FisEditGraph, args: tuple) -> Any:
        found = {i: self.pixel_inputs[id(a)] for i, a in enumerate(args) if id(a) in self.pixel_inputs}
        if self.graphs or not any(layout.latents for layout in found.values()):
            raise GraphBreakError(self._split_message(graph))
        self.graphs.append(graph)
        session, adapter = self.session, self.session.adapter
        run = session.run
        key = run.next_key(adapter.step_timestep(self.inputs), self.inputs[adapter.latents].shape[0])
        return session.executor.call(run, key, graph.named_inputs(args, found), graph=graph,
                                     **adapter.call_terms(self.inputs))

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




def _backend_option(compiled: nn.Module, name: str) -> Any:
    """An attribute of the fisedit backend function a module was compiled with, or None. dynamo has no public API
    for the backend of an `OptimizedModule`: this reads its `dynamo_ctx.callback` and unwraps dynamo's wrappers
    (docs/backend.md, "What is private")."""
    callback = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    if callback is None:
        return None
    fn = callback
    while hasattr(fn, "_torchdynamo_orig_backend"):  # dynamo's wrappers around the backend, as innermost_backend
        fn = fn._torchdynamo_orig_backend
    fn = getattr(fn, "compiler_fn", fn)  # torch.compile's wrapper around a backend given as a callable
    return getattr(fn, name, None)


def session(compiled: nn.Module) -> Session:
    """The session (record cache, runs) of a module compiled with ``torch.compile(unet, backend="fisedit")``; it
    lives as long as the module."""
    found = getattr(compiled, "_fisedit_session", None)
    if found is not None:
        return found
    policy = _backend_option(compiled, "fisedit_policy")
    if not isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) or policy is None:
        raise TypeError(
            f"fisedit.record() and fisedit.sparse() take the module that torch.compile(unet, backend='fisedit') "
            f"returns, got {type(compiled).__name__}"
            + (" compiled with another backend" if isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
               else "")
            + "; for an uncompiled U-Net use fisedit.compile(unet)"
        )
    found = Session(compiled._orig_mod, policy, _backend_option(compiled, "fisedit_adapter"),
                    _backend_option(compiled, "fisedit_calls"))
    object.__setattr__(compiled, "_fisedit_session", found)  # not a submodule: nn.Module's registry is bypassed
    return found


@contextlib.contextmanager
def record(compiled: nn.Module) -> Iterator[Session]:
    """Calls of `compiled` inside record the source run, as `CompiledUNet.record()` does."""
    s = session(compiled)
    with s.routed(compiled, RecordMode()):
        yield s


@contextlib.contextmanager
def sparse(compiled: nn.Module, mask: torch.Tensor) -> Iterator[Session]:
    """Calls of `compiled` inside compute only the region of `mask`, as `CompiledUNet.sparse(mask)` does."""
    s = session(compiled)
    with s.routed(compiled, sparse_mode(s.cache, mask)):
        yield s


def _register() -> None:
    """Register backend="fisedit" on import, for checkouts that are not pip-installed (no entry point). When dynamo
    finds the entry point it registers the backend itself as it loads this module: register only if it knows the
    name from neither."""
    if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(fisedit_backend, name=BACKEND_NAME)


_register()
